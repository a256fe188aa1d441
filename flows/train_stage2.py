"""Prefect flow `train-stage2`: thin orchestration around tts_core.stage2.train_stage2.

Progress artifact from the loop's log rows, then the run report (losses of instruction vs audio rows,
trainable parameters per group, load report) as a markdown artifact, its loss-curve picture embedded
(`flows.pictures`). TensorBoard under ``out/tb``.
Multi-GPU runs use torchrun with the CLI (README), not this flow: one flow run is one process.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.keys import artifact_key
from flows.pictures import publish_markdown
from instruct_tts.options import stage2_config
from tts_core.stage2.train import train_stage2
from tts_core.training.tb import logged


@flow(name="train-stage2", log_prints=True)
def train_stage2_flow(store: str, mapper: str, t3: str, out: str, device: str | None = None, amp: str | None = None,
                      instruction_prob: float | None = None, prompt_instruction_prob: float | None = None,
                      instruction_dropout: float | None = None, batch_size: int | None = None,
                      max_tokens: int | None = None, grad_accum: int | None = None, lr: float | None = None,
                      adapter_lr: float | None = None, epochs: int | None = None, max_steps: int | None = None,
                      warmup_steps: int | None = None, save_every: int | None = None, log_every: int | None = None,
                      hold_out: str | None = None, eval_every: int | None = None, text_tokenizer: str | None = None,
                      language: str | None = None, seed: int | None = None, compile: bool = False,
                      activation_checkpointing: bool = False, restart: bool = False) -> dict:
    """Train T3 + adapters in this one process. The parameters are `instruct-tts train-stage2`'s flags (`--help`;
    None = Stage2Config's default); ``t3``: a Chatterbox checkpoint dir or a preset (``tiny``, ``small``, ``520m``)."""
    cfg = stage2_config(locals())
    logger = get_run_logger()
    key = artifact_key(out, "stage2")
    bar = create_progress_artifact(0.0, key=f"{key}-progress", description=f"train-stage2 {out}")

    def on_log(row: dict) -> None:
        update_progress_artifact(bar, 100.0 * row["step"] / max(row.get("total_steps") or 1, 1),
                                 description=f"step {row['step']}: loss {row['loss']:.3f}")
        logger.info("step %d: loss %.4f (text %.4f, speech %.4f), %.0f tokens/s", row["step"], row["loss"],
                    row["loss_text"], row["loss_speech"], row["tokens_per_s"])

    with logged(Path(out) / "tb", "stage2", on_log) as hook:
        res = train_stage2(cfg, on_log=hook)
    update_progress_artifact(bar, 100.0, description=f"done ({res.stopped_reason})")
    publish_markdown(Path(res.run_dir, "report.md").read_text(), base=res.run_dir, key=f"{key}-report",
                     description="stage-2 losses, parameter groups, load report")
    return {"run_dir": str(res.run_dir), "global_step": res.global_step, "stopped_reason": res.stopped_reason,
            "trainable": res.trainable}
