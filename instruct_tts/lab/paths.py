"""Where each step of the lab writes, inside ``--out`` (every step resumes or reuses what is there)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class LabPaths:
    out: Path

    @property
    def corpus(self) -> Path: return self.out / "corpus"
    @property
    def split(self) -> Path: return self.out / "split"
    @property
    def train_store(self) -> str: return str(self.out / "cache" / "train.zarr")
    @property
    def all_store(self) -> str: return str(self.out / "cache" / "all.zarr")
    @property
    def mapper(self) -> Path: return self.out / "runs" / "mapper"
    @property
    def t3(self) -> Path: return self.out / "runs" / "t3"
