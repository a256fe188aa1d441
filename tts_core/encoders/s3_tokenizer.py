"""Chatterbox's S3 speech tokenizer (S3TokenizerV2, 25 Hz, 6561 FSQ codes) loaded from `s3gen.safetensors`.

Chatterbox keeps the tokenizer inside S3Gen as `self.tokenizer`, a subclass of the `s3tokenizer` package's
`S3TokenizerV2` that only adds two front-end buffers (`_mel_filters` = librosa mel filterbank [128, 201],
`window` = Hann(400)). So its weights are the `tokenizer.*` keys of `s3gen.safetensors`:

    tokenizer.encoder.conv{1,2}.{weight,bias}
    tokenizer.encoder.blocks.{i}.attn.{query,value,out}.{weight,bias}, .attn.key.weight,
        .attn.fsmn_block.weight, .attn_ln.*, .mlp.{0,2}.*, .mlp_ln.*          (i = 0..5)
    tokenizer.quantizer._codebook.project_down.{weight,bias}                   [8, 1280]
    tokenizer._mel_filters, tokenizer.window                                  (may be absent)

Stripping `tokenizer.` gives S3TokenizerV2's state dict exactly, minus the two front-end buffers, which we
check against the package's own front end (same filterbank, same window) and drop. We read only these keys
(the flow/HiFT weights of s3gen are never touched) and never call the package's downloading `load_model`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import s3tokenizer
import s3tokenizer.utils
import torch
from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

from tts_core.checkpoint import read_prefixed_state
from tts_core.identity import ModelIdentity, sha256_state_dict

S3_NAME = "speech_tokenizer_v2_25hz"
S3_PREFIX = "tokenizer."
FRONT_END_BUFFERS = ("_mel_filters", "window")  # registered by Chatterbox's subclass, not by S3TokenizerV2
S3_N_FFT = 400  # the package's STFT: n_fft 400, hop 160 (100 mel frames/s), 4 mel frames per token
S3_HEAD_DIM = 64  # S3TokenizerV2 hard-codes 64-d rotary heads (precompute_freqs_cis(64, ...))
IDENTITY_NAME = "s3tokenizer-v2-25hz (chatterbox s3gen)"


def read_tokenizer_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The `tokenizer.*` tensors of an s3gen checkpoint, prefix stripped; nothing else is read."""
    return read_prefixed_state(path, S3_PREFIX)


def config_from_state(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Read the model shape off the weights, so the real (1280-d, 6 layers) and test-sized checkpoints both load."""
    conv1 = state["encoder.conv1.weight"]  # [n_state, n_mels, 3]
    n_state, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    n_layer = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    if n_state % S3_HEAD_DIM:
        raise ValueError(f"S3TokenizerV2 needs a width divisible by {S3_HEAD_DIM}, got {n_state}")
    return ModelConfig(n_mels=n_mels, n_audio_state=n_state, n_audio_head=n_state // S3_HEAD_DIM,
                       n_audio_layer=n_layer)


def package_mel_filters(n_mels: int) -> torch.Tensor:
    """The filterbank `s3tokenizer.log_mel_spectrogram` uses (shipped as an asset of the package)."""
    assets = os.path.join(os.path.dirname(s3tokenizer.utils.__file__), "assets", "mel_filters.npz")
    with np.load(assets, allow_pickle=False) as f:
        return torch.from_numpy(f[f"mel_{n_mels}"].astype(np.float32))


def check_front_end(extras: dict[str, torch.Tensor], n_mels: int) -> None:
    """Chatterbox's stored filterbank/window must equal the package front end we compute mels with."""
    if "_mel_filters" in extras:
        stored = extras["_mel_filters"].float()
        expected = package_mel_filters(n_mels)
        if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-4, atol=1e-6):
            raise ValueError("tokenizer._mel_filters differs from s3tokenizer's mel filterbank; tokens would not "
                             "match Chatterbox's")
    if "window" in extras:
        stored = extras["window"].float()
        if stored.shape != (S3_N_FFT,) or not torch.allclose(stored, torch.hann_window(S3_N_FFT), atol=1e-6):
            raise ValueError("tokenizer.window is not the Hann(400) window s3tokenizer uses")


class S3SpeechTokenizer:
    """SpeechTokenizer over S3TokenizerV2: 16 kHz audio → int tokens in [0, 6561) at 25 Hz."""

    frame_rate: float = 25.0
    min_samples: int = S3_N_FFT  # shorter clips are zero-padded: the centred STFT needs > n_fft/2 samples

    def __init__(self, model: S3TokenizerV2, identity: ModelIdentity, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.identity = identity
        self.vocab_size = int(model.config.n_codebook_size)
        self.n_mels = int(model.config.n_mels)
        self.device = torch.device("cpu")
        self.to(device)

    @classmethod
    def from_s3gen(cls, path: str | Path, device: str | torch.device = "cpu") -> "S3SpeechTokenizer":
        state = read_tokenizer_state(path)
        extras = {k: state.pop(k) for k in FRONT_END_BUFFERS if k in state}
        config = config_from_state(state)
        check_front_end(extras, config.n_mels)
        model = S3TokenizerV2(S3_NAME, config=config)  # always a fresh config: the package's default is shared
        model.load_state_dict(state, strict=True)
        identity = ModelIdentity(IDENTITY_NAME, sha256_state_dict(state), source=str(path))
        return cls(model, identity, device)

    def to(self, device: str | torch.device) -> "S3SpeechTokenizer":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def mel(self, wav: np.ndarray) -> torch.Tensor:
        """Log-mel [n_mels, T] of one clip, exactly as the package computes it (its max-norm is per clip)."""
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        if x.ndim != 1:
            raise ValueError(f"expected a mono 1-D waveform, got shape {tuple(x.shape)}")
        if x.numel() < self.min_samples:
            x = torch.nn.functional.pad(x, (0, self.min_samples - x.numel()))
        return s3tokenizer.log_mel_spectrogram(x, n_mels=self.n_mels, device=self.device)

    def tokenize_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(wavs) == 0:
            return []
        mels, mel_lens = s3tokenizer.padding([self.mel(w) for w in wavs])
        codes, code_lens = self.model.quantize(mels.to(self.device), mel_lens.to(self.device))
        codes, code_lens = codes.cpu(), code_lens.cpu()  # inference tensors: copied out below
        return [codes[i, : int(code_lens[i])].numpy().astype(np.int64, copy=True) for i in range(len(wavs))]
