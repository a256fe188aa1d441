"""Prefect artifact keys from paths: artifact keys allow lowercase letters, digits and dashes only."""
from __future__ import annotations

from pathlib import Path


def artifact_key(path: str, suffix: str = "") -> str:
    stem = Path(str(path).rstrip("/")).name.lower()
    key = "".join(c if c.isalnum() else "-" for c in stem).strip("-") or "run"
    return f"{key}-{suffix}" if suffix else key
