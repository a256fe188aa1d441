"""Load one clip as 16 kHz mono float32, or say precisely why it cannot be used.

Bad clips are data, not crashes: every problem becomes an `AudioRejected` with a stable reason code
(counted in the run summary) and a detail a person can act on. Channel mixing and resampling are
conversions, recorded as notes, never rejections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from tts_core.encoders.base import SAMPLE_RATE
from tts_core.reference import TURBO_PROMPT_SECONDS, Reference, prompt_audio


@dataclass(frozen=True)
class AudioPolicy:
    min_seconds: float = 0.5
    max_seconds: float = 30.0
    min_sample_rate: int = 8_000  # below this there is not enough bandwidth for 16 kHz models
    silence_peak: float = 1e-3  # peak |x| under this (about -60 dBFS) is silence


class AudioRejected(Exception):
    """A clip that cannot be used; `reason` is a stable code, `detail` says what to do."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class LoadedAudio:
    wav: np.ndarray  # float32 [T] at 16 kHz
    duration: float
    notes: list[str] = field(default_factory=list)
    # The clip's first TURBO_PROMPT_SECONDS at 16 kHz as Chatterbox's reference path resamples it (librosa:
    # file rate → 24 kHz → 16 kHz; tts_core.reference): T3's prompt tokens are cut from this, so stage 2 sees
    # the prompt official inference builds. None: cut from `wav`.
    prompt_wav: np.ndarray | None = None

    @property
    def prompt_source(self) -> np.ndarray:
        """The 16 kHz audio T3's prompt is cut from."""
        return self.prompt_wav if self.prompt_wav is not None else self.wav


def load_clip(path: str | Path, policy: AudioPolicy = AudioPolicy()) -> LoadedAudio:
    path = Path(path)
    if not path.exists():
        raise AudioRejected("missing_file", f"{path} does not exist; fix the path or --audio-root")
    if path.is_dir():
        raise AudioRejected("missing_file", f"{path} is a directory, not an audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are all "cannot decode this file"
        kind = "empty_file" if path.stat().st_size == 0 else "unreadable"
        raise AudioRejected(kind, f"{path} cannot be decoded ({exc}); re-encode it as WAV/FLAC") from None
    notes: list[str] = []
    if data.shape[0] == 0:
        raise AudioRejected("empty_audio", f"{path} has no samples")
    if not np.isfinite(data).all():
        raise AudioRejected("nan_audio", f"{path} contains NaN or infinite samples")
    if sr < policy.min_sample_rate:
        raise AudioRejected("bad_sample_rate", f"{path} is sampled at {sr} Hz (< {policy.min_sample_rate} Hz)")
    if data.shape[1] > 1:
        notes.append(f"{data.shape[1]}ch->mono")
        data = data.mean(axis=1, keepdims=True)
    wav = data[:, 0]
    duration = wav.shape[0] / sr
    if duration < policy.min_seconds:
        raise AudioRejected("too_short", f"{path} lasts {duration:.2f} s (< {policy.min_seconds} s)")
    if duration > policy.max_seconds:
        raise AudioRejected("too_long", f"{path} lasts {duration:.1f} s (> {policy.max_seconds} s); split it")
    peak = float(np.abs(wav).max())
    if peak < policy.silence_peak:
        raise AudioRejected("silent", f"{path} is silent (peak {peak:.2e})")
    prompt = prompt_audio(Reference.from_native(wav, sr).wav_16k, TURBO_PROMPT_SECONDS).copy()
    if sr != SAMPLE_RATE:
        notes.append(f"{sr}->{SAMPLE_RATE}Hz")
        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), sr, SAMPLE_RATE).numpy()
    return LoadedAudio(wav=np.ascontiguousarray(wav, dtype=np.float32), duration=wav.shape[0] / SAMPLE_RATE, notes=notes,
                       prompt_wav=prompt)
