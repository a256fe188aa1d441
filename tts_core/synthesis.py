"""Text + instruction (and/or a reference clip) → speech tokens → waveform, from a stage-2 run directory.

The conditioning is the one training used, row kind by row kind (`tts_core.stage2.data.build_batch`):

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
(`tts_core.sampling_defaults.default_instruction_guidance`: 3 where stage 2 trained the null instruction, else 0);
W > 0 on a run that never trained one is refused.

The token sequence comes from `T3.generate`, i.e. `tts_core.t3.layout.build_generation_layout` — the
same layout module that builds training batches; there is no second prefix builder here.

Vocoder (`tts_core.vocoders`): the embedded default decodes the embedded tokens with the tokenizer's own
decoder (mel-vq: Griffin-Lim; world-vq: WORLD; arrays from the run's copy, else its cache store); S3 tokens (production) are decoded by Chatterbox's S3Gen
from ``--chatterbox-dir`` (optional extra ``vocoder``), with the reference clip's voice when given, else
the mapper's x-vector. Without a vocoder `synthesize` returns the tokens and ``wav=None``, and says so.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tts_core.reference import Reference, t3_prompt
from tts_core.sampling_defaults import FAMILY_IGNORED, default_instruction_guidance, sampling_defaults
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
    # None: the run's default (`Synthesizer.guidance`)
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
        from tts_core.frozen import FrozenModelsConfig, load_speaker_models, load_text_encoder
        from tts_core.stage1.artifacts import load_mapper
        from tts_core.stage2.text_tokenizer import load_text_tokenizer
        from tts_core.stage2.train import SPEECH_CODEBOOK, build_t3

        run_dir = Path(run_dir)
        missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
        if missing:
            raise RunIncompleteError(f"{run_dir} is not a finished train-stage2 run: missing {', '.join(missing)} "
                                     "(pass the --out of train-stage2, or a checkpoints/step_* directory in it)")
        meta = json.loads((run_dir / "stage2.json").read_text())
        models = FrozenModelsConfig(chatterbox_dir=Path(chatterbox_dir) if chatterbox_dir else None,
                                    text_encoder=Path(text_encoder) if text_encoder else None, device=device)
        te = load_text_encoder(models)
        encoder, mapper, mapper_meta = load_mapper(_resolve_mapper_dir(run_dir, meta["mapper"]["dir"]),
                                                   text_encoder_identity=te, device=device)
        t3, _, _ = build_t3(str(run_dir), int(meta["instruction_dim"]), label=f"run {run_dir}")
        t3.to(device).eval()
        tokenizer = load_text_tokenizer(None, t3_dir=run_dir)
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
            try:  # Turbo decodes with s3gen_meanflow.safetensors beside it
                vocoder = s3gen_spec_for(t3.cfg.backbone, models.s3gen_path()).load(device=device)
            except VocoderUnavailable as exc:
                log.warning("%s — synthesis will return speech tokens only", exc)
        ve, _ = load_speaker_models(models)
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
    def guidance(self, w: float | None = None) -> float:
        """Instruction guidance W for this run: ``w`` as given, or the run's default when None (3 where stage 2
        trained the null instruction, else 0). W > 0 without a trained null instruction would guide against an
        embedding the T3 never saw: refused."""
        dropout = float(self.meta.get("train_config", {}).get("instruction_dropout") or 0.0)
        if w is None:
            return 0.0 if self.t3.cfg.family == "turbo" else default_instruction_guidance(dropout)
        if w > 0 and dropout <= 0:
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
        sampling = replace(sampling, instruction_guidance=self.guidance(sampling.instruction_guidance))
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


def _as_reference(reference: Reference | np.ndarray) -> Reference:
    return reference if isinstance(reference, Reference) else Reference.from_16k(reference)


def _store_codebook(url: str | None):
    if not url or ("://" not in url and not Path(url).exists()):
        return None
    from cache.writer import saved_codebook

    return saved_codebook(url)
