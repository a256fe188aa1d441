"""Prefect flow `train-stage1`: thin orchestration around tts_core.stage1.train_stage1_from_store.

Publishes a progress artifact updated at every held-out evaluation, and at the end the run report
(held-out SpkCos / XVecCos / AvgCos beside the baselines) as markdown and table artifacts.
TensorBoard scalars go to ``out/tb`` either way.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from flows.keys import artifact_key
from flows.pictures import publish_markdown
from instruct_tts.options import stage1_configs
from tts_core.stage1.from_store import train_stage1_from_store
from tts_core.stage1.train import PHASES, Stage1TrainConfig

HISTORY_COLUMNS = ("phase", "epoch", "step", "train_loss", "spk_cos", "xvec_cos", "avg_cos", "improved")


def stage1_progress(row: dict, cfg: Stage1TrainConfig) -> float:
    """Percent of the run's maximum length reached at this evaluation (early stopping ends it sooner)."""
    if cfg.max_steps:
        return min(100.0, 100.0 * row["step"] / cfg.max_steps)
    phases = PHASES[cfg.phase]
    done = phases.index(row["phase"]) + min(row["epoch"] / max(cfg.epochs, 1), 1.0)
    return min(100.0, 100.0 * done / len(phases))


@flow(name="train-stage1", log_prints=True)
def train_stage1_flow(store: str, out: str, phase: str | int | None = None, init_from: str | None = None,
                      device: str | None = None, amp: str | None = None, epochs: int | None = None,
                      batch_size: int | None = None, lr: float | None = None, lr_phase2: float | None = None,
                      patience: int | None = None, eval_every: int | None = None, max_steps: int | None = None,
                      min_phase_steps: int | None = None, warmup_steps: int | None = None,
                      held_out_frac: float | None = None, split_by: str | None = None, seed: int | None = None,
                      restart: bool = False, states_in_memory_mb: float | None = None,
                      states_cache_mb: float | None = None, hidden_dim: int | None = None,
                      n_blocks: int | None = None, n_steps: int | None = None, temperature: float | None = None,
                      mapper_draws: int | None = None) -> dict:
    """Train the instruction mapper on a cache store. The parameters are `instruct-tts train-stage1`'s flags
    (`--help`; None = Stage1TrainConfig's / MapperConfig's default)."""
    cfg, mcfg = stage1_configs(locals())
    logger = get_run_logger()
    key = artifact_key(out, "stage1")
    bar = create_progress_artifact(0.0, key=f"{key}-progress", description=f"train-stage1 {out}")

    def on_epoch(row: dict) -> None:
        update_progress_artifact(bar, stage1_progress(row, cfg),
                                 description=f"phase {row['phase']} epoch {row['epoch']:.2f}: AvgCos {row['avg_cos']:.4f}")
        logger.info("phase %s epoch %.2f step %d: SpkCos %.4f XVecCos %.4f AvgCos %.4f (mean %.4f, NN %.4f)",
                    row["phase"], row["epoch"], row["step"], row["spk_cos"], row["xvec_cos"], row["avg_cos"],
                    row["mean_avg_cos"], row["nn_avg_cos"])

    res = train_stage1_from_store(store, cfg, mcfg, on_epoch=on_epoch)
    update_progress_artifact(bar, 100.0, description=f"done ({res.stopped_reason})")
    publish_markdown(Path(res.run_dir, "report.md").read_text(), base=res.run_dir, key=f"{key}-report",
                     description="stage-1 held-out cosines vs baselines")
    create_table_artifact([{k: h.get(k) for k in HISTORY_COLUMNS} for h in res.history] or [{"step": 0}],
                          key=f"{key}-history", description="held-out evaluations")
    return {"run_dir": str(res.run_dir), "best": res.best, "baselines": res.baselines,
            "stopped_reason": res.stopped_reason, "global_step": res.global_step}
