"""Stage 2's metrics rows: the per-step sums of `Stage2Model`'s statistics over a logging window, and the row
``metrics.jsonl`` gets (loss per head and loss segment — `tts_core.stage2.row_mix.SEGMENTS` — LR, grad norm, tokens/s,
padding)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tts_core.stage2.row_mix import INSTRUCTION_ONLY_FRAC, SEGMENTS, segment_key

# `Stage2Model`'s statistics, in its order: CE sum and token count per head and loss segment (`row_mix.SEGMENTS`)
STAT_NAMES = ("loss", "loss_text", "loss_speech",
              *(f"{part}_{segment_key(head, seg)}" for head in ("text", "speech") for seg in SEGMENTS
                for part in ("ce", "n")), "n_instruction_only_rows", "n_rows")


@dataclass
class MetricsWindow:
    """Sums over the steps since the last metrics row."""

    stats: torch.Tensor = field(default_factory=lambda: torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64))
    t0: float = field(default_factory=time.time)
    tokens: float = 0.0
    padded: float = 0.0
    gnorm: float = 0.0

    def add(self, vals: torch.Tensor, finite: bool) -> None:
        """``vals``: the all-reduced step sums (stats × weight, weight, tokens, padded tokens, grad norm)."""
        S = len(STAT_NAMES)
        if finite:
            w_sum = float(vals[S])
            self.stats[:3] += vals[:3] / max(w_sum, 1e-12) if w_sum else 0
            self.stats[3:S] += vals[3:S]
            self.stats[-1] += 1
            self.gnorm += float(vals[-1])
        self.tokens += float(vals[S + 1])
        self.padded += float(vals[S + 2])

    def row(self, st, nb: int, lr: float) -> dict:
        """The metrics row at the training state ``st`` (step, epoch, position; ``nb`` batches in the epoch)."""
        a = dict(zip(STAT_NAMES, self.stats[:len(STAT_NAMES)].tolist()))
        n = max(float(self.stats[-1]), 1.0)
        dt = max(time.time() - self.t0, 1e-9)

        def ratio(x, y):
            return a[x] / a[y] if a[y] > 0 else None

        per_segment = {key: ratio(f"ce_{key}", f"n_{key}")
                       for key in (segment_key(head, seg) for head in ("text", "speech") for seg in SEGMENTS)}
        return {
            "step": st.global_step, "total_steps": st.total_steps, "epoch": st.epoch + st.position / max(nb, 1),
            "lr": lr, "loss": a["loss"] / n, "loss_text": a["loss_text"] / n, "loss_speech": a["loss_speech"] / n,
            **per_segment, INSTRUCTION_ONLY_FRAC: ratio("n_instruction_only_rows", "n_rows"),
            "grad_norm": self.gnorm / n,
            "tokens_per_s": self.tokens / dt, "pad_frac": 1 - self.tokens / self.padded if self.padded else 0.0,
            "nonfinite_total": st.nonfinite_total, "steps_in_row": int(self.stats[-1]), "time": time.time(),
        }
