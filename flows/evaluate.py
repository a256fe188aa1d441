"""Prefect flows `evaluate` and `synthesize`: thin wrappers publishing wav paths and tables as artifacts."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact

from flows.keys import artifact_key
from flows.pictures import picture, publish_markdown
from instruct_tts.options import eval_config
from tts_core.evaluation.run import evaluate_run, to_markdown
from tts_core.synthesis_batch import synthesize_command


@flow(name="evaluate", log_prints=True)
def evaluate_flow(run: str, store: str, out: str | None = None, n: int | None = None, text: str | None = None,
                  seed: int | None = None, device: str | None = None, max_new_tokens: int | None = None,
                  text_encoder: str | None = None, chatterbox_dir: str | None = None, language: str | None = None,
                  repetition_penalty: float | None = None, instruction_guidance: float | None = None) -> dict:
    """Synthesize held-out instructions and measure them. The parameters are `instruct-tts evaluate`'s flags
    (`--help`; None = EvalConfig's default)."""
    cfg = eval_config(locals())
    logger = get_run_logger()
    summary = evaluate_run(cfg, on_item=lambda k, n, r: logger.info("%d/%d %s", k, n, r["instruction"]))
    key = artifact_key(run, "eval")
    publish_markdown(to_markdown(summary) + "\n" + picture("eval.png", "measured values by asked level") + "\n",
                     base=summary["out_dir"], key=f"{key}-report", description="instruction-following accuracy")
    cols = ("instruction", "pitch", "rate", "loudness", "f0_hz", "rate_lps", "loudness_lufs", "spk_cos", "wav")
    create_table_artifact([{c: r.get(c) for c in cols} for r in summary["rows"]], key=f"{key}-clips",
                          description="per-instruction measurements and wav paths")
    for name in ("eval.json", "eval.png"):
        path = (Path(summary["out_dir"]) / name).resolve()
        create_link_artifact(path.as_uri(), link_text=name, key=f"{key}-{name.replace('.', '-')}",
                             description=f"evaluation {name.split('.')[1]}")
    return summary


@flow(name="synthesize", log_prints=True)
def synthesize_flow(run: str, text: str | None = None, instruction: str | None = None, reference: str | None = None,
                    out: str | None = None, batch: str | None = None, out_dir: str | None = None,
                    seed: int | None = None, device: str | None = None, text_encoder: str | None = None,
                    chatterbox_dir: str | None = None, language: str | None = None, mapper_draws: int | None = None,
                    temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                    min_p: float | None = None, repetition_penalty: float | None = None,
                    cfg_weight: float | None = None, max_new_tokens: int | None = None,
                    instruction_guidance: float | None = None) -> list[dict]:
    """`instruct-tts synthesize`: one clip (``text`` + ``instruction`` / ``reference`` -> ``out``) or a batch file
    of ``text|instruction[|reference.wav]`` lines (-> ``out_dir``, docs/deployments.md). The parameters are the
    command's flags (`--help`; None = the default it names)."""
    rows = synthesize_command(**locals())
    create_table_artifact(rows, key=artifact_key(out_dir or out, "wavs"),
                          description=f"synthesized from {batch or 'one text'}")
    return rows
