"""Prefect flow `lab`: thin orchestration around instruct_tts.lab.run_lab (the instruction-following lab).

Logs each step, and publishes the report (markdown, its plots embedded: `flows.pictures`), the per-attribute table
and links to the files as artifacts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact

from flows.keys import artifact_key
from flows.pictures import picture, publish_markdown
from instruct_tts.lab import run_lab
from instruct_tts.options import LAB_DEFAULT_PRESET, lab_config
from tts_core.evaluation.lab_report import to_markdown


PLOTS = {"attributes.png": "direction accuracy with intervals", "stage2_loss.png": "stage-2 loss curves",
         "measurements.png": "measured values by asked level"}


@flow(name="lab", log_prints=True)
def lab_flow(out: str | None = None, preset: str = LAB_DEFAULT_PRESET, ablation: list[str] | None = None,
             n_clips: int | None = None, stage1_steps: int | None = None, stage2_steps: int | None = None,
             text_encoder: str | None = None, t3: str | None = None, eval_clips: int | None = None,
             mapper_draws: int | None = None, captions_per_clip: int | None = None, compare_to: str | None = None,
             speech_tokenizer: str | None = None, seed: int | None = None, device: str | None = None,
             settings: dict[str, Any] | None = None) -> dict:
    """The instruction-following lab. The parameters are `instruct-tts lab`'s flags (`--help`; None = the preset's
    value); ``settings`` is its ``--set``: {LabConfig field: value}."""
    cfg = lab_config(locals())
    logger = get_run_logger()
    report = run_lab(cfg, say=logger.info)
    out = str(cfg.out)
    key = artifact_key(out, "lab")
    plots = "\n\n".join(picture(name, alt) for name, alt in PLOTS.items())
    publish_markdown(to_markdown(report) + "\n## Plots\n\n" + plots + "\n", base=out, key=f"{key}-report",
                     description="instruction-following lab")
    create_table_artifact([{"attribute": attr, "split": r["split"], "rendering": r["rendering"],
                            "accuracy": r["accuracy"], "ci_low": r["ci"][0], "ci_high": r["ci"][1],
                            "pairs": r["pairs"]} for attr, t in report["tables"].items() for r in t],
                          key=f"{key}-table", description="direction accuracy per attribute, split and rendering")
    for name in ("report.json", "attributes.png", "stage2_loss.png", "measurements.png"):
        create_link_artifact((Path(out) / name).resolve().as_uri(), link_text=name,
                             key=f"{key}-{name.replace('.', '-').replace('_', '-')}", description=name)
    return report
