"""The one place that knows the embedded speech tokenizers (the S3 stand-ins fitted on the corpus).

Every path that fits, stores, restores or decodes one — build-cache, its workers, stage 2's copy beside a
run, synthesis, the bench — goes through these functions, keyed by the kind name:

* ``mel-vq``: log-mel k-means, Griffin-Lim decoder (`mel_vq`; the default, what `make demo` uses);
* ``world-vq``: WORLD envelope k-means × log-F0 bins, WORLD decoder (`world_vq`; keeps pitch and level).

A store records the kind (``extra.speech_tokenizer_kind`` in its attributes; a store without it is mel-vq, the only
kind there was) and keeps the tokenizer's arrays in the kind's group (`cache.schema.TOKENIZER_GROUPS`); a run directory
keeps them in one safetensors file whose metadata names the kind.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

MEL_VQ, WORLD_VQ = "mel-vq", "world-vq"
KINDS = (MEL_VQ, WORLD_VQ)
DEFAULT_KIND = MEL_VQ
ARRAY_NAMES = {MEL_VQ: ("codebook",), WORLD_VQ: ("envelopes", "aperiodicity")}
KIND_ATTR = "speech_tokenizer_kind"  # key of the store's "extra" attributes


class TokenConfig:
    """Mixin of the embedded tokenizers' frozen config dataclasses (sample_rate, hop_length fields)."""

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @classmethod
    def from_dict(cls, d: Mapping):
        """The config from a stored dict; keys that are not fields (n_fit_frames) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class SavedTokenizer:
    """An embedded tokenizer as stored: its kind, its arrays, its config dict (identity included)."""

    kind: str
    arrays: Mapping[str, np.ndarray]
    config: Mapping = field(default_factory=dict)


class FitInputError(ValueError):
    """A clip whose features are not finite reached a fit. The build quarantines such clips before any fit
    sees them; if one still gets through, the fit stops naming the clip (``clip``: its index in the fit's
    input) instead of letting k-means fail with a library message, or fitting a codebook poisoned by it."""

    def __init__(self, clip: int, what: str):
        super().__init__(f"clip {clip} of the fit gives non-finite {what}")
        self.clip = clip
        self.what = what


def check_finite_features(features: Sequence[np.ndarray], what: str) -> None:
    """FitInputError for the first clip whose features hold NaN/inf."""
    for i, f in enumerate(features):
        if not np.isfinite(f).all():
            raise FitInputError(i, what)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown speech tokenizer {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def _cls(kind: str):
    if check_kind(kind) == MEL_VQ:
        from tts_core.encoders.mel_vq import MelVQTokenizer

        return MelVQTokenizer
    from tts_core.encoders.world_vq import WorldVQTokenizer

    return WorldVQTokenizer


def fit(kind: str, wavs16k: Sequence[np.ndarray], vocab_cap: int = 1024, seed: int = 0):
    """Fit on the clips, deterministically for a seed. mel-vq: a small corpus gets a smaller codebook
    (≤ frames / 8, capped at `vocab_cap`); world-vq: a fixed 64 × 32 code (`WorldVQConfig`)."""
    if check_kind(kind) == MEL_VQ:
        n_frames = sum(len(w) for w in wavs16k) // 640  # 25 Hz at 16 kHz
        return _cls(kind).fit(wavs16k, vocab_size=min(vocab_cap, max(16, n_frames // 8)), seed=seed)
    return _cls(kind).fit(wavs16k, seed=seed)


def checked_tokens(tokens, vocab_size: int) -> np.ndarray:
    """1-D int64 tokens, all in [0, vocab_size), else ValueError: what a decoder accepts."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"tokens must lie in [0, {vocab_size})")
    return tokens


def saved(tokenizer) -> SavedTokenizer:
    arrays, config = tokenizer.arrays()
    return SavedTokenizer(tokenizer.kind, arrays, config)


def restore(state: SavedTokenizer, source: str = ""):
    """The tokenizer a `SavedTokenizer` describes (strict: missing arrays or config fail)."""
    return _cls(state.kind).from_arrays(state.arrays, state.config, source=source)


def load_file(path: str | Path):
    """A tokenizer file (`to_safetensors`) of either kind, told apart by its metadata."""
    from tts_core.checkpoint import read_state_dict_safetensors
    from tts_core.encoders.mel_vq import CONFIG_KEY as MEL_KEY
    from tts_core.encoders.world_vq import CONFIG_KEY as WORLD_KEY

    _, meta = read_state_dict_safetensors(path)
    kind = next((k for k, key in ((MEL_VQ, MEL_KEY), (WORLD_VQ, WORLD_KEY)) if key in meta), None)
    if kind is None:
        raise ValueError(f"{path} is not an embedded speech tokenizer file (no {MEL_KEY} / {WORLD_KEY} metadata)")
    return _cls(kind).from_safetensors(path)


class EmbeddedVocoder:
    """An embedded tokenizer's own decoder behind the same `decode` as S3Gen (the voice is in the tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sample_rate = int(tokenizer.config.sample_rate)

    def decode(self, tokens: np.ndarray, x_vector: np.ndarray | None = None, reference=None,
               reference_sr: int = 16_000) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64)
        usable = tokens[(tokens >= 0) & (tokens < self.tokenizer.vocab_size)]
        if len(usable) < len(tokens):
            log.warning("%d of %d tokens are outside the %d-token vocabulary: dropped", len(tokens) - len(usable),
                        len(tokens), self.tokenizer.vocab_size)
        return self.tokenizer.decode(usable)
