"""TensorBoard scalars for any training loop's metric rows (`tensorboard --logdir runs/`).

Loops stay free of logging backends: they call a hook with a flat dict per evaluation/log step;
`TensorBoardHook` writes its numeric fields at ``row[step_key]`` under ``prefix/``.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Callable


class TensorBoardHook:
    def __init__(self, log_dir: str | Path, prefix: str, step_key: str = "step"):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.prefix, self.step_key = prefix, step_key

    def __call__(self, row: dict) -> None:
        step = int(row[self.step_key])
        for k, v in row.items():
            if k != self.step_key and isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{self.prefix}/{k}", float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextmanager
def logged(log_dir: str | Path | None, prefix: str, *hooks: Callable[[dict], None] | None):
    """One hook calling ``hooks`` in order plus TensorBoard under ``log_dir`` (None: no TensorBoard).
    Under torchrun only rank 0 writes events (the loops call hooks on rank 0 only anyway)."""
    calls = [h for h in hooks if h is not None]
    tb = None
    if log_dir is not None and os.environ.get("RANK", "0") == "0":
        tb = TensorBoardHook(log_dir, prefix)
        calls.append(tb)
    def hook(row: dict) -> None:
        for h in calls:
            h(row)

    try:
        yield hook
    finally:
        if tb is not None:
            tb.close()
