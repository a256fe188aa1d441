"""Direction accuracy: of every pair of clips whose instructions ask for opposite levels of one
attribute, the fraction whose measurement is ordered as asked (a pairwise AUC; 0.5 = chance).

Which measurement answers which attribute, and which levels are opposite, is stated once here.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# attribute -> (measurement column, level asking for less, level asking for more)
ATTRIBUTES = {
    "pitch": ("f0_hz", "low", "high"),
    "rate": ("rate_lps", "slow", "fast"),
    "loudness": ("loudness_lufs", "quiet", "loud"),
}


def direction_accuracy(values: Sequence[float], levels: Sequence[str | None], low: str, high: str,
                       groups: Sequence[str | None] | None = None) -> tuple[float, int]:
    """(accuracy, number of pairs). Pairs are (low, high) clips within the same group when ``groups``
    is given (e.g. gender for pitch); ties count one half; NaN measurements are skipped."""
    v = np.asarray(values, np.float64)
    lv = np.asarray([str(x) for x in levels])
    g = np.asarray(["" if x is None else str(x) for x in (groups if groups is not None else [None] * len(v))])
    ok = np.isfinite(v)
    score = n = 0.0
    for grp in np.unique(g):
        lo = v[ok & (lv == low) & (g == grp)]
        hi = v[ok & (lv == high) & (g == grp)]
        if lo.size and hi.size:
            d = hi[:, None] - lo[None, :]
            score += float((d > 0).sum() + 0.5 * (d == 0).sum())
            n += d.size
    return (score / n if n else math.nan), int(n)


def accuracies(rows: Sequence[dict]) -> dict[str, dict]:
    """rows: dicts with measurement columns and instructed levels (``pitch``, ``rate``, ``loudness``,
    ``gender``) → {attribute: {"accuracy", "pairs", "measure"}}; pitch pairs are compared within gender."""
    out = {}
    for attr, (col, low, high) in ATTRIBUTES.items():
        groups = [r.get("gender") for r in rows] if attr == "pitch" else None
        acc, n = direction_accuracy([r[col] for r in rows], [r.get(attr) for r in rows], low, high, groups)
        out[attr] = {"accuracy": acc, "pairs": n, "measure": col, "low": low, "high": high}
    return out
