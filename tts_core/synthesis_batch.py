"""The `synthesize` command (and the `synthesize/-` deployment): one clip, or a batch file of them.

One function, `synthesize_command`, takes the command's options by their flag names and writes the wavs (and each
clip's speech tokens beside it as ``.tokens.npy``); the CLI prints its rows, the Prefect flow publishes them.

Batch file: one clip a line, ``text|instruction[|reference.wav]``. The instruction may be empty when a reference
is given; a relative reference path is relative to the batch file's folder; blank lines and lines starting with
``#`` are skipped; the text cannot hold a ``|``. Clip ``N`` (its line number) is written to ``OUT_DIR/NNNN.wav``.
Every line is checked before any model is loaded; a bad one is named as ``FILE:LINE``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BATCH_FORMAT = "text|instruction[|reference.wav] (the instruction may be empty when a reference is given)"


class SynthesizeRequestError(ValueError):
    """Options or a batch line that do not say what to synthesize."""


@dataclass
class SynthesisRun:
    """The options of `synthesize` that are not the clip's own (sampling: `tts_core.synthesis.SamplingConfig`)."""

    run: str
    seed: int = 0
    device: str = "cpu"
    text_encoder: str | None = None  # None: the text encoder the run recorded
    chatterbox_dir: str | None = None  # None: the models the run recorded
    language: str | None = None  # multilingual T3: None = the run's --language
    mapper_draws: int | None = None  # None: the stage-1 run's `draws`


@dataclass
class Clip:
    text: str
    instruction: str | None
    reference: Path | None
    out: Path  # the wav; tokens beside it as .tokens.npy
    line: int | None = None  # batch-file line


def read_batch(path: str | Path, out_dir: str | Path) -> list[Clip]:
    """The clips of a batch file (module doc), every line checked; `SynthesizeRequestError` names FILE:LINE."""
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise SynthesizeRequestError(f"batch file {path} not found")
    clips = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]

        def bad(what: str) -> SynthesizeRequestError:
            return SynthesizeRequestError(f"{path}:{n}: {what}; each line is {BATCH_FORMAT}, got {raw!r}")

        if len(parts) < 2:
            raise bad("no '|' after the text: give an instruction, a reference clip, or both")
        if len(parts) > 3:
            raise bad(f"{len(parts)} fields: at most text|instruction|reference (the text cannot hold a '|')")
        if not parts[0]:
            raise bad("the text is empty")
        reference = None
        if len(parts) == 3 and parts[2]:
            reference = Path(parts[2]) if Path(parts[2]).is_absolute() else path.parent / parts[2]
            if not reference.is_file():
                raise bad(f"reference clip {reference} not found (a relative path is relative to the batch file)")
        if not parts[1] and reference is None:
            raise bad("neither an instruction nor a reference clip")
        clips.append(Clip(text=parts[0], instruction=parts[1] or None, reference=reference,
                          out=out_dir / f"{n:04d}.wav", line=n))
    if not clips:
        raise SynthesizeRequestError(f"{path}: no lines to synthesize (blank lines and # comments are skipped)")
    return clips


def clips_of(text: str | None = None, instruction: str | None = None, reference: str | None = None,
             out: str | None = None, batch: str | None = None, out_dir: str | None = None) -> list[Clip]:
    """What to synthesize: one clip (``text`` + ``instruction`` and/or ``reference`` -> ``out``) or a batch file
    (-> ``out_dir``)."""
    if batch is not None:
        extra = [f"--{k.replace('_', '-')}" for k, v in (("text", text), ("instruction", instruction),
                                                         ("reference", reference), ("out", out)) if v is not None]
        if extra:
            raise SynthesizeRequestError(f"--batch takes texts, instructions and references from the file: drop "
                                         f"{', '.join(extra)} (the wavs go to --out-dir)")
        if out_dir is None:
            raise SynthesizeRequestError("--batch needs --out-dir: where its wavs go (NNNN.wav, NNNN = the line)")
        return read_batch(batch, out_dir)
    if out_dir is not None:
        raise SynthesizeRequestError("--out-dir goes with --batch; one clip is written to --out")
    if text is None or out is None:
        raise SynthesizeRequestError("give --text and --out (one clip), or --batch FILE and --out-dir DIR")
    if instruction is None and reference is None:
        raise SynthesizeRequestError("give --instruction, --reference, or both")
    return [Clip(text=text, instruction=instruction, reference=None if reference is None else Path(reference),
                 out=Path(out))]


def synthesize_command(run: str, text: str | None = None, instruction: str | None = None,
                       reference: str | None = None, out: str | None = None, batch: str | None = None,
                       out_dir: str | None = None, **options) -> list[dict]:
    """The `synthesize` command: ``options`` are the rest of its flags (`SynthesisRun`'s fields and
    `SamplingConfig`'s; None = their default). Returns one row per clip written."""
    import numpy as np

    from tts_core.reference import Reference
    from tts_core.synthesis import SamplingConfig, Synthesizer

    clips = clips_of(text, instruction, reference, out, batch, out_dir)  # every line checked before a model loads
    given = {k: v for k, v in options.items() if v is not None}
    sampling_fields = set(SamplingConfig.__dataclass_fields__)
    unknown = set(options) - sampling_fields - set(SynthesisRun.__dataclass_fields__)
    if unknown:
        raise TypeError(f"synthesize has no option {', '.join(sorted(unknown))}")
    sampling = SamplingConfig(**{k: v for k, v in given.items() if k in sampling_fields})
    job = SynthesisRun(run=str(run), **{k: v for k, v in given.items() if k not in sampling_fields})
    synth = Synthesizer.from_run(job.run, device=job.device, text_encoder=job.text_encoder,
                                 chatterbox_dir=job.chatterbox_dir)
    rows = []
    for clip in clips:
        ref = None if clip.reference is None else Reference.load(clip.reference)
        res = synth.synthesize(clip.text, instruction=clip.instruction, reference=ref, seed=job.seed,
                               sampling=sampling, language=job.language, mapper_draws=job.mapper_draws)
        clip.out.parent.mkdir(parents=True, exist_ok=True)
        tokens = clip.out.with_suffix(".tokens.npy")
        np.save(tokens, res.tokens)
        if res.wav is not None:
            import soundfile as sf

            sf.write(str(clip.out), res.wav, res.sample_rate)
        rows.append({"line": clip.line, "text": clip.text, "instruction": clip.instruction or "",
                     "reference": str(clip.reference or ""), "wav": str(clip.out) if res.wav is not None else "",
                     "tokens_file": str(tokens), "tokens": int(len(res.tokens)),
                     "seconds": round(len(res.wav) / res.sample_rate, 3) if res.wav is not None else None})
    return rows
