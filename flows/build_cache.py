"""Prefect flow `build-cache`: thin orchestration around tts_core.cachebuild.build.build_cache.

Adds what Prefect is good at — a progress artifact while building, the norm report as markdown and
table artifacts, the run summary — and, with ``task_runner="dask"``, fanning the clip shards out to a
Dask cluster through prefect-dask: each shard is one `encode-shard` task run on a worker (models loaded
once per worker process); this process commits the results in row order (tts_core/cachebuild/shards.py says why).
``cluster`` is a scheduler address (``tcp://host:8786``); without one a local cluster of ``workers``
processes is started. Dask rather than Ray: the cache build is a map over independent numpy/torch
shards with modest payloads — Dask's home ground — prefect-dask is maintained with Prefect itself, and
`distributed` is a pure-Python install that runs the same on a laptop and on a cluster.
"""
from __future__ import annotations


from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from cache import norms
from tts_core.cachebuild.build import BuildConfig, BuildProgress, BuildSummary, build_cache
from tts_core.cachebuild.shards import encode_shard, ordered_window
from flows.keys import artifact_key
from flows.pictures import picture, publish_markdown
from instruct_tts.options import DASK_LOCAL_WORKERS, TASK_RUNNERS, build_config


@flow(name="build-cache", log_prints=True)
def build_cache_flow(metadata: str, audio_root: str, store: str, chatterbox_dir: str | None = None,
                     text_encoder: str | None = None, device: str | None = None, raw_spk: bool = False,
                     raw_xvec: bool = False, loader_threads: int | None = None, chunk_rows: int | None = None,
                     allow_outside_root: bool = False, speech_tokenizer: str | None = None,
                     task_runner: str = "local", cluster: str | None = None,
                     workers: int = DASK_LOCAL_WORKERS) -> dict:
    """Validate every clip, run the frozen models once, write the Zarr store and its norm report. The parameters
    are `instruct-tts build-cache`'s flags (`--help`; None = the config's default)."""
    cfg = build_config(locals())
    if task_runner == "local":
        return _build(cfg, shard_map=None)
    if task_runner not in TASK_RUNNERS:
        raise ValueError(f"task_runner must be one of {', '.join(TASK_RUNNERS)}, not {task_runner!r}")
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=cluster) if cluster else
              DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": True, "threads_per_worker": 1}))
    return _build_on_dask.with_options(task_runner=runner)(cfg, window=4 * max(workers, 1))


encode_shard_task = task(encode_shard, name="encode-shard", cache_policy=None, retries=1)


@flow(name="build-cache-shards", log_prints=True)
def _build_on_dask(cfg: BuildConfig, window: int) -> dict:
    """The clip shards on the flow's (Dask) task runner; writing stays in this process."""
    def shard_map(jobs):
        return ordered_window(lambda j: encode_shard_task.submit(j), lambda f: f.result(), jobs, window)

    return _build(cfg, shard_map=shard_map)


def _build(cfg: BuildConfig, shard_map) -> dict:
    logger = get_run_logger()
    key = artifact_key(cfg.store)
    bar = create_progress_artifact(0.0, key=f"{key}-progress", description=f"build-cache {cfg.store}")

    def on_progress(p: BuildProgress) -> None:
        if p.phase == "clips":
            update_progress_artifact(bar, 100.0 * p.done / max(p.total, 1), description=f"{p.done}/{p.total} clips")
        logger.info("%s: %d/%d", p.phase, p.done, p.total)

    summary = build_cache(cfg, on_progress, shard_map=shard_map)
    update_progress_artifact(bar, 100.0)
    publish_summary(summary, key)
    for line in summary.lines():
        logger.info(line)
    return {"store": summary.store, "n_ok": summary.n_ok, "n_quarantined": summary.n_quarantined,
            "reasons": summary.reasons, "verdict": summary.report.verdict if summary.report else None}


def publish_summary(summary: BuildSummary, key: str) -> None:
    if summary.report is not None:
        publish_markdown(norms.to_markdown(summary.report, f"Norm statistics — {summary.store}")
                         + "\n" + "\n".join(f"- `{p}`" for p in summary.report_paths.values())
                         + ("\n\n" + picture(summary.report_paths["png"], "norm histograms")
                            if "png" in summary.report_paths else ""),
                         key=f"{key}-norm-report", description="norm statistics of the cached vectors")
        create_table_artifact(norms.table_rows(summary.report), key=f"{key}-norm-table",
                              description="norm statistics per vector type")
    create_table_artifact([{"reason": k, "clips": v} for k, v in sorted(summary.reasons.items())]
                          or [{"reason": "(none)", "clips": 0}],
                          key=f"{key}-quarantine", description="quarantined clips by reason")
