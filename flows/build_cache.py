"""Prefect flow `build-cache`: thin orchestration around cache.build.build_cache.

Adds what Prefect is good at — a progress artifact while building, the norm report as markdown and
table artifacts, the run summary — and nothing else. The same function runs without Prefect in tests.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact

from cache import norms
from flows.keys import artifact_key
from cache.build import BuildConfig, BuildProgress, BuildSummary, build_cache
from cache.schema import Normalisation
from tts_core.frozen import FrozenModelsConfig


@flow(name="build-cache", log_prints=True)
def build_cache_flow(metadata: str, audio_root: str, store: str, chatterbox_dir: str | None = None,
                     text_encoder: str | None = None, device: str = "cpu", normalise_spk: bool = True,
                     normalise_xvec: bool = True, loader_threads: int = 4,
                     chunk_rows: int = 256) -> dict:
    """Validate every clip, run the frozen models once, write the Zarr store and its norm report."""
    logger = get_run_logger()
    key = artifact_key(store)
    bar = create_progress_artifact(0.0, key=f"{key}-progress", description=f"build-cache {store}")

    def on_progress(p: BuildProgress) -> None:
        if p.phase == "clips":
            update_progress_artifact(bar, 100.0 * p.done / max(p.total, 1), description=f"{p.done}/{p.total} clips")
        logger.info("%s: %d/%d", p.phase, p.done, p.total)

    cfg = BuildConfig(
        metadata=Path(metadata), audio_root=Path(audio_root), store=store,
        models=FrozenModelsConfig(chatterbox_dir=Path(chatterbox_dir) if chatterbox_dir else None,
                                  text_encoder=Path(text_encoder) if text_encoder else None, device=device),
        normalisation=Normalisation(spk_emb=normalise_spk, xvec=normalise_xvec), loader_threads=loader_threads,
        chunk_rows=chunk_rows)
    summary = build_cache(cfg, on_progress)
    update_progress_artifact(bar, 100.0)
    publish_summary(summary, key)
    for line in summary.lines():
        logger.info(line)
    return {"store": summary.store, "n_ok": summary.n_ok, "n_quarantined": summary.n_quarantined,
            "reasons": summary.reasons, "verdict": summary.report.verdict if summary.report else None}


def publish_summary(summary: BuildSummary, key: str) -> None:
    if summary.report is not None:
        create_markdown_artifact(norms.to_markdown(summary.report, f"Norm statistics — {summary.store}")
                                 + "\n" + "\n".join(f"- `{p}`" for p in summary.report_paths.values()),
                                 key=f"{key}-norm-report", description="norm statistics of the cached vectors")
        create_table_artifact(norms.table_rows(summary.report), key=f"{key}-norm-table",
                              description="norm statistics per vector type")
    create_table_artifact([{"reason": k, "clips": v} for k, v in sorted(summary.reasons.items())]
                          or [{"reason": "(none)", "clips": 0}],
                          key=f"{key}-quarantine", description="quarantined clips by reason")
