"""Voice attributes measured from audio by the methods the field uses (pure functions of a waveform).

* pitch: median F0 over voiced frames from Praat's cross-correlation tracker (`praat-parselmouth`,
  "Sound: To Pitch (cc)"), floor 60 Hz / ceiling 500 Hz (covers low male to high female speech) and Praat's
  own octave-cost, octave-jump and voicing defaults, on the clip resampled to 8 kHz with 10 ms frames. Why
  not YIN: on Griffin-Lim renderings of low male voices plain YIN locks onto a 300–400 Hz periodicity of the
  reconstruction while Praat's path search, which penalises octave jumps, keeps the true ~80 Hz
  (tests/test_evaluation.py shows both). Why cc, not Praat's ac: ac calls most Griffin-Lim frames unvoiced
  and then, on some clips, takes its median from a few frames at 400+ Hz; cc keeps enough voiced frames;
* speaking rate: transcript letters per second of *speech*, the speech time being the sum of the segments
  Silero VAD finds (`silero-vad`; its model ships in the wheel, nothing is downloaded), so leading, trailing
  and inner pauses do not count;
* loudness: integrated loudness, ITU-R BS.1770 (`torchaudio.functional.loudness`, LUFS); clips shorter
  than one 400 ms gating block fall back to RMS dBFS (same scale to within a few dB for speech).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

F0_FLOOR, F0_CEILING = 60.0, 500.0  # Hz: Praat's advice for a mixed male/female set
PITCH_SAMPLE_RATE = 8_000  # F0 <= 500 Hz needs no more band; cross-correlation costs ~ rate², 7x less than 22 kHz
PITCH_STEP_S = 0.01  # 10 ms frames, the usual intonation step (Praat's cc default is a quarter of 1/floor)
VAD_SAMPLE_RATE = 16_000  # Silero VAD runs at 8 or 16 kHz
VAD_PEAK = 0.5  # clips are peak-normalised before the VAD
MEASURE_COLUMNS = ("f0_hz", "rate_lps", "loudness_lufs", "speech_s", "seconds")


def median_f0(wav: np.ndarray, sr: int, floor: float = F0_FLOOR, ceiling: float = F0_CEILING) -> float:
    """Median F0 (Hz) over the frames Praat calls voiced; NaN when none is."""
    import parselmouth

    wav = np.asarray(wav, np.float32)
    if sr != PITCH_SAMPLE_RATE:
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), sr, PITCH_SAMPLE_RATE).numpy()
    if len(wav) < int(3 / floor * PITCH_SAMPLE_RATE):  # Praat's window holds three periods of the floor
        return math.nan
    pitch = parselmouth.Sound(wav.astype(np.float64), sampling_frequency=PITCH_SAMPLE_RATE).to_pitch_cc(
        time_step=PITCH_STEP_S, pitch_floor=floor, pitch_ceiling=ceiling)
    f0 = pitch.selected_array["frequency"]
    f0 = f0[f0 > 0]
    return float(np.median(f0)) if f0.size else math.nan


@functools.lru_cache(maxsize=1)
def _vad_model():
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # silero-vad 6 still calls importlib.resources.path (deprecated)
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()  # TorchScript model from the wheel's own data folder


def speech_segments(wav: np.ndarray, sr: int) -> list[tuple[float, float]]:
    """[(start_s, end_s)] of speech found by Silero VAD (its defaults: threshold 0.5, 250 ms minimum speech,
    100 ms minimum silence, 30 ms padding) on the peak-normalised clip, so the answer does not depend on gain."""
    from silero_vad import get_speech_timestamps

    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak == 0.0:
        return []
    x = x * (VAD_PEAK / peak)  # Silero's decisions depend on level: a quiet clip must not be read as faster
    if sr != VAD_SAMPLE_RATE:
        import torchaudio.functional as AF

        x = AF.resample(x, sr, VAD_SAMPLE_RATE)
    with torch.inference_mode():
        stamps = get_speech_timestamps(x, _vad_model(), sampling_rate=VAD_SAMPLE_RATE)
    return [(s["start"] / VAD_SAMPLE_RATE, s["end"] / VAD_SAMPLE_RATE) for s in stamps]


def speech_seconds(wav: np.ndarray, sr: int) -> float:
    """Seconds of speech (VAD segments summed); 0 for silence or noise."""
    return float(sum(e - s for s, e in speech_segments(wav, sr)))


def speaking_rate(wav: np.ndarray, sr: int, transcript: str, speech_s: float | None = None) -> float:
    """Letters per second of speech (NaN when the VAD finds no speech)."""
    letters = sum(ch.isalpha() for ch in transcript)
    dur = speech_seconds(wav, sr) if speech_s is None else speech_s
    return letters / dur if dur > 0 else math.nan


def loudness_lufs(wav: np.ndarray, sr: int) -> float:
    wav = np.asarray(wav, np.float32)
    if not np.any(wav):
        return -math.inf
    if len(wav) >= int(0.4 * sr):
        import torchaudio.functional as AF

        val = float(AF.loudness(torch.from_numpy(wav)[None], sr))
        if math.isfinite(val):
            return val
    return float(20 * np.log10(np.sqrt(np.mean(wav.astype(np.float64) ** 2)) + 1e-12))


def measure(wav: np.ndarray, sr: int, transcript: str) -> dict[str, float]:
    """Every column of `MEASURE_COLUMNS` for one clip."""
    speech_s = speech_seconds(wav, sr)
    return {"f0_hz": median_f0(wav, sr), "rate_lps": speaking_rate(wav, sr, transcript, speech_s),
            "loudness_lufs": loudness_lufs(wav, sr), "speech_s": speech_s, "seconds": len(wav) / sr}
