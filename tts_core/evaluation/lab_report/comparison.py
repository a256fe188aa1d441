"""Another lab run's held-out-instruction results beside this run's (``instruct-tts lab --compare-to``)."""
from __future__ import annotations

from collections.abc import Iterable

from tts_core.evaluation.lab_report.scores import TARGET_ATTRIBUTES, find_row
from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION


def held_out_instruction_results(r: dict) -> dict:
    """Held-out-instruction results of one report: stage-1 model AvgCos, the model's direction accuracy per
    target attribute, and the last held-out speech loss."""
    s1 = r.get("stage1", {}).get(HELD_OUT_INSTRUCTION, {})
    out = {"stage1_avg_cos": s1.get("model", {}).get("value")}
    for attr in TARGET_ATTRIBUTES:
        row = find_row(r.get("tables", {}).get(attr, []), HELD_OUT_INSTRUCTION, "model")
        out[f"{attr}_accuracy"] = row and row["accuracy"]
    curve = r.get("stage2", {}).get("curve") or [{}]
    out["stage2_heldout_loss"] = curve[-1].get(HELD_OUT_INSTRUCTION)
    return out


def caption_comparison(r: dict, other: dict, same_run: Iterable[str]) -> dict:
    """This run's held-out-instruction results beside another run's (e.g. ``--captions-per-clip 1``), with the
    settings of ``same_run`` (the config fields that define a run: `instruct_tts.lab.config.same_run_fields`)
    that differ (none: same clips, same steps)."""
    a, b = r["config"], other.get("config", {})
    return {"out": b.get("out"), "captions_per_clip": b.get("captions_per_clip", 1),
            "differs": [k for k in same_run if _plain(a.get(k)) != _plain(b.get(k))],
            "this": held_out_instruction_results(r), "other": held_out_instruction_results(other)}


def _plain(value):
    """A config value as report.json holds it (a tuple reads back as a list)."""
    return list(value) if isinstance(value, tuple) else value
