"""Speech tokens → waveform. One interface, two implementations:

* `MelVQTokenizer` (tts_core.encoders.mel_vq) decodes the embedded tokenizer's tokens (Griffin-Lim);
* `S3GenVocoder` decodes S3 tokens with Chatterbox's S3Gen from a local ``s3gen.safetensors`` / ``s3gen.pt``,
  using the ``chatterbox-tts`` package's module (the optional extra ``vocoder``; docs/vocoder.md says why
  not a port). Speaker identity: the reference clip when given (S3Gen's own ``embed_ref`` over the
  clip's first 10 s at 24 kHz, as Chatterbox's ``prepare_conditionals``: prompt tokens, prompt mel and
  CAM++ x-vector — `tts_core.reference`), else the stage-1 mapper's predicted x-vector with an empty
  prompt.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tts_core.reference import S3GEN_SR, S3_SR, Reference, s3gen_audio

log = logging.getLogger(__name__)

S3_VOCAB = 6561  # valid S3 speech tokens are 0..6560 (T3's BOS/EOS are 6561/6562)
CFM_STEPS = 10  # flow-matching steps of S3Gen's decoder (Chatterbox's default for the non-meanflow model)


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


class S3GenVocoder:
    sample_rate = 24_000

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> "S3GenVocoder":
        """Load Chatterbox's ``s3gen.safetensors`` / ``s3gen.pt`` (official key names). Like Chatterbox,
        non-persistent extras are tolerated; any *missing* learned weight is an error that names it."""
        from tts_core.checkpoint import read_weights

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {path.name} (pass --chatterbox-dir with Chatterbox's files)")
        model = _s3gen_class()()
        result = model.load_state_dict(read_weights(path), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(("_mel_filters", "window"))]
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} S3Gen weights (e.g. {missing[:3]}): not an S3Gen checkpoint")
        return cls(model.to(device))

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
        wav = m(speech_tokens=tok, ref_wav=None, ref_sr=None, ref_dict=ref, finalize=True, n_cfm_timesteps=CFM_STEPS)
        return wav[0].float().cpu().numpy()


class MelVQVocoder:
    """The embedded tokenizer's own decoder behind the same `decode` as S3Gen (voice comes from the tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sample_rate = int(tokenizer.config.sample_rate)

    def decode(self, tokens: np.ndarray, x_vector: np.ndarray | None = None,
               reference=None, reference_sr: int = S3_SR) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64)
        usable = tokens[(tokens >= 0) & (tokens < self.tokenizer.vocab_size)]
        if len(usable) < len(tokens):
            log.warning("%d of %d tokens are outside the %d-token codebook: dropped", len(tokens) - len(usable),
                        len(tokens), self.tokenizer.vocab_size)
        return self.tokenizer.decode(usable)
