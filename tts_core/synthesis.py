"""Text + instruction (and/or a reference clip) → speech tokens → waveform, from a stage-2 run directory.

The conditioning is the one training used, row kind by row kind (`tts_core.stage2.mixing.build_batch`):

* instruction only: speaker embedding = the frozen mapper's sample for the instruction, no prompt tokens,
  instruction embedding on (adapters active);
* reference only (Chatterbox's way, `tts_core.reference`): the clip loaded at 24 kHz and resampled to
  16 kHz; speaker embedding = VoiceEncoder of the whole 16 kHz clip, prompt = the S3 tokens of its first
  6 s (≤ ``prompt_len``), instruction masked out;
* both: the reference's speaker embedding and prompt, with the instruction embedding on (stage 2 trains
  this row kind with ``prompt_instruction_prob``).

Instruction guidance (``SamplingConfig.instruction_guidance`` W): the unconditional branch is the same
conditioning with the null instruction (`T3Cond.with_null_instruction`, what stage 2's instruction dropout
trains); W = 0 is the unguided path. Left unset, W is the run's default
(`tts_core.sampling_defaults.default_instruction_guidance`: 3 where stage 2 trained the null instruction, else 0;
with a reference clip as well, `tts_core.recipe.REFERENCE_INSTRUCTION_GUIDANCE`, which keeps more of the voice);
W > 0 on a run that never trained one is refused.

The token sequence comes from `T3.generate`, i.e. `tts_core.t3.layout.build_generation_layout` — the
same layout module that builds training batches; there is no second prefix builder here.

Vocoder (`tts_core.vocoders`): the embedded default decodes the embedded tokens with the tokenizer's own
decoder (mel-vq: Griffin-Lim; world-vq: WORLD; arrays from the run's copy, else its cache store); S3 tokens (production) are decoded by Chatterbox's S3Gen
from the Chatterbox files the run recorded, or ``--chatterbox-dir`` (optional extra ``vocoder``), with the reference
clip's voice when given, else the mapper's x-vector. Without a vocoder `synthesize` returns the tokens and ``wav=None``,
and says so; `InstructTTS.generate` (the Python API) refuses instead.

Frozen models (`tts_core.run_models`): `Synthesizer.from_run` loads the text encoder, voice encoder and Chatterbox
files the run recorded (``stage2.json`` ``frozen_models``); ``--text-encoder`` / ``--chatterbox-dir`` only move them
and must hold the same models (name + sha256). A run written before those records loads as it always did.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tts_core.reference import Reference, t3_prompt
from tts_core.sampling_defaults import (
    FAMILY_IGNORED, default_instruction_guidance, sampling_defaults, trained_null_instruction,
)
from tts_core.t3.model import T3Cond
from tts_core.t3.families import FAMILIES

log = logging.getLogger(__name__)

RUN_FILES = ("t3_cfg.safetensors", "stage2.json")


class RunIncompleteError(FileNotFoundError):
    """A run directory is missing what synthesis needs; the message lists each missing piece."""


class SamplingOptionError(ValueError):
    """A sampling option the run's T3 family does not have (e.g. --top-k for an English T3)."""


@dataclass
class SamplingConfig:
    """Sampling options; ``None`` takes the T3 family's official `generate` default
    (`tts_core.sampling_defaults.FAMILY_SAMPLING`: e.g. top_p 1.0 English, 0.95 Turbo)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # Turbo only
    min_p: float | None = None
    repetition_penalty: float | None = None
    cfg_weight: float | None = None
    max_new_tokens: int = 1000
    # classifier-free guidance on the instruction (`T3.generate`): 0 = unguided, today's tokens exactly;
    # composes with cfg_weight as cond + cfg_weight·(cond − text_uncond) + W·(cond − null_instruction).
    # None: the run's default (`Synthesizer.guidance`, from `tts_core.sampling_defaults.default_instruction_guidance`);
    # `for_family` passes only a W resolved that way, or given
    instruction_guidance: float | None = None

    def for_family(self, family: str) -> dict:
        """The keyword arguments the family's `generate` gets: its defaults, overridden by what was given.
        An option the family has no use for is an error, except those its official `generate` ignores
        with a warning (Turbo: min_p, cfg_weight), which pass through so ours warns the same way."""
        out = sampling_defaults(family)
        given = {k: v for k, v in asdict(self).items()
                 if v is not None and k not in ("max_new_tokens", "instruction_guidance")}
        unknown = sorted(set(given) - set(out) - set(FAMILY_IGNORED.get(family, ())))
        if unknown:
            raise SamplingOptionError(f"the {family} T3 does not sample with {', '.join(unknown)} "
                             f"(its options: {', '.join(sorted(out))})")
        out = {**out, **given}
        if self.instruction_guidance:
            if family == "turbo":
                raise SamplingOptionError("the turbo T3 has no instruction guidance (its generate runs one row)")
            out["instruction_guidance"] = float(self.instruction_guidance)
        return out


@dataclass
class SynthResult:
    tokens: np.ndarray  # speech tokens, EOS removed
    wav: np.ndarray | None  # float32 mono, None without a vocoder
    sample_rate: int
    speaker_emb: np.ndarray  # [256] what T3 was conditioned on
    x_vector: np.ndarray | None  # [192] the mapper's x-vector (instruction) — S3Gen's speaker slot


def _resolve_mapper_dir(run_dir: Path, recorded: str) -> Path:
    for cand in (Path(recorded), run_dir.parent / Path(recorded).name, run_dir / "mapper"):
        if (cand / "mapper.safetensors").is_file() or cand.suffix == ".safetensors" and cand.is_file():
            return cand
    raise RunIncompleteError(f"{run_dir}: the stage-1 mapper it was trained with ({recorded}) is not there, nor "
                             f"beside the run; copy the mapper run directory to {run_dir / 'mapper'}")


class Synthesizer:
    def __init__(self, t3, tokenizer, encoder, mapper, text_encoder, meta: dict, vocoder=None, speech_tokenizer=None,
                 voice_encoder=None):
        self.t3, self.tokenizer, self.encoder, self.mapper = t3, tokenizer, encoder, mapper
        self.text_encoder, self.meta, self.vocoder = text_encoder, meta, vocoder
        self.speech_tokenizer, self.voice_encoder = speech_tokenizer, voice_encoder
        self.prompt_len = int(meta.get("prompt_len") or t3.cfg.speech_cond_prompt_len)
        self.emotion_adv = float(meta.get("emotion_adv", 0.5))
        self.language = meta.get("language")  # default language of a multilingual run
        self.mapper_meta: dict = {}

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", text_encoder: str | Path | None = None,
                 chatterbox_dir: str | Path | None = None) -> "Synthesizer":
        """Load a finished train-stage2 run (or one of its ``checkpoints/step_*``). The frozen models are the ones
        the run recorded (``stage2.json`` ``frozen_models``, `tts_core.run_models`): ``text_encoder`` /
        ``chatterbox_dir`` override their location and must hold the same models (name + sha256); a recorded path
        that is gone or holds other weights is refused by name (`RunModelMissing`, `RunModelMismatch`). A run from
        before records loads the embedded defaults unless told otherwise, as it always did."""
        from tts_core.frozen import load_speaker_models, load_text_encoder
        from tts_core.run_models import resolve_run_models
        from tts_core.stage1.artifacts import load_mapper
        from tts_core.stage2.text_tokenizer import load_text_tokenizer
        from tts_core.stage2.artifacts import SPEECH_CODEBOOK
        from tts_core.stage2.model import build_t3

        run_dir = Path(run_dir)
        missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
        if missing:
            raise RunIncompleteError(f"{run_dir} is not a finished train-stage2 run: missing {', '.join(missing)} "
                                     "(pass the --out of train-stage2, or a checkpoints/step_* directory in it)")
        meta = json.loads((run_dir / "stage2.json").read_text())
        run = f"the run {run_dir}"
        located = resolve_run_models(meta.get("frozen_models"), text_encoder=text_encoder,
                                     chatterbox_dir=chatterbox_dir, run=run)
        models = located.frozen_config(device)
        te = load_text_encoder(models)
        located.check("text_encoder", te, run)
        encoder, mapper, mapper_meta = load_mapper(_resolve_mapper_dir(run_dir, meta["mapper"]["dir"]),
                                                   text_encoder_identity=te, device=device)
        t3, _, _ = build_t3(str(run_dir), int(meta["instruction_dim"]), label=f"run {run_dir}")
        t3.to(device).eval()
        tokenizer = load_text_tokenizer(None, t3_dir=run_dir)
        ve, xv = load_speaker_models(models)
        located.check("voice_encoder", ve, run)
        located.check("xvector", xv, run)
        speech_tok = vocoder = None
        own = next((d / SPEECH_CODEBOOK for d in (run_dir, run_dir.parent.parent) if (d / SPEECH_CODEBOOK).is_file()),
                   None)  # the run's own copy (a checkpoints/step_* dir: its run's)
        codebook = None if own else _store_codebook(meta.get("store", {}).get("url"))
        if own or codebook is not None:
            from tts_core.encoders import embedded

            speech_tok = embedded.load_file(own) if own else embedded.restore(codebook)
            vocoder = embedded.EmbeddedVocoder(speech_tok)
        elif models.s3gen_path():
            from tts_core.encoders.s3_tokenizer import S3SpeechTokenizer
            from tts_core.vocoders import VocoderUnavailable, s3gen_spec_for

            speech_tok = S3SpeechTokenizer.from_s3gen(models.s3gen_path(), device=device)
            located.check("speech_tokenizer", speech_tok, run)
            try:  # Turbo decodes with s3gen_meanflow.safetensors beside it
                vocoder = s3gen_spec_for(t3.cfg.backbone, models.s3gen_path()).load(device=device)
            except VocoderUnavailable as exc:
                log.warning("%s — synthesis will return speech tokens only", exc)
        synth = cls(t3, tokenizer, encoder, mapper, te, meta, vocoder=vocoder, speech_tokenizer=speech_tok,
                    voice_encoder=ve)
        synth.mapper_meta = mapper_meta
        return synth

    # ---- conditioning ------------------------------------------------------------------------------
    def condition(self, instruction: str | None = None, reference: Reference | np.ndarray | None = None,
                  seed: int = 0, mapper_draws: int | None = None) -> tuple[T3Cond, np.ndarray | None]:
        """T3Cond for one utterance (module doc) and the mapper's x-vector (instruction given).
        ``mapper_draws``: mapper draws averaged (default: what the stage-1 run recorded; 1 = one draw, the most
        voice variety across seeds)."""
        if instruction is None and reference is None:
            raise ValueError("give an instruction, a reference clip, or both")
        xv = None
        style = torch.zeros(1, self.encoder.hidden_size)
        if instruction is not None:
            with torch.no_grad():
                style = self.encoder.encode_text([instruction], self.text_encoder).float()
                spk, xv_t = self.mapper.inference(style, seed=seed, draws=mapper_draws)
            xv = xv_t[0].cpu().numpy()
        if reference is not None:
            if self.speech_tokenizer is None or self.voice_encoder is None:
                raise RunIncompleteError("a reference clip needs the speech tokenizer: pass --chatterbox-dir")
            spk_np, prompt = t3_prompt(_as_reference(reference), self.voice_encoder, self.speech_tokenizer,
                                       self.prompt_len, FAMILIES[self.t3.cfg.family].prompt_seconds)
            spk = torch.from_numpy(spk_np)[None]
            prompt_t, plen = torch.from_numpy(prompt)[None], torch.tensor([len(prompt)])
        else:
            prompt_t, plen = torch.zeros(1, 1, dtype=torch.long), torch.tensor([0])
        inst = torch.tensor([instruction is not None])
        cond = T3Cond(speaker_emb=spk.reshape(1, -1), prompt_tokens=prompt_t, prompt_lens=plen,
                      emotion_adv=self.emotion_adv, instruction_emb=style if instruction is not None
                      else torch.zeros_like(style), instruction_mask=inst)
        return cond, xv

    # ---- synthesis ----------------------------------------------------------------------------------
    @property
    def null_instruction(self) -> bool:
        """Whether stage 2 trained the null instruction (`tts_core.sampling_defaults.trained_null_instruction` of
        ``stage2.json``)."""
        return trained_null_instruction(self.meta)

    def guidance(self, w: float | None = None, reference: bool = False) -> float:
        """Instruction guidance W for this run: ``w`` as given, or the run's default when None
        (`tts_core.sampling_defaults.default_instruction_guidance`: 3 where stage 2 trained the null instruction, a
        lower W when a ``reference`` clip is given too, else 0). W > 0 without a trained null instruction would guide
        against an embedding the T3 never saw: refused."""
        if w is None:
            return default_instruction_guidance(self.meta, self.t3.cfg.family, reference=reference)
        if w > 0 and not self.null_instruction:
            raise SamplingOptionError(f"instruction guidance W = {w:g} needs a run whose stage 2 trained the null "
                                      "instruction (train-stage2 --instruction-dropout > 0; this run's is 0): "
                                      "use W 0 here, or retrain")
        return float(w)

    def synthesize(self, text: str, instruction: str | None = None, reference: Reference | np.ndarray | None = None,
                   seed: int = 0, sampling: SamplingConfig = SamplingConfig(), language: str | None = None,
                   mapper_draws: int | None = None) -> SynthResult:
        """``reference``: a `Reference` (``Reference.load(path)``: Chatterbox's loading) or a 16 kHz array.
        ``language``: the multilingual T3's text language (default: the run's ``--language``).
        ``mapper_draws``: see `condition`."""
        reference = None if reference is None else _as_reference(reference)
        cond, xv = self.condition(instruction, reference, seed, mapper_draws)
        ids = self.tokenizer.encode(text, language or self.language)
        g = torch.Generator(device=self.t3.device).manual_seed(int(seed))
        sampling = replace(sampling, instruction_guidance=self.guidance(sampling.instruction_guidance,
                                                                        reference=reference is not None))
        tokens = self.t3.generate(torch.tensor([ids]), torch.tensor([len(ids)]), cond,
                                  max_new_tokens=sampling.max_new_tokens, generator=g,
                                  **sampling.for_family(self.t3.cfg.family))[0].cpu().numpy()
        wav, sr = None, 16_000
        if self.vocoder is not None:
            torch.manual_seed(int(seed))  # S3Gen's flow matching starts from noise: seeded, so runs repeat
            wav, sr = self.vocoder.decode(tokens, x_vector=xv, reference=reference), self.vocoder.sample_rate
        else:
            log.warning("no vocoder for S3 tokens (pass --chatterbox-dir and install the `vocoder` extra): "
                        "returning speech tokens only")
        return SynthResult(tokens=tokens, wav=wav, sample_rate=sr,
                           speaker_emb=cond.speaker_emb[0].float().cpu().numpy(), x_vector=xv)


class VocoderMissingError(RunIncompleteError):
    """`generate` needs a waveform, and this run has no vocoder for its speech tokens."""


class InstructTTS(Synthesizer):
    """The Python API, in Chatterbox's own style::

        from instruct_tts import InstructTTS
        model = InstructTTS.from_run("runs/t3", device="cuda")
        wav = model.generate("Hello there.", instruction="A deep, slow male voice.")   # [1, N] float32 at model.sr
        torchaudio.save("a.wav", wav, model.sr)

    ``from_run(run_dir, device="cpu", text_encoder=None, chatterbox_dir=None)`` loads the run with the frozen models it
    recorded (`Synthesizer.from_run`); `generate` is `synthesize` (the ``synthesize`` command's path) returning the
    waveform as a tensor."""

    @property
    def sr(self) -> int | None:
        """Sample rate of `generate`'s output (the vocoder's); None when the run has no vocoder."""
        return int(self.vocoder.sample_rate) if self.vocoder is not None else None

    def generate(self, text: str, instruction: str | None = None, audio_prompt_path: str | Path | None = None, *,
                 seed: int = 0, language_id: str | None = None, mapper_draws: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None, cfg_weight: float | None = None,
                 max_new_tokens: int = 1000, instruction_guidance: float | None = None) -> torch.Tensor:
        """``text`` spoken as ``instruction`` says, and/or in the voice of the clip at ``audio_prompt_path`` (loaded as
        Chatterbox loads it) → float32 tensor [1, N] at `sr`. The sampling keywords are the ``synthesize`` command's
        (`SamplingConfig`; None = the T3 family's official value, ``instruction_guidance`` None = the run's default);
        ``language_id``: a multilingual T3's text language (default: the run's). Same seed, same waveform as
        ``instruct-tts synthesize --seed``."""
        if self.vocoder is None:
            raise VocoderMissingError(
                "this run's speech tokens need a vocoder to become a waveform, and none loaded: S3 tokens are decoded "
                "by Chatterbox's S3Gen, so pass chatterbox_dir= (the directory with s3gen.safetensors) to from_run "
                "unless the run recorded it, and install the `vocoder` extra; or call synthesize() for the tokens")
        reference = None if audio_prompt_path is None else Reference.load(audio_prompt_path)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                  repetition_penalty=repetition_penalty, cfg_weight=cfg_weight,
                                  max_new_tokens=max_new_tokens, instruction_guidance=instruction_guidance)
        res = self.synthesize(text, instruction=instruction, reference=reference, seed=seed, sampling=sampling,
                              language=language_id, mapper_draws=mapper_draws)
        return torch.from_numpy(np.asarray(res.wav, dtype=np.float32).copy()).reshape(1, -1)


def _as_reference(reference: Reference | np.ndarray) -> Reference:
    return reference if isinstance(reference, Reference) else Reference.from_16k(reference)


def _store_codebook(url: str | None):
    if not url or ("://" not in url and not Path(url).exists()):
        return None
    from cache.writer import saved_codebook

    return saved_codebook(url)
