"""A stand-in for the 192-d CAM++ x-vector slot, honestly labelled, for when no CAM++ weights can be had.

CAM++ weights live only in Chatterbox's `s3gen.safetensors` (a model hub download), so the embedded default
for the 192-d slot is a *real pretrained speaker model* instead of random features: Resemblyzer's GE2E network,
run the way Resemblyzer itself runs it (`preprocess_wav` + `embed_utterance`):

  - volume raised (never lowered) to -30 dBFS, then long silences cut with webrtcvad (mode 3, 30 ms windows,
    8-window moving average, silences kept up to 6 windows);
  - partials every 77 frames (rate 1.3/s); the *waveform* zero-padded so the last partial is complete, which
    is kept only if ≥ 75 % of it is real audio (Chatterbox pads mel frames and asks for 80 %);
  - the utterance vector is the *un-normalised* mean of the partials' ReLU'd projections (Resemblyzer averages
    unit vectors), so like a real x-vector its raw norm is not 1 and the cache's norm report has work to do;
  - only its first 192 of 256 dims are kept, to fill the 192-d slot.

It shares the LSTM, projection and mel front end with `VoiceEncoder` (same weights object), and its identity
name says all of the above, so a cache built with it can never be mistaken for one built with CAM++.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.ndimage import binary_dilation
from torch import nn

from tts_core.encoders.voice_encoder import VoiceEncoder, segment_mean, stride_partials
from tts_core.identity import ModelIdentity

STANDIN_NAME = "resemblyzer-ge2e-unnormalised-first192 (stand-in for CAM++; no CAM++ weights offline)"
INT16_MAX = 2**15 - 1


@dataclass(frozen=True)
class StandInConfig:
    """Resemblyzer 0.1.4's `hparams.py` and `embed_utterance` defaults."""

    out_dim: int = 192  # the CAM++ slot
    min_coverage: float = 0.75
    norm_target_dbfs: float = -30.0
    vad: bool = True
    vad_mode: int = 3  # most aggressive
    vad_window_ms: int = 30
    vad_moving_average_width: int = 8
    vad_max_silence_length: int = 6


def normalize_volume_up(wav: np.ndarray, target_dbfs: float) -> np.ndarray:
    """Resemblyzer's `normalize_volume(increase_only=True)`; an all-zero clip is returned as is."""
    rms = np.sqrt(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2))
    if rms == 0:
        return wav
    gain_db = target_dbfs - 20 * np.log10(rms / INT16_MAX)
    return wav if gain_db < 0 else (wav * 10 ** (gain_db / 20)).astype(np.float32)


def _load_vad():
    """webrtcvad's C extension. Its Python wrapper imports the removed `pkg_resources` only for __version__,
    so when that import fails we drive the extension `_webrtcvad` directly (the wrapper's own three calls)."""
    try:
        import webrtcvad

        return lambda mode: webrtcvad.Vad(mode).is_speech
    except ImportError:
        pass
    try:
        import _webrtcvad
    except ImportError:
        return None

    def make(mode: int):
        handle = _webrtcvad.create()
        _webrtcvad.init(handle)
        _webrtcvad.set_mode(handle, mode)
        return lambda buf, sample_rate: _webrtcvad.process(handle, sample_rate, buf, len(buf) // 2)

    return make


_VAD = _load_vad()


def trim_long_silences(wav: np.ndarray, cfg: StandInConfig, sample_rate: int) -> np.ndarray:
    """Resemblyzer's `trim_long_silences`: drop unvoiced stretches longer than `vad_max_silence_length` windows.

    One deliberate difference: samples are clipped to int16 before the VAD instead of wrapping around.
    """
    window = cfg.vad_window_ms * sample_rate // 1000
    wav = wav[: len(wav) - len(wav) % window]
    pcm = np.clip(np.round(wav * INT16_MAX), -INT16_MAX - 1, INT16_MAX).astype("<i2").tobytes()
    is_speech = _VAD(cfg.vad_mode)
    flags = np.array([is_speech(pcm[2 * s: 2 * (s + window)], sample_rate) for s in range(0, len(wav), window)],
                     dtype=np.float64)
    # Centred moving average (zero-padded (w-1)//2 before, w//2 after), rounded back to a mask, then dilated.
    width = cfg.vad_moving_average_width
    padded = np.concatenate([np.zeros((width - 1) // 2), flags, np.zeros(width // 2)])
    smoothed = np.convolve(padded, np.ones(width), mode="valid") / width
    mask = binary_dilation(np.round(smoothed).astype(bool), np.ones(cfg.vad_max_silence_length + 1))
    return wav[np.repeat(mask, window)]


def resemblyzer_num_partials(n_samples: int, step: int, partial_frames: int, hop: int, min_coverage: float) -> int:
    """Resemblyzer's `compute_partial_slices`, counting only: windows start every `step` frames."""
    n_frames = int(np.ceil((n_samples + 1) / hop))
    n = len(range(0, max(1, n_frames - partial_frames + step + 1), step))
    coverage = (n_samples - (n - 1) * step * hop) / (partial_frames * hop)
    return n - 1 if coverage < min_coverage and n > 1 else n


class ResemblyzerXVectorStandIn(nn.Module):
    """`SpeakerEncoder` for the 192-d slot: Resemblyzer GE2E, Resemblyzer preprocessing, raw mean, first 192."""

    def __init__(self, encoder: VoiceEncoder, cfg: StandInConfig = StandInConfig()):
        super().__init__()
        if cfg.out_dim > encoder.dim:
            raise ValueError(f"cannot keep {cfg.out_dim} dims of a {encoder.dim}-d embedding")
        self.encoder = encoder  # shared, not copied: the same weights as the VoiceEncoder
        self.cfg = cfg
        self.dim = cfg.out_dim
        use_vad = cfg.vad and _VAD is not None
        self.use_vad = use_vad
        name = STANDIN_NAME if use_vad or not cfg.vad else STANDIN_NAME + " [webrtcvad missing: no VAD trim]"
        self.identity = ModelIdentity(name, encoder.identity.sha256, encoder.identity.source)

    @classmethod
    def from_resemblyzer(cls, path: str | Path | None = None,
                         cfg: StandInConfig = StandInConfig()) -> "ResemblyzerXVectorStandIn":
        return cls(VoiceEncoder.from_resemblyzer(path), cfg)

    def preprocess(self, wav: np.ndarray) -> np.ndarray:
        """Resemblyzer's `preprocess_wav` for audio already at 16 kHz.

        Where the VAD finds no speech at all, Resemblyzer would embed an all-zero pad; we keep the untrimmed
        clip instead, so a clip the VAD misjudges still gets a vector of its own voice.
        """
        wav = normalize_volume_up(np.asarray(wav, dtype=np.float32), self.cfg.norm_target_dbfs)
        if self.use_vad:
            trimmed = trim_long_silences(wav, self.cfg, self.encoder.cfg.sample_rate)
            wav = trimmed if len(trimmed) else wav
        return wav

    def partials(self, wav: np.ndarray) -> torch.Tensor:
        """Resemblyzer's `embed_utterance` slicing: pad the waveform, then cut mel windows [n, 160, 40]."""
        wav = self.preprocess(wav)
        if len(wav) == 0:
            raise ValueError("empty clip")
        ve = self.encoder.cfg
        n = resemblyzer_num_partials(len(wav), ve.frame_step, ve.partial_frames, ve.hop_length, self.cfg.min_coverage)
        wav_len = ((n - 1) * ve.frame_step + ve.partial_frames) * ve.hop_length
        if wav_len >= len(wav):
            wav = np.pad(wav, (0, wav_len - len(wav)))
        mel = self.encoder.mel(torch.from_numpy(np.ascontiguousarray(wav)).to(self.encoder.device))
        return stride_partials(mel, n, ve.frame_step, ve.partial_frames)

    @torch.inference_mode()
    def embed_batch(self, wavs: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz float32 waveforms → raw stand-in x-vectors [B, 192]; one LSTM call for all partials."""
        if len(wavs) == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = [self.partials(w) for w in wavs]
        raw = segment_mean(self.encoder(torch.cat(parts).float()), [p.shape[0] for p in parts])
        return raw[:, : self.dim].cpu().numpy().astype(np.float32)
