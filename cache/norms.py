"""Norm statistics of the cached speaker vectors, and what to do about them.

Raw CAM++ x-vectors are far from unit-norm (the embedded CAM++: 9.36 ± 1.01 on the lab corpus) while
VoiceEncoder embeddings are unit-norm; an MSE over their concatenation then ignores the speaker embedding.
This report makes that visible before anyone trains on the cache. It is written inside the store
(``<store>/norm_report.{json,md,png}``); docs/cache.md "The norm report" has the verdicts, what each asks of
the user, and the Prefect artifact keys. Pure functions but the last two: numbers in, numbers/text out.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

UNIT_TOL = 0.01  # |mean-1| and std under this: already unit-norm
IMBALANCE_RATIO = 2.0  # one type's mean norm this many times the other's: an MSE would ignore the smaller
HIST_BINS = 30


@dataclass(frozen=True)
class NormStats:
    name: str
    count: int
    mean: float
    std: float
    min: float
    max: float
    verdict: str  # "unit-norm" | "not unit-norm" | "no data"
    hist_counts: list[int]
    hist_edges: list[float]


@dataclass(frozen=True)
class NormReport:
    spk: NormStats
    xvec: NormStats
    ratio: float  # mean xvec norm / mean spk norm
    verdict: str  # "no data" | "already unit-norm" | "imbalance" | "normalise" (docs/cache.md, "The norm report")
    recommendation: str
    normalisation: dict  # what the store is configured to apply
    sampled: bool
    total_rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def vector_stats(name: str, norms: np.ndarray) -> NormStats:
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0:
        return NormStats(name, 0, float("nan"), float("nan"), float("nan"), float("nan"), "no data", [], [])
    counts, edges = np.histogram(norms, bins=HIST_BINS)
    unit = abs(norms.mean() - 1.0) < UNIT_TOL and norms.std() < UNIT_TOL
    return NormStats(name, int(norms.size), float(norms.mean()), float(norms.std()), float(norms.min()),
                     float(norms.max()), "unit-norm" if unit else "not unit-norm",
                     counts.tolist(), edges.tolist())


def sample_rows(n: int, max_rows: int | None, seed: int = 0) -> np.ndarray | None:
    """A seeded subset of row positions for huge stores; None means use every row."""
    if max_rows is None or n <= max_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def norm_report(spk_norms: np.ndarray, xvec_norms: np.ndarray, normalisation: dict,
                total_rows: int | None = None, sampled: bool = False) -> NormReport:
    spk, xv = vector_stats("spk_emb", spk_norms), vector_stats("xvec", xvec_norms)
    ratio = xv.mean / spk.mean if spk.count and spk.mean > 0 else float("nan")
    both_unit = spk.verdict == "unit-norm" and xv.verdict == "unit-norm"
    applied = [k for k, v in normalisation.items() if v]
    if spk.count == 0:
        verdict, rec = "no data", "No OK rows: nothing to report. Check the manifest's quarantine reasons."
    elif both_unit:
        verdict, rec = "already unit-norm", "Both vector types are unit-norm; L2 normalisation changes nothing."
    elif np.isfinite(ratio) and (ratio > IMBALANCE_RATIO or ratio < 1 / IMBALANCE_RATIO):
        verdict = "imbalance"
        rec = (f"X-vec/Spk norm ratio is {ratio:.2f}: an unnormalised MSE over [spk|xvec] would be dominated "
               f"by the larger vector. L2-normalise both (configured: {', '.join(applied) or 'none'}).")
    else:
        verdict = "normalise"
        rec = f"Norms are not 1; L2-normalise before training (configured: {', '.join(applied) or 'none'})."
    return NormReport(spk, xv, float(ratio), verdict, rec, dict(normalisation), sampled,
                      int(total_rows if total_rows is not None else spk.count))


def to_markdown(r: NormReport, title: str = "Norm statistics") -> str:
    rows = "\n".join(
        f"| {s.name} | {s.count} | {s.mean:.4f} | {s.std:.4f} | {s.min:.4f} | {s.max:.4f} | {s.verdict} |"
        for s in (r.spk, r.xvec))
    sample = f" (seeded sample of {r.spk.count} of {r.total_rows} OK rows)" if r.sampled else ""
    return (f"# {title}\n\n| vector | count | mean norm | std | min | max | verdict |\n"
            f"|---|---|---|---|---|---|---|\n{rows}\n\n"
            f"**X-vec/Spk ratio:** {r.ratio:.3f}{sample}\n\n**Verdict:** {r.verdict}\n\n"
            f"**Recommendation:** {r.recommendation}\n\n"
            f"**Reader applies L2 normalisation to:** "
            f"{', '.join(k for k, v in r.normalisation.items() if v) or 'nothing'} (raw values and norms stay on disk)\n")


def table_rows(r: NormReport) -> list[dict]:
    """The numbers as rows, for a Prefect table artifact."""
    return [{"vector": s.name, "count": s.count, "mean": round(s.mean, 6), "std": round(s.std, 6),
             "min": round(s.min, 6), "max": round(s.max, 6), "verdict": s.verdict} for s in (r.spk, r.xvec)]


def save_report(r: NormReport, out_dir: Path | str, fs=None) -> dict[str, str]:
    """JSON + Markdown + PNG histogram as ``out_dir/norm_report.*`` (the store itself; any fsspec filesystem)."""
    import fsspec
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = str(out_dir).rstrip("/")
    fs = fs or fsspec.core.url_to_fs(out)[0]
    paths = {k: f"{out}/norm_report.{k}" for k in ("json", "md", "png")}
    with fs.open(paths["json"], "w") as f:
        json.dump(r.to_dict(), f, indent=2)
    with fs.open(paths["md"], "w") as f:
        f.write(to_markdown(r))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, s in zip(axes, (r.spk, r.xvec)):
        if s.count:
            ax.stairs(s.hist_counts, s.hist_edges, fill=True)
        ax.set_title(f"{s.name}: mean {s.mean:.3f} ± {s.std:.3f}")
        ax.set_xlabel("L2 norm")
    axes[0].set_ylabel("clips")
    fig.tight_layout()
    with fs.open(paths["png"], "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return paths


def publish_norm_report(url: str, max_rows: int | None = 200_000, seed: int = 0):
    """Compute the norm report over OK rows (a seeded sample for huge stores) and save it inside the store."""
    from cache.reader import CacheReader
    from cache.store import os_errors

    r = CacheReader(url)
    rows = sample_rows(len(r), max_rows, seed)
    spk_n, xv_n = r.raw_norms(rows)
    report = norm_report(spk_n, xv_n, r.normalisation.to_dict(), total_rows=len(r), sampled=rows is not None)
    with os_errors(url):
        return report, save_report(report, url)
