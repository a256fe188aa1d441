"""Uncertainty and baselines for the lab's numbers (pure functions of arrays).

* `bootstrap_ci`: percentile bootstrap 95% interval of any statistic of a sample of *clips* — resampling
  clips, not pairs, because the pairs of a direction accuracy share clips and are not independent;
* `direction_ci`: direction accuracy (`directions.direction_accuracy`) with its bootstrap interval;
* `shuffled_direction_accuracy`: the "instruction ignored" baseline — the same measurements scored against
  randomly permuted instructions (its expectation is 0.5 whatever the measurements);
* `gap_closed`: the share of the (baseline → oracle) gap a model closes.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from tts_core.evaluation.directions import direction_accuracy

CI_LEVEL = 0.95
N_BOOT = 1000


def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], float], n_boot: int = N_BOOT, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of ``statistic(idx)`` over ``n_boot`` resamples ``idx`` of range(n) with
    replacement; NaN statistics (a resample without pairs) are skipped; (nan, nan) when none is finite."""
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    vals = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], np.float64)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return float(lo), float(hi)


def mean_ci(x: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """{"value", "ci": [low, high], "n"} of the mean of ``x`` (e.g. per-clip cosines)."""
    x = np.asarray(x, np.float64)
    lo, hi = bootstrap_ci(len(x), lambda i: float(x[i].mean()), n_boot, seed)
    return {"value": float(x.mean()) if x.size else math.nan, "ci": [lo, hi], "n": int(x.size)}


def direction_ci(values: Sequence[float], levels: Sequence[str | None], low: str, high: str,
                 groups: Sequence[str | None] | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """{"accuracy", "pairs", "ci": [low, high]}: direction accuracy and its clip-bootstrap interval."""
    v = np.asarray(values, np.float64)
    lv = np.asarray(["" if x is None else str(x) for x in levels], dtype=object)
    g = None if groups is None else np.asarray(["" if x is None else str(x) for x in groups], dtype=object)
    acc, pairs = direction_accuracy(v, lv, low, high, g)
    lo, hi = bootstrap_ci(len(v), lambda i: direction_accuracy(v[i], lv[i], low, high,
                                                               None if g is None else g[i])[0], n_boot, seed)
    return {"accuracy": acc, "pairs": pairs, "ci": [lo, hi]}


def shuffled_direction_accuracy(values: Sequence[float], levels: Sequence[str | None], low: str, high: str,
                                groups: Sequence[str | None] | None = None, n_perm: int = 200, seed: int = 0
                                ) -> dict:
    """The "instruction ignored" baseline: accuracy of ``values`` against permutations of the (level, group)
    labels; {"accuracy": mean, "pairs", "ci": [2.5%, 97.5%] of the permutation distribution}."""
    v = np.asarray(values, np.float64)
    lv = np.asarray(["" if x is None else str(x) for x in levels], dtype=object)
    g = np.asarray(["" if x is None else str(x) for x in (groups if groups is not None else [None] * len(v))],
                   dtype=object)
    rng = np.random.default_rng(seed)
    pairs = direction_accuracy(v, lv, low, high, g)[1]  # the pairs of the real labels (a permutation's vary with NaNs)
    accs = []
    for _ in range(n_perm):
        p = rng.permutation(len(v))
        accs.append(direction_accuracy(v, lv[p], low, high, g[p])[0])
    accs = np.asarray(accs, np.float64)
    accs = accs[np.isfinite(accs)]
    if not accs.size:
        return {"accuracy": math.nan, "pairs": pairs, "ci": [math.nan, math.nan]}
    lo, hi = np.quantile(accs, [(1 - CI_LEVEL) / 2, 1 - (1 - CI_LEVEL) / 2])
    return {"accuracy": float(accs.mean()), "pairs": int(pairs), "ci": [float(lo), float(hi)]}


def gap_closed(baseline: float, oracle: float, model: float) -> float:
    """(model − baseline) / (oracle − baseline): 0 = no better than the baseline, 1 = as good as the oracle;
    NaN when the oracle is not above the baseline."""
    gap = oracle - baseline
    return (model - baseline) / gap if gap > 0 else math.nan
