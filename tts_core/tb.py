"""TensorBoard scalars for any training loop's metric rows (`tensorboard --logdir runs/`).

Loops stay free of logging backends: they call a hook with a flat dict per evaluation/log step;
`TensorBoardHook` writes its numeric fields at ``row[step_key]`` under ``prefix/``.
"""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path


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
