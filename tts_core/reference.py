"""The official Chatterbox reference-clip paths (``ChatterboxTTS.prepare_conditionals``, 0.1.7), in one place.

A reference is loaded at S3Gen's 24 kHz (``librosa.load(path, sr=24000)``) and resampled to 16 kHz
(``librosa.resample``) for the 16 kHz models. Then:

* T3's prompt: the S3 tokens of the **first 6 s** of the 16 kHz clip (at most 150 tokens). The clip is
  cut *before* tokenizing: the S3 tokenizer normalises its log-mel per clip and its encoder attends over
  the whole input, so the first 150 tokens of a longer clip are other tokens (78.7 % agreement on an
  8.5 s clip).
* the VoiceEncoder embedding: the whole 16 kHz clip;
* S3Gen's reference (prompt tokens, prompt mel, CAM++ x-vector): the **first 10 s** at 24 kHz.

`Reference` holds both rates; `prompt_audio` / `s3gen_audio` are the cuts. The cache stores each
clip's prompt tokens by the same rule (cache.schema ``PROMPT_TOKENS``), so stage-2 audio rows see the
prompt this path builds at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

S3_SR = 16_000  # S3 tokenizer, VoiceEncoder, CAM++
S3GEN_SR = 24_000  # S3Gen's mel and waveform
PROMPT_SECONDS = 6.0  # ENC_COND_LEN = 6 * S3_SR (English and multilingual)
TURBO_PROMPT_SECONDS = 15.0  # ChatterboxTurboTTS.ENC_COND_LEN = 15 * S3_SR: the longest prompt any family cuts
S3GEN_REF_SECONDS = 10.0  # DEC_COND_LEN = 10 * S3GEN_SR


@dataclass(frozen=True)
class Reference:
    wav_24k: np.ndarray  # float32 mono at 24 kHz
    wav_16k: np.ndarray  # float32 mono at 16 kHz (resampled from wav_24k)

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        """Chatterbox's loading: librosa at 24 kHz, then librosa's resampler down to 16 kHz."""
        import librosa

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference clip {path} not found")
        wav, _ = librosa.load(str(path), sr=S3GEN_SR)
        return cls.from_24k(wav)

    @classmethod
    def from_native(cls, wav: np.ndarray, sample_rate: int) -> "Reference":
        """A mono clip at its file's own rate, through the same steps as `load` (librosa.load's soxr_hq
        resampling to 24 kHz) without reading the file again."""
        import librosa

        wav = np.ascontiguousarray(wav, dtype=np.float32)
        if sample_rate != S3GEN_SR:
            wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=S3GEN_SR)
        return cls.from_24k(wav)

    @classmethod
    def from_24k(cls, wav_24k: np.ndarray) -> "Reference":
        import librosa

        wav = np.ascontiguousarray(wav_24k, dtype=np.float32)
        return cls(wav, np.ascontiguousarray(librosa.resample(wav, orig_sr=S3GEN_SR, target_sr=S3_SR),
                                              dtype=np.float32))

    @classmethod
    def from_16k(cls, wav_16k: np.ndarray) -> "Reference":
        """An in-memory 16 kHz clip (e.g. from the cache's loader): 24 kHz by librosa's resampler."""
        import librosa

        wav = np.ascontiguousarray(wav_16k, dtype=np.float32)
        return cls(np.ascontiguousarray(librosa.resample(wav, orig_sr=S3_SR, target_sr=S3GEN_SR), dtype=np.float32),
                   wav)


def prompt_audio(wav_16k: np.ndarray, seconds: float = PROMPT_SECONDS) -> np.ndarray:
    """The part of a 16 kHz clip whose S3 tokens are T3's prompt."""
    return wav_16k[: int(seconds * S3_SR)]


def s3gen_audio(wav_24k: np.ndarray, seconds: float = S3GEN_REF_SECONDS) -> np.ndarray:
    """The part of a 24 kHz clip S3Gen's reference is computed from."""
    return wav_24k[: int(seconds * S3GEN_SR)]


def t3_prompt(reference: Reference, voice_encoder, speech_tokenizer, prompt_len: int = 150,
              seconds: float = PROMPT_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """(VoiceEncoder embedding [256] of the whole 16 kHz clip, S3 tokens of its first ``seconds`` (6 s;
    Turbo 15 s: `tts_core.t3.families`), at most ``prompt_len``): T3's half of Chatterbox's
    ``prepare_conditionals``."""
    spk = np.asarray(voice_encoder.embed_batch([reference.wav_16k]), np.float32).reshape(-1)
    tokens = np.asarray(speech_tokenizer.tokenize_batch([prompt_audio(reference.wav_16k, seconds)])[0], np.int64)
    return spk, tokens[:prompt_len]
