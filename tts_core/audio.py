"""Load one clip as 16 kHz mono float32, or say precisely why it cannot be used.

Bad clips are data, not crashes: every problem becomes an `AudioRejected` with a stable reason code
(`cache.quarantine.Reason`, counted in the run summary) and a detail a person can act on. Channel mixing
and resampling are conversions, recorded as notes, never rejections.
"""
from __future__ import annotations

import errno
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from cache.quarantine import Reason
from tts_core.encoders.base import SAMPLE_RATE
from tts_core.reference import TURBO_PROMPT_SECONDS, Reference, prompt_audio


@dataclass(frozen=True)
class AudioPolicy:
    min_seconds: float = 0.5
    max_seconds: float = 30.0
    min_sample_rate: int = 8_000  # below this there is not enough bandwidth for 16 kHz models
    max_sample_rate: int = 384_000  # above this no recording is real; it only bounds what one clip can cost
    max_channels: int = 32  # ditto: a header claiming thousands of channels would decode to gigabytes
    silence_peak: float = 1e-3  # peak |x - mean| under this (about -60 dBFS) is silence, a DC offset included
    max_peak: float = 100.0  # +40 dBFS: float samples beyond this are a broken writer's, and would overflow fits
    allow_outside_root: bool = False  # a relative audio path whose `..` leaves --audio-root is refused unless set


class AudioRejected(Exception):
    """A clip that cannot be used; `reason` is its stable code (`cache.quarantine`), `detail` says what to do."""

    def __init__(self, reason: Reason, detail: str):
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
    _check_file(path)
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile's errors are all "cannot decode this file"
        raise AudioRejected(Reason.UNREADABLE,
                            f"{path} cannot be decoded ({_one_line(exc)}); re-encode it as WAV/FLAC") from None
    sr, channels = int(info.samplerate), int(info.channels)
    if not policy.min_sample_rate <= sr <= policy.max_sample_rate:
        raise AudioRejected(Reason.BAD_SAMPLE_RATE, f"{path} is sampled at {sr} Hz (outside "
                                                    f"{policy.min_sample_rate}–{policy.max_sample_rate} Hz)")
    if not 1 <= channels <= policy.max_channels:
        raise AudioRejected(Reason.BAD_CHANNELS, f"{path} has {channels} channels (expected 1–{policy.max_channels})")
    if info.frames / sr > policy.max_seconds:  # judged from the header: a 6-hour file is never decoded
        raise AudioRejected(Reason.TOO_LONG,
                            f"{path} lasts {info.frames / sr:.1f} s (> {policy.max_seconds} s); split it")
    limit = int(policy.max_seconds * sr) + 1  # a header that under-states its length still cannot cost more
    try:
        data, _ = sf.read(str(path), frames=limit, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioRejected(Reason.UNREADABLE,
                            f"{path} cannot be decoded ({_one_line(exc)}); re-encode it as WAV/FLAC") from None
    notes: list[str] = []
    if data.shape[0] == 0:
        raise AudioRejected(Reason.EMPTY_AUDIO, f"{path} has no samples")
    if not np.isfinite(data).all():
        raise AudioRejected(Reason.NAN_AUDIO, f"{path} contains NaN or infinite samples")
    peak = float(np.abs(data).max())
    if peak > policy.max_peak:
        raise AudioRejected(Reason.OUT_OF_RANGE, f"{path} has samples of magnitude {peak:.2e} "
                                                 f"(> {policy.max_peak:g}, a broken float writer's); re-export it")
    if data.shape[1] > 1:
        notes.append(f"{data.shape[1]}ch->mono")
        data = data.mean(axis=1, keepdims=True)
    wav = data[:, 0]
    duration = wav.shape[0] / sr
    if duration < policy.min_seconds:
        raise AudioRejected(Reason.TOO_SHORT, f"{path} lasts {duration:.2f} s (< {policy.min_seconds} s)")
    if duration > policy.max_seconds:
        raise AudioRejected(Reason.TOO_LONG, f"{path} lasts more than {policy.max_seconds} s; split it")
    ac_peak = float(np.abs(wav - wav.mean(dtype=np.float64)).max())  # a constant offset is no signal
    if ac_peak < policy.silence_peak:
        raise AudioRejected(Reason.SILENT, f"{path} is silent (peak {ac_peak:.2e} after removing its mean)")
    prompt = prompt_audio(Reference.from_native(wav, sr).wav_16k, TURBO_PROMPT_SECONDS).copy()
    if sr != SAMPLE_RATE:
        notes.append(f"{sr}->{SAMPLE_RATE}Hz")
        wav = resample_16k(wav, sr)
    return LoadedAudio(wav=np.ascontiguousarray(wav, dtype=np.float32), duration=wav.shape[0] / SAMPLE_RATE, notes=notes,
                       prompt_wav=prompt)


def resample_16k(wav: np.ndarray, sr: int) -> np.ndarray:
    """torchaudio's windowed sinc for the usual rates; soxr for a rate sharing no large factor with 16 kHz
    (torchaudio's kernel has 16000/gcd rows: a 44101 Hz clip took 47 s and 12 GB)."""
    if SAMPLE_RATE // math.gcd(sr, SAMPLE_RATE) <= 1_000:
        return AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), sr, SAMPLE_RATE).numpy()
    import librosa

    return librosa.resample(np.ascontiguousarray(wav, dtype=np.float32), orig_sr=sr, target_sr=SAMPLE_RATE,
                            res_type="soxr_hq")


def _check_file(path: Path) -> None:
    """A regular, non-empty file, or the reason it is not (never an OSError: a path the OS refuses is data)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise AudioRejected(Reason.MISSING_FILE, f"{path} does not exist; fix the path or --audio-root") from None
    except ValueError as exc:  # an embedded NUL byte
        raise AudioRejected(Reason.BAD_PATH, f"{_short(path)}: not a usable path ({exc}); fix the path") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise AudioRejected(Reason.PATH_TOO_LONG, f"{_short(path)} is longer than the file system allows "
                                                      f"({len(os.fsencode(path))} bytes); shorten the path") from None
        raise AudioRejected(Reason.UNREADABLE, f"{_short(path)} cannot be opened ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioRejected(Reason.MISSING_FILE, f"{path} is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioRejected(Reason.MISSING_FILE,
                            f"{path} is not a regular file (a device or pipe), not an audio file")
    if st.st_size == 0:
        raise AudioRejected(Reason.EMPTY_FILE, f"{path} is empty (0 bytes); re-export it")


def _short(path: Path, n: int = 120) -> str:
    s = str(path)
    return s if len(s) <= n else s[:n] + "…"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
