"""Prefect flow `lab`: thin orchestration around instruct_tts.lab.run_lab (the instruction-following lab).

Logs each step, and publishes the report (markdown, its plots embedded: `flows.pictures`), the per-attribute table
and links to the files as artifacts.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact

from flows.keys import artifact_key
from flows.pictures import picture, publish_markdown
from instruct_tts.lab import LabConfig, run_lab
from tts_core.evaluation.lab_report import to_markdown


PLOTS = {"attributes.png": "direction accuracy with intervals", "stage2_loss.png": "stage-2 loss curves",
         "measurements.png": "measured values by asked level"}


@flow(name="lab", log_prints=True)
def lab_flow(out: str = "lab", preset: str = "default", overrides: dict | None = None) -> dict:
    """``preset``: default | medium | tiny; ``overrides``: LabConfig fields (e.g. ``{"n_clips": 2000}``)."""
    logger = get_run_logger()
    report = run_lab(LabConfig.preset(preset, out=Path(out), **(overrides or {})), say=logger.info)
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
