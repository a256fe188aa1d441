"""The lab's tables, scored from its measurements (pure: no model is run here).

* `attribute_tables`: per attribute, one row per (held-out split, rendering) — ground-truth audio, ground-truth
  tokens through the embedded vocoder, the model, the "instruction ignored" baseline (the model's own outputs
  scored against shuffled instructions) and chance — with direction accuracy, pairs and a bootstrap 95% CI;
* `wording_section`, `reference_voice`, `sweep_section`: the model by instruction wording beside the
  instruction-embedding probe, the cloned voice kept, accuracy against each swept sampling value;
* `stage1_section`: mean-vector baseline, gender+pitch oracle and model AvgCos with intervals, % of gap closed.
"""
from __future__ import annotations

import math

import numpy as np

from tts_core.evaluation.directions import ATTRIBUTES
from tts_core.evaluation.held_out import CURVE_PREFIX, VECTORS
from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION, HELD_OUT_VOICE
from tts_core.evaluation.stats import direction_ci, gap_closed, mean_ci, shuffled_direction_accuracy

# attribute -> (measurement, level asking for less, for more); gender is read from F0 (male < female)
LAB_ATTRIBUTES = {**ATTRIBUTES, "gender": ("f0_hz", "male", "female")}
GROUPED_BY_GENDER = ("pitch",)
WITH_REFERENCE = "model, reference clip of the voice + instruction"
RENDERINGS = ("ground truth audio", "ground-truth tokens -> vocoder", "model", WITH_REFERENCE)
IGNORED = "instruction ignored (model outputs, shuffled instructions)"
TARGET_ATTRIBUTES = ("pitch", "rate", "loudness")


def _score(rows: list[dict], attr: str, n_boot: int, seed: int, shuffled: bool = False) -> dict:
    col, low, high = LAB_ATTRIBUTES[attr]
    groups = [r.get("gender") for r in rows] if attr in GROUPED_BY_GENDER else None
    args = ([r.get(col, math.nan) for r in rows], [r.get(attr) for r in rows], low, high, groups)
    asked = [r for r in rows if r.get(attr) in (low, high)]
    counts = {"clips": len(asked), "measured": sum(math.isfinite(r.get(col, math.nan)) for r in asked)}
    if shuffled:
        return {**shuffled_direction_accuracy(*args, seed=seed), **counts}
    return {**direction_ci(*args, n_boot=n_boot, seed=seed), **counts}


def attribute_tables(renderings: dict[str, dict[str, list[dict]]], n_boot: int = 1000, seed: int = 0
                     ) -> dict[str, list[dict]]:
    """``renderings[split][rendering]`` = attribute rows (levels + measurements) → {attribute: table rows}."""
    out: dict[str, list[dict]] = {}
    for attr in LAB_ATTRIBUTES:
        table = []
        for split, by_name in renderings.items():
            for name in RENDERINGS:
                if name in by_name:
                    table.append({"split": split, "rendering": name, **_score(by_name[name], attr, n_boot, seed)})
            if "model" in by_name:
                table.append({"split": split, "rendering": IGNORED,
                              **_score(by_name["model"], attr, n_boot, seed, shuffled=True)})
            table.append({"split": split, "rendering": "chance", "accuracy": 0.5, "pairs": None, "ci": [0.5, 0.5]})
        out[attr] = table  # a rendering without pairs stays, with accuracy NaN: "nothing measurable" is a result
    return out


WORDINGS = {"train": "training wording (new texts, known words)", "held_out": "held-out wording (words no training text has)"}
VOICES = "voices"  # the held-out voices' own instructions (any wording): a row of the same table
BY_WORDING = {"all": "all held-out instructions", **WORDINGS, VOICES: "held-out voices (their instructions)"}
PROBE = "instruction-embedding probe"
VOICE_COSINE = "voice cosine"  # a sweep's column for renderings with a reference clip: cosine to the reference


def wording_section(renderings: dict[str, dict[str, list[dict]]], probe: dict[str, list[dict]] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Held-out instructions by wording (and the held-out voices' instructions), the model beside the
    instruction-embedding probe (`tts_core.evaluation.instruction_probe`) on the same clips: how much of a miss is
    unseen *words* that the frozen text encoder + stage-1 pooling does not carry (the probe misses too) rather than
    the T3 (it does not)."""
    out = []
    for wording in BY_WORDING:
        split = HELD_OUT_VOICE if wording == VOICES else HELD_OUT_INSTRUCTION
        sources = {"model": renderings.get(split, {}).get("model", []), PROBE: (probe or {}).get(split, [])}
        for source, rows in sources.items():
            chosen = [r for r in rows if wording in ("all", VOICES) or r.get("wording") == wording]
            if chosen:
                out += [{"source": source, "wording": wording, "attribute": attr, **_score(chosen, attr, n_boot, seed)}
                        for attr in TARGET_ATTRIBUTES]
    return out


def reference_voice(renderings: dict[str, dict[str, list[dict]]], n_boot: int = 1000, seed: int = 0) -> dict:
    """{rendering: mean_ci} of the VoiceEncoder cosine to the reference clip, on held-out voices: is the cloned
    voice kept while the instruction steers it (ground truth: the same voice, another clip — the ceiling; the
    instruction-only model, which never heard the reference — the baseline)."""
    rows = renderings.get(HELD_OUT_VOICE, {})
    return {name: mean_ci([r["ref_spk_cos"] for r in rows[name] if "ref_spk_cos" in r], n_boot, seed)
            for name in RENDERINGS if name in rows and any("ref_spk_cos" in r for r in rows[name])}



def sweep_section(sweeps: dict[str, dict[float, dict[str, list[dict]]]], n_boot: int = 1000, seed: int = 0
                  ) -> dict[str, list[dict]]:
    """``sweeps[option][value][split]`` = the model's attribute rows at that sampling value → {option: rows of
    {value, split, attribute, accuracy, ci, pairs, clips, measured}}: accuracy against the option, per split."""
    out = {}
    for opt, by_value in sweeps.items():
        out[opt] = [{"value": float(v), "split": split, "attribute": attr, **_score(rows, attr, n_boot, seed)}
                    for v, by_split in by_value.items() for split, rows in by_split.items() for attr in LAB_ATTRIBUTES]
        for v, by_split in by_value.items():  # rows rendered with a reference clip: the voice kept, beside
            for split, rows in by_split.items():
                cos = [r["ref_spk_cos"] for r in rows if "ref_spk_cos" in r]
                if cos:
                    m = mean_ci(cos, n_boot, seed)
                    out[opt].append({"value": float(v), "split": split, "attribute": VOICE_COSINE,
                                     "accuracy": m["value"], "ci": m["ci"], "pairs": m["n"]})
    return out



def stage1_section(cosines: dict[str, dict[str, np.ndarray]], n_boot: int = 1000, seed: int = 0) -> dict:
    """``cosines[split]`` = `lab.stage1_cosines` output → {split: {name: mean_ci} for every name there, plus
    "oracle_minus_mean", "gap_closed" (AvgCos) and per vector v in spk/xvec "oracle_minus_mean.v", "gap_closed.v";
    "curve": one row per sampling point with its SpkCos / XVecCos / AvgCos and gaps closed}."""
    out = {}
    for split, c in cosines.items():
        s = {k: mean_ci(v, n_boot, seed) for k, v in c.items()}

        def gaps(name: str) -> dict:
            return {("gap_closed" + sfx): gap_closed(s["mean" + sfx]["value"], s["oracle" + sfx]["value"],
                                                      s[name + sfx]["value"])
                    for sfx in ("", *(f".{v}" for v in VECTORS)) if name + sfx in s}

        for sfx in ("", *(f".{v}" for v in VECTORS)):
            if "mean" + sfx in s:
                s["oracle_minus_mean" + sfx] = s["oracle" + sfx]["value"] - s["mean" + sfx]["value"]
        s.update(gaps("model"))
        s["curve"] = [{"point": k[len(CURVE_PREFIX):], "avg": s[k]["value"],
                       **{v: s[f"{k}.{v}"]["value"] for v in VECTORS}, **gaps(k)}
                      for k in c if k.startswith(CURVE_PREFIX) and not k.endswith(tuple(f".{v}" for v in VECTORS))]
        out[split] = s
    return out


def find_row(table: list[dict], split: str, rendering: str) -> dict | None:
    """The row of ``table`` for (``split``, ``rendering``), or None."""
    return next((r for r in table if r["split"] == split and r["rendering"] == rendering), None)
