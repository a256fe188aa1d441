"""Writes one file per way a clip can be bad (shared by the audio and the end-to-end build tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, sr: int = 16_000, f0: float = 220.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * f0 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def write_bad_clips(root: Path) -> dict[str, str]:
    """File name -> expected quarantine reason ('' for conversions that must be accepted)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(256)) * 4)
    (root / "empty.wav").write_bytes(b"")
    sf.write(root / "nosamples.wav", np.zeros((0,), np.float32), 16_000, subtype="PCM_16")
    sf.write(root / "silent.wav", np.zeros(16_000, np.float32), 16_000, subtype="PCM_16")
    nan = tone(1.0)
    nan[100:200] = np.nan
    sf.write(root / "nan.wav", nan, 16_000, subtype="FLOAT")
    sf.write(root / "short.wav", tone(0.2), 16_000, subtype="PCM_16")
    sf.write(root / "long.wav", tone(31.0), 16_000, subtype="PCM_16")
    sf.write(root / "lowrate.wav", tone(1.0, sr=4_000, f0=200), 4_000, subtype="PCM_16")
    sf.write(root / "stereo.wav", np.stack([tone(1.0), tone(1.0, f0=330)], axis=1), 16_000, subtype="PCM_16")
    sf.write(root / "rate44k.wav", tone(1.0, sr=44_100), 44_100, subtype="PCM_16")
    return {"missing.wav": "missing_file", "corrupt.wav": "unreadable", "empty.wav": "empty_file",
            "nosamples.wav": "empty_audio", "silent.wav": "silent", "nan.wav": "nan_audio", "short.wav": "too_short",
            "long.wav": "too_long", "lowrate.wav": "bad_sample_rate", "stereo.wav": "", "rate44k.wav": ""}
