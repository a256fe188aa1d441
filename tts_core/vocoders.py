"""Speech tokens → waveform. One interface, two implementations:

* `EmbeddedVocoder` (tts_core.encoders.embedded) decodes the embedded tokenizers' tokens (mel-vq: Griffin-Lim;
  world-vq: WORLD synthesis);
* `S3GenVocoder` decodes S3 tokens with Chatterbox's S3Gen from a local ``s3gen.safetensors`` / ``s3gen.pt``,
  using the ``chatterbox-tts`` package's module (the optional extra ``vocoder``; docs/vocoder.md says why
  not a port). Speaker identity: the reference clip when given (S3Gen's own ``embed_ref`` over the
  clip's first 10 s at 24 kHz, as Chatterbox's ``prepare_conditionals``: prompt tokens, prompt mel and
  CAM++ x-vector — `tts_core.reference`), else the stage-1 mapper's predicted x-vector with an empty
  prompt.

Two S3Gen kinds, told apart by their weights (`S3GenSpec`): the standard one (``s3gen.safetensors`` /
``s3gen.pt``, 10 flow-matching steps) and Chatterbox Turbo's meanflow one (``s3gen_meanflow.safetensors``:
``S3Gen(meanflow=True)``, one extra key ``flow.decoder.estimator.time_embed_mixer.weight``, 2 steps,
decoded through ``S3Gen.inference`` with 3 trailing silence tokens as ``ChatterboxTurboTTS.generate``
does). Loading is strict both ways: a meanflow file asked of a standard S3Gen, or the reverse, is an
error (a non-strict load would silently drop the mixer and decode with the wrong solver).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tts_core.encoders.embedded import EmbeddedVocoder  # re-exported: the embedded tokenizers' own decoder
from tts_core.reference import S3GEN_SR, S3_SR, Reference, s3gen_audio

log = logging.getLogger(__name__)

S3_VOCAB = 6561  # valid S3 speech tokens are 0..6560 (T3's BOS/EOS are 6561/6562)
CFM_STEPS = 10  # flow-matching steps of S3Gen's decoder (Chatterbox's default for the non-meanflow model)
MEANFLOW_STEPS = 2  # ChatterboxTurboTTS.generate: n_cfm_timesteps=2
MEANFLOW_KEY = "flow.decoder.estimator.time_embed_mixer.weight"  # only a meanflow S3Gen has it
S3GEN_FILE, S3GEN_MEANFLOW_FILE = "s3gen.safetensors", "s3gen_meanflow.safetensors"
S3GEN_SILENCE = 4299  # chatterbox.models.s3gen.const.S3GEN_SIL: Turbo appends 3 before decoding


class VocoderUnavailable(ImportError):
    """The optional S3Gen dependency is not installed."""


def _s3gen_class():
    try:
        from chatterbox.models.s3gen import S3Gen
    except ImportError as exc:
        raise VocoderUnavailable(
            "S3 tokens need Chatterbox's S3Gen: install the optional extra with `uv sync --extra vocoder` "
            f"(chatterbox-tts); import failed: {exc}") from exc
    return S3Gen


def _kind(meanflow: bool) -> str:
    return f"meanflow ({S3GEN_MEANFLOW_FILE}, Chatterbox Turbo)" if meanflow else f"standard ({S3GEN_FILE})"


@dataclass(frozen=True)
class S3GenSpec:
    """Which S3Gen a T3 family decodes with; loaded only when synthesis needs it (`load`)."""

    path: Path
    meanflow: bool = False
    cfm_steps: int = CFM_STEPS
    trailing_silence: int = 0  # S3GEN_SILENCE tokens appended to the speech tokens before decoding

    @classmethod
    def standard_in(cls, directory: str | Path) -> "S3GenSpec":
        return cls(Path(directory) / S3GEN_FILE)

    @classmethod
    def meanflow_in(cls, directory: str | Path) -> "S3GenSpec":
        return cls(Path(directory) / S3GEN_MEANFLOW_FILE, meanflow=True, cfm_steps=MEANFLOW_STEPS, trailing_silence=3)

    def load(self, device: str = "cpu") -> "S3GenVocoder":
        return S3GenVocoder.from_file(self.path, device=device, spec=self)


def s3gen_spec_for(backbone: str, s3gen_path: str | Path) -> S3GenSpec:
    """The S3Gen a T3 decodes with: Turbo's GPT-2 T3 the meanflow one in the same Chatterbox directory as
    ``s3gen_path``, the Llama T3s ``s3gen_path`` itself."""
    s3gen_path = Path(s3gen_path)
    return S3GenSpec.meanflow_in(s3gen_path.parent) if backbone == "gpt2" else S3GenSpec(s3gen_path)


class S3GenVocoder:
    sample_rate = 24_000

    def __init__(self, model: torch.nn.Module, spec: S3GenSpec | None = None):
        self.model = model.eval()
        meanflow = bool(getattr(model, "meanflow", False))
        self.spec = spec or (S3GenSpec.meanflow_in(".") if meanflow else S3GenSpec.standard_in("."))
        if self.spec.meanflow != meanflow:
            raise ValueError(f"a {_kind(meanflow)} S3Gen cannot decode as a {_kind(self.spec.meanflow)} one")

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu", spec: S3GenSpec | None = None) -> "S3GenVocoder":
        """Load Chatterbox's ``s3gen.safetensors`` / ``s3gen.pt`` or ``s3gen_meanflow.safetensors`` (official
        key names), strictly: the S3Gen kind must be the one asked for (``spec``; else the one the file name
        says, else the one the weights say), and a missing or unknown weight is an error that names it (only
        the S3 tokenizer's two mel-front-end buffers may be absent, as Chatterbox allows)."""
        from tts_core.checkpoint import read_weights

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {path.name} (pass --chatterbox-dir with Chatterbox's files)")
        state = read_weights(path)
        found = MEANFLOW_KEY in state
        by_name = {S3GEN_FILE: False, S3GEN_MEANFLOW_FILE: True}.get(path.name, found)
        wanted = spec.meanflow if spec is not None else by_name
        if found != wanted:
            raise ValueError(f"{path} is a {_kind(found)} S3Gen checkpoint, but a {_kind(wanted)} one is needed "
                             "here: use the file that belongs to this model family")
        model = _s3gen_class()(meanflow=found)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(("_mel_filters", "window"))]
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} S3Gen weights (e.g. {missing[:3]}): not an S3Gen checkpoint")
        if result.unexpected_keys:
            raise ValueError(f"{path} has {len(result.unexpected_keys)} weights S3Gen does not "
                             f"(e.g. {result.unexpected_keys[:3]}): not a Chatterbox S3Gen checkpoint")
        if spec is None:
            spec = S3GenSpec.meanflow_in(path.parent) if found else S3GenSpec.standard_in(path.parent)
        return cls(model.to(device), spec)

    @torch.inference_mode()
    def reference_dict(self, reference: Reference) -> dict:
        """S3Gen's reference features as Chatterbox builds them: ``embed_ref`` of the first 10 s at 24 kHz."""
        dev = next(self.model.parameters()).device
        return self.model.embed_ref(torch.from_numpy(s3gen_audio(reference.wav_24k)), S3GEN_SR, device=dev)

    @torch.inference_mode()
    def decode(self, tokens: np.ndarray, x_vector: np.ndarray | None = None,
               reference: Reference | np.ndarray | None = None, reference_sr: int = S3_SR) -> np.ndarray:
        """tokens [T] → float32 mono at 24 kHz. Needs ``reference`` (a `Reference`, or an array at
        ``reference_sr`` 16 / 24 kHz) or ``x_vector`` [192]."""
        m = self.model
        dev = next(m.parameters()).device
        tok = torch.as_tensor(np.asarray(tokens, np.int64)[np.asarray(tokens) < S3_VOCAB], device=dev)[None]
        if tok.shape[1] == 0:
            return np.zeros(0, np.float32)
        if self.spec.trailing_silence:
            tok = torch.cat([tok, tok.new_full((1, self.spec.trailing_silence), S3GEN_SILENCE)], dim=1)
        if reference is not None:
            if not isinstance(reference, Reference):
                if reference_sr not in (S3_SR, S3GEN_SR):
                    raise ValueError(f"reference_sr must be {S3_SR} or {S3GEN_SR}, not {reference_sr}")
                reference = (Reference.from_16k if reference_sr == S3_SR else Reference.from_24k)(reference)
            ref = self.reference_dict(reference)
        elif x_vector is not None:
            ref = dict(prompt_token=torch.zeros(1, 0, dtype=torch.long, device=dev),
                       prompt_token_len=torch.zeros(1, dtype=torch.long, device=dev),
                       prompt_feat=torch.zeros(1, 0, 80, device=dev), prompt_feat_len=None,
                       embedding=torch.as_tensor(x_vector, dtype=torch.float32, device=dev).reshape(1, -1))
        else:
            raise ValueError("S3Gen needs a reference clip or an x-vector for the voice")
        if self.spec.meanflow:  # ChatterboxTurboTTS.generate's call: its noise draws, its solver
            wav, _ = m.inference(speech_tokens=tok, ref_dict=ref, n_cfm_timesteps=self.spec.cfm_steps)
        else:
            wav = m(speech_tokens=tok, ref_wav=None, ref_sr=None, ref_dict=ref, finalize=True,
                    n_cfm_timesteps=self.spec.cfm_steps)
        return wav[0].float().cpu().numpy()


MelVQVocoder = EmbeddedVocoder  # its former name
