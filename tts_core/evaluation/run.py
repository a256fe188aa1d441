"""`instruct-tts evaluate`: synthesize held-out instructions of the cache and measure what they asked for.

Held-out = the stage-1 split (same rule, fraction and salt as the mapper's training), so the mapper
never saw these instruction texts. Each instruction is read back with `parse_instruction`; those that
state at least one of pitch / rate / loudness are synthesized with one fixed transcript (so pairs
differ only by instruction), measured (`measures`), and scored per attribute by direction accuracy
(`directions`). Speaker cosine: VoiceEncoder of the output vs the mapper's speaker embedding it was
conditioned on. Outputs in ``out_dir``: eval.json, report.md, eval.png and the wavs.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tts_core.corpus.reading import parse_instruction
from tts_core.evaluation.directions import ATTRIBUTES, accuracies
from tts_core.evaluation.measures import MEASURE_COLUMNS, measure

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


@dataclass
class EvalConfig:
    run_dir: str
    store: str
    out_dir: str | None = None  # default: run_dir/eval
    n_instructions: int = 24
    text: str = DEFAULT_TEXT
    seed: int = 0
    device: str = "cpu"
    max_new_tokens: int = 400
    # None: the models the run recorded (stage2.json frozen_models, tts_core.run_models); given: the same models
    # elsewhere (name + sha256 checked against the record)
    text_encoder: str | None = None
    chatterbox_dir: str | None = None
    language: str = "en"  # multilingual T3: the language of `text` (ignored by the English tokenizer)
    repetition_penalty: float | None = None  # None: the T3 family's official value (1.2 English)
    # classifier-free guidance on the instruction; None: the run's default (`Synthesizer.guidance`: 3 where stage 2
    # trained the null instruction, else 0 = unguided). The summary records the W used.
    instruction_guidance: float | None = None


def held_out_instructions(store: str, train_config: dict) -> list[str]:
    """The instruction texts stage 1 held out (its split rule, fraction, salt and split_by)."""
    from tts_core.stage1.from_store import load_stage1_data

    data = load_stage1_data(store, with_states=False)  # the split needs ids, texts, speakers — not states
    _, val = data.split_of_run(train_config)
    return sorted({data.instruction_texts[int(i)] for i in np.unique(data.captions.ids[val])})


def evaluate_run(cfg: EvalConfig, on_item=None) -> dict:
    import soundfile as sf

    from tts_core.synthesis import SamplingConfig, Synthesizer

    out = Path(cfg.out_dir or Path(cfg.run_dir) / "eval")
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    synth = Synthesizer.from_run(cfg.run_dir, device=cfg.device, text_encoder=cfg.text_encoder,
                                 chatterbox_dir=cfg.chatterbox_dir)
    w = synth.guidance(cfg.instruction_guidance)  # refused here, before any synthesis, where the run cannot
    texts = held_out_instructions(cfg.store, synth.mapper_meta.get("train_config", {}))
    chosen = [(t, parse_instruction(t)) for t in texts]
    chosen = [(t, a) for t, a in chosen if any(a[k] in (v[1], v[2]) for k, v in ATTRIBUTES.items())]
    chosen = chosen[: cfg.n_instructions]
    if not chosen:
        raise ValueError(f"{cfg.store}: no held-out instruction states a pitch, rate or loudness direction "
                         "(evaluation reads them back from the text)")
    rows = []
    for k, (instruction, attrs) in enumerate(chosen):
        res = synth.synthesize(cfg.text, instruction=instruction, seed=cfg.seed, language=cfg.language,
                               sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens,
                                                       repetition_penalty=cfg.repetition_penalty,
                                                       instruction_guidance=w))
        row = {"instruction": instruction, **attrs, "tokens": int(len(res.tokens)), "wav": None}
        if res.wav is not None and len(res.wav):
            path = out / "wavs" / f"{k:03d}.wav"
            sf.write(str(path), res.wav, res.sample_rate)
            row["wav"] = str(path)
            row.update(measure(res.wav, res.sample_rate, cfg.text))
            wav16 = res.wav if res.sample_rate == 16_000 else _resample(res.wav, res.sample_rate, 16_000)
            emb = np.asarray(synth.voice_encoder.embed_batch([wav16]), np.float32)[0]
            row["spk_cos"] = float(emb @ res.speaker_emb / (np.linalg.norm(emb) * np.linalg.norm(res.speaker_emb)
                                                            + 1e-12))
        else:
            row.update({c: math.nan for c in (*MEASURE_COLUMNS, "spk_cos")})
        rows.append(row)
        if on_item is not None:
            on_item(k + 1, len(chosen), row)
    acc = accuracies(rows)
    spk = [r["spk_cos"] for r in rows if np.isfinite(r.get("spk_cos", math.nan))]
    summary = {"config": {**asdict(cfg), "instruction_guidance": w}, "n": len(rows), "accuracy": acc,
               "spk_cos_mean": float(np.mean(spk)) if spk else None, "rows": rows}
    (out / "eval.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "report.md").write_text(to_markdown(summary))
    _plot(rows, out / "eval.png")
    summary["out_dir"] = str(out)
    return summary


def _resample(wav: np.ndarray, sr: int, target: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.asarray(wav, np.float32)), sr, target).numpy()


def to_markdown(s: dict) -> str:
    lines = [f"# Instruction following — {s['config']['run_dir']}", "",
             f"{s['n']} held-out instructions, transcript \"{s['config']['text']}\", seed {s['config']['seed']}; "
             f"repetition penalty {_official(s['config'].get('repetition_penalty'))}, instruction guidance W = "
             f"{s['config'].get('instruction_guidance', 0.0)}.",
             "Direction accuracy: of all pairs asking for opposite levels, the share measured in the asked order "
             "(0.5 = chance; pitch pairs within gender).", "",
             "| attribute | measure | accuracy | pairs |", "|---|---|---|---|"]
    for attr, v in s["accuracy"].items():
        acc = "—" if v["accuracy"] is None or not math.isfinite(v["accuracy"]) else f"{v['accuracy']:.3f}"
        lines.append(f"| {attr} ({v['low']} < {v['high']}) | {v['measure']} | {acc} | {v['pairs']} |")
    sc = s.get("spk_cos_mean")
    lines += ["", f"Speaker cosine (VoiceEncoder of the output vs the mapper's embedding): "
                  f"{'—' if sc is None else f'{sc:.3f}'}", ""]
    return "\n".join(lines)


def _official(value) -> str:
    return "the family's official value" if value is None else f"{value}"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(4 * len(ATTRIBUTES), 3.5))
    for ax, (attr, (col, low, high)) in zip(axes, ATTRIBUTES.items()):
        for x, level in enumerate((low, high)):
            ys = [r[col] for r in rows if r.get(attr) == level and np.isfinite(r.get(col, math.nan))]
            ax.scatter([x] * len(ys), ys, alpha=0.7)
        ax.set_xticks([0, 1], [low, high])
        ax.set_title(f"{attr}: {col}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
