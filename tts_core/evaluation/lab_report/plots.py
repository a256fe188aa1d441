"""The report's plots: direction accuracy with intervals, the stage-2 loss curves, measured values by asked level."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tts_core.evaluation.directions import ATTRIBUTES
from tts_core.evaluation.lab_report.scores import RENDERINGS
from tts_core.evaluation.lab_report.targets import MODEL_MIN
from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION, HELD_OUT_VOICE


def plot_attributes(tables: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), sharey=True)
    for ax, (attr, table) in zip(np.atleast_1d(axes), tables.items()):
        rows = [t for t in table if t["rendering"] != "chance"]
        y = [t["accuracy"] for t in rows]
        err = np.array([[t["accuracy"] - t["ci"][0], t["ci"][1] - t["accuracy"]] for t in rows]).T
        colors = ["C0" if t["split"] == HELD_OUT_INSTRUCTION else "C1" for t in rows]
        ax.bar(range(len(rows)), y, color=colors, yerr=np.nan_to_num(err), capsize=3)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.axhline(MODEL_MIN, color="green", ls="--", lw=1)
        ax.set_xticks(range(len(rows)), [t["rendering"].split(" (")[0].replace("ground-truth", "GT")
                                         .replace("ground truth", "GT") for t in rows], rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(attr)
        ax.set_ylim(0, 1.05)
    np.atleast_1d(axes)[0].set_ylabel("direction accuracy (blue: held-out instr., orange: held-out voices)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_stage2(train_log: list[dict], curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if train_log:
        ax.plot([h["step"] for h in train_log], [h["loss_speech"] for h in train_log], lw=1, alpha=0.6,
                label="training loop: speech loss")
    for key, label in (("train_rows", "training clips (teacher-forced, instruction-only)"),
                       (HELD_OUT_INSTRUCTION, "held-out instructions"), (HELD_OUT_VOICE, "held-out voices")):
        pts = [(p["step"], p[key]) for p in curve if p.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("speech-token cross-entropy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_measurements(renderings: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in RENDERINGS if any(n in v for v in renderings.values())]
    attrs = list(ATTRIBUTES)
    fig, axes = plt.subplots(len(names), len(attrs), figsize=(4 * len(attrs), 3 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        rows = [r for v in renderings.values() for r in v.get(name, [])]
        for j, attr in enumerate(attrs):
            col, low, high = ATTRIBUTES[attr]
            ax = axes[i][j]
            for x, level in enumerate((low, high)):
                ys = [r[col] for r in rows if r.get(attr) == level and np.isfinite(r.get(col, math.nan))]
                ax.scatter(np.full(len(ys), x) + np.random.default_rng(x).uniform(-0.15, 0.15, len(ys)), ys, s=6,
                           alpha=0.6)
            ax.set_xticks([0, 1], [low, high])
            ax.set_title(f"{name}: {col}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
