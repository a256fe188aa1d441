"""How much of the voice vectors can an instruction explain? Oracles on a finished lab run (docs/benchmarks.md, "Lab").

    uv run python -m bench.speaker_oracle --lab lab/ [--repeats 3]

AvgCos ((SpkCos + XVecCos) / 2, the stage-1 metric) on the lab's held-out clips of the mean vector of the
training clips sharing a key with the clip, minus that of the plain training mean (`tts_core.evaluation.held_out.stage1_cosines`
does the same for the report), for several keys: gender+pitch (the issue's oracle), + accent, + rate, the espeak
variant (timbre no instruction describes). Then the gender+pitch oracle on corpora *restricted to k espeak variants
per gender* (random subsets of the same clips): if even one variant per gender (timbre fixed) stays under the 0.10
bar, the speaker encoders, not the corpus's variety, are what keep the oracle near the mean.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab", type=Path, required=True, help="a finished `instruct-tts lab --out` directory")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch

    from tts_core.evaluation.lab_split import DROPPED, TRAIN, espeak_variant, espeak_voice
    from tts_core.stage1.from_store import load_stage1_data

    data = load_stage1_data(str(a.lab / "cache" / "all.zarr"))
    with (a.lab / "corpus" / "attributes.csv").open() as f:
        attrs = {r["clip_id"]: r for r in csv.DictReader(f)}
    with (a.lab / "split" / "roles.csv").open() as f:
        roles = {r["clip_id"]: r["role"] for r in csv.DictReader(f)}
    clips = [attrs[c.rsplit("/", 1)[-1]] for c in data.clip_ids]
    role = np.array([roles.get(c["clip_id"], "") for c in clips])
    col = {k: np.array([c[k] for c in clips], dtype=object) for k in ("gender", "pitch", "rate")}
    col["accent"] = np.array([espeak_voice(c["speaker"]).partition("+")[0] for c in clips], dtype=object)
    col["variant"] = np.array([espeak_variant(c["speaker"]) for c in clips], dtype=object)
    spk, xv = data.spk, data.xvec

    def avg_cos(pred_spk, pred_xv, ev) -> float:
        cs = torch.nn.functional.cosine_similarity
        return float(((cs(pred_spk, spk[ev], dim=-1) + cs(pred_xv, xv[ev], dim=-1)) / 2).mean())

    def oracle_gain(keys: np.ndarray, mask: np.ndarray) -> float:
        tr = np.flatnonzero((role == TRAIN) & mask)
        ev = np.flatnonzero((role != TRAIN) & (role != DROPPED) & (role != "") & mask)
        o_spk, o_xv = spk[tr].mean(0).repeat(len(ev), 1), xv[tr].mean(0).repeat(len(ev), 1)
        base = avg_cos(o_spk, o_xv, ev)
        for key in np.unique(keys[ev]):
            same, at = tr[keys[tr] == key], np.flatnonzero(keys[ev] == key)
            if len(same):
                o_spk[at], o_xv[at] = spk[same].mean(0), xv[same].mean(0)
        return avg_cos(o_spk, o_xv, ev) - base

    def key(*names: str) -> np.ndarray:
        return np.array(["/".join(parts) for parts in zip(*(col[n] for n in names))], dtype=object)

    everything = np.ones(len(clips), bool)
    print(f"lab: {a.lab} ({len(clips)} clips, {len(set(col['variant']))} espeak variants)\n")
    print("| oracle key | oracle − mean AvgCos |\n|---|---|")
    for names in (("gender",), ("gender", "pitch"), ("gender", "pitch", "accent"), ("gender", "pitch", "rate"),
                  ("variant",), ("variant", "pitch")):
        print(f"| {' + '.join(names)} | {oracle_gain(key(*names), everything):+.3f} |")
    rng = np.random.default_rng(0)
    by_gender = {g: sorted(set(col["variant"][col["gender"] == g])) for g in ("male", "female")}
    print("\n| espeak variants per gender | gender+pitch oracle − mean (random subsets) |\n|---|---|")
    for k in (1, 2, 3, 5, 10):
        gains = []
        for _ in range(a.repeats):
            chosen = [v for vs in by_gender.values() for v in rng.choice(vs, min(k, len(vs)), replace=False)]
            gains.append(oracle_gain(key("gender", "pitch"), np.isin(col["variant"], chosen)))
        print(f"| {k} | " + ", ".join(f"{g:+.3f}" for g in gains) + " |")


if __name__ == "__main__":
    main()
