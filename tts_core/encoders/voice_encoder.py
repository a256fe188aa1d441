"""Chatterbox's VoiceEncoder: the 256-d speaker embedding T3 is conditioned on (its `spkr_enc` input).

The network is the GE2E speaker encoder of Resemblyzer / Real-Time-Voice-Cloning, which Chatterbox adopted
unchanged: LSTM(40→256, 3 layers) over 160-frame partials of a 40-band *power* mel (no log, no scaling),
last layer's final hidden state → `proj` Linear(256→256) → ReLU → L2. An utterance embedding is the mean of
its partials' unit vectors, L2-normalised again.

Checkpoint keys (Chatterbox `ve.safetensors`, which Chatterbox loads strictly, so they are all of them):

    lstm.{weight_ih,weight_hh,bias_ih,bias_hh}_l{0,1,2}   proj.weight  proj.bias
    similarity_weight  similarity_bias                      (GE2E training-only scalars: dropped)

Resemblyzer's `pretrained.pt` holds the same tensors with `linear.*` instead of `proj.*`; it is the embedded
default here because Chatterbox's own weights cannot be downloaded offline. Its identity says which it is.

Front end, as Chatterbox's `embeds_from_wavs` at 16 kHz: librosa's 20 dB edge trim (re-implemented), |STFT|² (n_fft 400, hop 160,
periodic Hann, centred with reflect padding) through librosa's Slaney mel basis (0–8 kHz), then partials every
77 frames (rate 1.3/s), the mel zero-padded at the end when the last partial covers ≥ 80 % real frames.
The mel runs in torch so that it lives on the same device as the LSTM.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from tts_core.encoders.base import SAMPLE_RATE
from tts_core.identity import ModelIdentity, loaded_frozen, sha256_state_dict

CHATTERBOX_NAME = "chatterbox-voice-encoder"
RESEMBLYZER_NAME = "resemblyzer-ge2e-voice-encoder (Chatterbox VE architecture)"
UNTRAINED_NAME = "voice-encoder (random init, untrained)"
TRAINING_ONLY_KEYS = ("similarity_weight", "similarity_bias")  # GE2E loss scale/offset, unused at inference


@dataclass(frozen=True)
class VoiceEncoderConfig:
    """Chatterbox's `VoiceEncConfig` plus the `embeds_from_wavs` defaults it embeds with."""

    sample_rate: int = SAMPLE_RATE
    n_mels: int = 40
    n_fft: int = 400  # = win_size: 25 ms
    hop_length: int = 160  # 10 ms
    fmax: float = 8000.0
    hidden_size: int = 256
    num_layers: int = 3
    embed_dim: int = 256
    partial_frames: int = 160  # 1.6 s per partial
    partial_rate: float = 1.3  # partials per second → a step of 77 frames
    min_coverage: float = 0.8  # keep a padded last partial only if ≥ 80 % of it is real frames
    trim_top_db: float | None = 20.0  # librosa.effects.trim before the mel (Chatterbox's default)

    @property
    def frame_step(self) -> int:
        # Chatterbox divides by ve_partial_frames and Resemblyzer by samples-per-frame: both are 160 here.
        step = int(np.round(self.sample_rate / self.partial_rate / self.hop_length))
        assert 0 < step <= self.partial_frames, f"partial_rate {self.partial_rate} gives step {step}"
        return step


class PowerMel(nn.Module):
    """40-band power mel [T, n_mels], T = 1 + len(wav) // hop: librosa.stft(center, reflect) → |·|² → mel basis.

    Buffers are not persistent, so the module's state dict holds only the checkpoint's weights.
    """

    def __init__(self, cfg: VoiceEncoderConfig):
        super().__init__()
        self.n_fft, self.hop_length = cfg.n_fft, cfg.hop_length
        # torchaudio's Slaney filterbank equals librosa.filters.mel(sr, n_fft, n_mels, fmin=0, fmax) to ~1e-8.
        basis = torchaudio.functional.melscale_fbanks(cfg.n_fft // 2 + 1, 0.0, cfg.fmax, cfg.n_mels,
                                                      cfg.sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("mel_basis", basis.T.contiguous(), persistent=False)  # [n_mels, n_freq]
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)  # periodic, as librosa

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.shape[-1] <= self.n_fft // 2:
            raise ValueError(f"clip of {wav.shape[-1]} samples is too short for a centred {self.n_fft}-point STFT")
        spec = torch.stft(wav, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)
        return (self.mel_basis @ spec.abs().pow(2)).T


def trim_edges(wav: np.ndarray, top_db: float, frame_length: int = 2048, hop_length: int = 512) -> np.ndarray:
    """`librosa.effects.trim` (librosa 0.11, which Chatterbox pins) without librosa's multi-second first-call
    start-up: cut leading/trailing frames whose RMS power is more than `top_db` below the loudest frame."""
    padded = np.pad(wav, frame_length // 2)  # rms(center=True, pad_mode="constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length]
    power = np.mean(np.abs(frames) ** 2, axis=-1, dtype=np.float32)
    db = 10 * np.log10(np.maximum(1e-10, power)) - 10 * np.log10(np.maximum(1e-10, power.max()))
    loud = np.flatnonzero(db > -top_db)
    if loud.size == 0:
        return wav[:0]
    return wav[loud[0] * hop_length: min(len(wav), (loud[-1] + 1) * hop_length)]


def stride_partials(mel: torch.Tensor, n_partials: int, step: int, partial_frames: int) -> torch.Tensor:
    """[T, M] mel → [n, partial_frames, M] overlapping windows, zero-padding/truncating the mel to fit exactly."""
    needed = partial_frames + step * (n_partials - 1)
    if mel.shape[0] < needed:
        mel = F.pad(mel, (0, 0, 0, needed - mel.shape[0]))
    return mel[:needed].unfold(0, partial_frames, step).transpose(1, 2)


def chatterbox_num_partials(n_frames: int, step: int, partial_frames: int, min_coverage: float) -> int:
    """Chatterbox's `get_num_wins`: full windows, plus a padded last one if it covers enough real frames."""
    n, remainder = divmod(max(n_frames - partial_frames + step, 0), step)
    if n == 0 or (remainder + partial_frames - step) / partial_frames >= min_coverage:
        n += 1
    return n


def segment_mean(x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Mean of consecutive row groups: partial embeddings [sum(counts), D] → utterance embeddings [B, D]."""
    return torch.stack([chunk.mean(0) for chunk in torch.split(x, list(counts))])


def resemblyzer_weights_path() -> Path:
    """`pretrained.pt` inside the installed resemblyzer package, found without importing it."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'resemblyzer' package is not installed; it ships the default VE weights")
    for location in spec.submodule_search_locations:
        path = Path(location) / "pretrained.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no pretrained.pt in {list(spec.submodule_search_locations)}")


def read_resemblyzer_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Resemblyzer's GE2E weights with Chatterbox's key names (`linear.*` → `proj.*`).

    The file is a legacy `torch.save` of plain dicts of tensors plus ints, which the safe `weights_only=True`
    unpickler accepts (checked with resemblyzer 0.1.4), so no arbitrary code can run while reading it.
    """
    path = Path(path) if path is not None else resemblyzer_weights_path()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model_state" not in checkpoint:
        raise ValueError(f"{path}: expected Resemblyzer's {{step, model_state, optimizer_state}} checkpoint")
    return {("proj." + k[len("linear."):]) if k.startswith("linear.") else k: v
            for k, v in checkpoint["model_state"].items()}


class VoiceEncoder(nn.Module):
    """Chatterbox's VoiceEncoder (module names = checkpoint keys) and a batched `SpeakerEncoder`."""

    def __init__(self, cfg: VoiceEncoderConfig = VoiceEncoderConfig(), identity: ModelIdentity | None = None):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.embed_dim
        self.lstm = nn.LSTM(cfg.n_mels, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.mel = PowerMel(cfg)
        self.identity = identity or ModelIdentity(UNTRAINED_NAME, sha256_state_dict(self.state_dict()))

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def forward(self, partials: torch.Tensor) -> torch.Tensor:
        """Partials [N, 160, 40] → ReLU'd projections [N, 256], *not* yet L2-normalised.

        Chatterbox's forward normalises here; we leave it to the caller so the CAM++ stand-in can share it.
        """
        _, (hidden, _) = self.lstm(partials)
        return F.relu(self.proj(hidden[-1]))

    # ---- Chatterbox's embeds_from_wavs, batched ---------------------------------------------------------

    def partials(self, wav: np.ndarray) -> torch.Tensor:
        """One 16 kHz waveform → its partial mels [n, 160, 40] on this module's device."""
        wav = np.asarray(wav, dtype=np.float32)
        if self.cfg.trim_top_db is not None:
            wav = trim_edges(wav, self.cfg.trim_top_db)
        mel = self.mel(torch.from_numpy(np.ascontiguousarray(wav)).to(self.device))
        cfg = self.cfg
        n = chatterbox_num_partials(mel.shape[0], cfg.frame_step, cfg.partial_frames, cfg.min_coverage)
        return stride_partials(mel, n, cfg.frame_step, cfg.partial_frames)

    @torch.inference_mode()
    def embed_batch(self, wavs: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz float32 waveforms → unit-norm utterance embeddings [B, 256]; one LSTM call for all partials."""
        if len(wavs) == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = [self.partials(w) for w in wavs]
        partial_embeds = F.normalize(self(torch.cat(parts).float()), dim=1)
        utterance = segment_mean(partial_embeds, [p.shape[0] for p in parts])
        return F.normalize(utterance, dim=1).cpu().numpy().astype(np.float32)

    # ---- loading ----------------------------------------------------------------------------------------

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Strict load that drops only the GE2E training scalars and names `source` in every error."""
        state = {k: v for k, v in state.items() if k not in TRAINING_ONLY_KEYS}
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{source} is not a VoiceEncoder checkpoint: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{source}: VoiceEncoder weights do not fit: {e}") from e

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], name: str, source: str,
                   cfg: VoiceEncoderConfig = VoiceEncoderConfig()) -> "VoiceEncoder":
        return loaded_frozen(cls(cfg), state, name, source)

    @classmethod
    def from_chatterbox(cls, path: str | Path, cfg: VoiceEncoderConfig = VoiceEncoderConfig()) -> "VoiceEncoder":
        """Chatterbox's `ve.safetensors` (English) or `ve.pt` (multilingual): the same weights, two formats."""
        from tts_core.checkpoint import read_weights

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: put Chatterbox's {path.name} there")
        return cls.from_state(read_weights(path), CHATTERBOX_NAME, str(path), cfg)

    @classmethod
    def from_resemblyzer(cls, path: str | Path | None = None,
                         cfg: VoiceEncoderConfig = VoiceEncoderConfig()) -> "VoiceEncoder":
        """The embedded default: Resemblyzer's GE2E weights in Chatterbox's architecture and front end."""
        path = Path(path) if path is not None else resemblyzer_weights_path()
        return cls.from_state(read_resemblyzer_state(path), RESEMBLYZER_NAME, str(path), cfg)
