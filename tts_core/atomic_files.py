"""Atomic file writes: a reader (or a resume after kill -9) sees the old file or the new one, never half.

Write to a temp file in the same directory, fsync, give it ordinary permissions, `os.replace`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _publishable(tmp: str) -> None:
    """mkstemp files are 0600; give the published file what a plain open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` produces the file; it is published at ``path`` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publishable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_default(o: Any):
    """JSON for what run metadata holds: paths, numpy / torch scalars and arrays, objects with to_dict."""
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (torch.Tensor, np.ndarray)):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
