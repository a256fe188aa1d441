"""Ctrl-C during training: finish the current step, save a checkpoint there, then stop.

A KeyboardInterrupt raised mid-step would leave weights and optimizer half-updated, so while
`stop_after_step` is active the first SIGINT only raises a flag; a training loop reads it with
`stop_requested()` between steps, writes its resume checkpoint at that step boundary (a resumed run then
continues bit for bit) and raises `TrainingInterrupted`. A second Ctrl-C interrupts at once — the last
checkpoint on disk is intact (atomic writes), so that run resumes too, from further back. Without
`stop_after_step` (library use, torchrun ranks) Ctrl-C is Python's usual KeyboardInterrupt.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

_requested = threading.Event()


class TrainingInterrupted(KeyboardInterrupt):
    """The loop stopped on Ctrl-C after saving its state; ``str()`` is the line to show the user."""


def stop_requested() -> bool:
    return _requested.is_set()


def _on_sigint(signum, frame) -> None:
    if _requested.is_set():
        raise KeyboardInterrupt
    _requested.set()
    print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_after_step() -> Iterator[None]:
    """Route SIGINT to the step-boundary flag for the duration (main thread only; otherwise a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
