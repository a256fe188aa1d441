"""Prefect flows `evaluate` and `synthesize`: thin wrappers publishing wav paths and tables as artifacts."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact

from flows.keys import artifact_key
from flows.pictures import picture, publish_markdown
from tts_core.evaluation.run import EvalConfig, evaluate_run, to_markdown


@flow(name="evaluate", log_prints=True)
def evaluate_flow(run_dir: str, store: str, out_dir: str | None = None, n_instructions: int = 24,
                  text: str = EvalConfig.text, seed: int = 0, device: str = "cpu", max_new_tokens: int = 400,
                  text_encoder: str | None = None, chatterbox_dir: str | None = None, language: str = "en",
                  repetition_penalty: float | None = None, instruction_guidance: float | None = None) -> dict:
    logger = get_run_logger()
    cfg = EvalConfig(run_dir=run_dir, store=store, out_dir=out_dir, n_instructions=n_instructions, text=text,
                     seed=seed, device=device, max_new_tokens=max_new_tokens, text_encoder=text_encoder,
                     chatterbox_dir=chatterbox_dir, language=language, repetition_penalty=repetition_penalty,
                     instruction_guidance=instruction_guidance)
    summary = evaluate_run(cfg, on_item=lambda k, n, r: logger.info("%d/%d %s", k, n, r["instruction"]))
    key = artifact_key(run_dir, "eval")
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
def synthesize_flow(run_dir: str, batch: str, out_dir: str, seed: int = 0, device: str = "cpu",
                    max_new_tokens: int = 1000) -> list[dict]:
    """``batch``: a file of ``text|instruction[|reference.wav]`` lines (instruction may be empty)."""
    import soundfile as sf

    from tts_core.reference import Reference
    from tts_core.synthesis import SamplingConfig, Synthesizer

    synth = Synthesizer.from_run(run_dir, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, line in enumerate(Path(batch).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 2 or not (parts[1].strip() or (len(parts) > 2 and parts[2].strip())):
            raise ValueError(f"{batch}:{n}: expected text|instruction[|reference.wav] with an instruction or a "
                             f"reference, got {line!r}")
        text, instruction = parts[0], parts[1].strip() or None
        ref = Reference.load(parts[2].strip()) if len(parts) > 2 and parts[2].strip() else None
        res = synth.synthesize(text, instruction=instruction, reference=ref, seed=seed,
                               sampling=SamplingConfig(max_new_tokens=max_new_tokens))
        path = out / f"{n:04d}.wav"
        if res.wav is not None:
            sf.write(str(path), res.wav, res.sample_rate)
        rows.append({"line": n, "text": text, "instruction": instruction or "", "reference": parts[2] if len(parts) > 2
                     else "", "wav": str(path) if res.wav is not None else "", "tokens": int(len(res.tokens))})
    create_table_artifact(rows, key=artifact_key(out_dir, "wavs"), description=f"synthesized from {batch}")
    return rows
