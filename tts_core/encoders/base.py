"""The contracts every frozen encoder meets, so the cache builder never asks which one it has."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from tts_core.identity import ModelIdentity

SAMPLE_RATE = 16_000  # every frozen audio model here consumes 16 kHz mono float32


@runtime_checkable
class SpeakerEncoder(Protocol):
    """Audio → one fixed-size vector per clip (VoiceEncoder 256-d, CAM++ 192-d)."""

    identity: ModelIdentity
    dim: int

    def embed_batch(self, wavs: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz mono float32 waveforms → float32 [B, dim], *raw* (no extra normalisation)."""
        ...


@runtime_checkable
class SpeechTokenizer(Protocol):
    """Audio → discrete speech tokens at `frame_rate` Hz, values in [0, vocab_size)."""

    identity: ModelIdentity
    vocab_size: int
    frame_rate: float

    def tokenize_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """16 kHz mono float32 waveforms → one int array of tokens per clip."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Instruction text → last hidden states [L, hidden_size] per text (fp32 compute)."""

    identity: ModelIdentity
    hidden_size: int

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One float32 array [L_i, hidden_size] per text, padding stripped."""
        ...
