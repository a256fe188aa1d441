"""Step-loop pieces both recipes use: device choice, LR assignment, non-finite steps, progress bar."""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` = CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_lr(opt: torch.optim.Optimizer, lr: Callable[[dict], float]) -> None:
    """Set every parameter group's LR to ``lr(group)`` (the schedule is applied before each step)."""
    for g in opt.param_groups:
        g["lr"] = lr(g)


class NonFiniteSteps:
    """Counts skipped steps in the recipe's resume state (``consecutive_nonfinite``, ``nonfinite_total``)
    and raises once more than ``max_nonfinite`` come in a row: one bad batch is skipped, a diverged run
    stops with a message that says what to try."""

    def __init__(self, state, max_nonfinite: int):
        self.state, self.max_nonfinite = state, max_nonfinite

    def ok(self) -> None:
        self.state.consecutive_nonfinite = 0

    def skipped(self, warning: str, error: Callable[[], Exception]) -> None:
        """Count a skipped step, log ``warning``; raise ``error()`` when the run is past saving."""
        st = self.state
        st.consecutive_nonfinite += 1
        st.nonfinite_total += 1
        log.warning(warning)
        if st.consecutive_nonfinite > self.max_nonfinite:
            raise error()


def progress_bar(enabled: bool, total: int | None, initial: int, desc: str):
    """A tqdm bar over steps, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc=desc)


def fmt(x) -> str:
    """A report cell: 4 decimals for floats, an em dash for missing values."""
    return "—" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))
