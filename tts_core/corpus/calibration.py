"""Per-voice calibration: which espeak-ng pitch and rate settings give a target F0 and speaking rate.

Why: espeak-ng's variants differ widely at equal settings (one sentence at pitch 20 → 80: 'aunty' 107 → 272 Hz,
'Annie' 190 → 285 Hz; at 175 wpm 'Marco' speaks 13.7 letters/s, 'anika' 22.5), so with hundreds of voices,
fixed settings per level would not keep every 'low' below every 'high'. Each espeak voice is spoken at a few
settings and measured with the evaluation's own measures (`tts_core.evaluation.measures`); a calibrated
corpus then asks for a target F0 and rate per level and interpolates the settings (log F0 piecewise-linear
in the pitch setting, never outside the measured settings: below pitch 20 some variants drop under 60 Hz,
where F0 trackers fail, e.g. 'AnxiousAndy'; log rate linear in log wpm).

Like the corpus renders, calibration runs in freshly spawned processes with a fixed assignment of voices, so
its numbers (and the corpus built on them) do not depend on worker count or on what the caller spoke before.
"""
from __future__ import annotations

import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from tts_core.corpus.espeak import RATE_MAX, RATE_MIN, EspeakParams, EspeakSynth

CALIBRATION_VERSION = 2
CAL_TEXT = "It is a capital mistake to theorize before one has data. Would you tell me which way I ought to go?"
PITCH_POINTS = (20, 50, 80)  # espeak pitch settings spoken at 175 wpm; the corpus stays within them
RATE_POINTS = (130, 240)  # wpm spoken at pitch 50
CAL_VOLUME = 60


@dataclass(frozen=True)
class VoiceCalibration:
    pitch_points: tuple[int, ...]
    f0_hz: tuple[float, ...]  # median F0 measured at each pitch point
    rate_points: tuple[int, ...]
    letters_per_s: tuple[float, ...]  # measured at each rate point

    def pitch_for(self, f0_hz: float) -> int:
        """espeak pitch expected to give `f0_hz`, within the measured settings (a target out of the voice's
        reach gets its nearest end: the level still goes the right way, less far)."""
        return int(round(float(np.interp(math.log(f0_hz), np.log(self.f0_hz), self.pitch_points))))

    def rate_for(self, letters_per_s: float) -> int:
        """espeak wpm expected to give `letters_per_s` of speech (power law through the two points)."""
        (w0, w1), (l0, l1) = self.rate_points, self.letters_per_s
        b = math.log(l1 / l0) / math.log(w1 / w0)
        wpm = w0 * (letters_per_s / l0) ** (1.0 / b)
        return int(round(min(RATE_MAX, max(RATE_MIN, wpm))))

    @classmethod
    def from_dict(cls, d: dict) -> "VoiceCalibration":
        return cls(**{k: tuple(v) for k, v in d.items()})


def calibrate_voice(synth: EspeakSynth, espeak_voice: str) -> VoiceCalibration:
    from tts_core.evaluation.measures import median_f0, speaking_rate

    sr = synth.sample_rate
    f0 = [median_f0(synth.synth(CAL_TEXT, espeak_voice, EspeakParams(pitch=p, volume=CAL_VOLUME)), sr)
          for p in PITCH_POINTS]
    lps = [speaking_rate(synth.synth(CAL_TEXT, espeak_voice, EspeakParams(rate=w, volume=CAL_VOLUME)), sr, CAL_TEXT)
           for w in RATE_POINTS]
    if not all(math.isfinite(v) and v > 0 for v in (*f0, *lps)) or np.any(np.diff(f0) <= 0) or lps[1] <= lps[0]:
        raise RuntimeError(f"espeak voice {espeak_voice!r} cannot be calibrated: F0 {f0} Hz, rate {lps} letters/s "
                           f"at {PITCH_POINTS} / {RATE_POINTS}; leave it out of the corpus's voices")
    return VoiceCalibration(PITCH_POINTS, tuple(round(v, 3) for v in f0), RATE_POINTS, tuple(round(v, 4) for v in lps))


def _calibrate_group(espeak_voices: list[str]) -> dict[str, dict]:
    """Worker: one group's voices, in order, in a fresh process."""
    import torch

    torch.set_num_threads(1)
    synth = EspeakSynth()
    return {v: asdict(calibrate_voice(synth, v)) for v in espeak_voices}


def calibrate_voices(espeak_voices: Sequence[str], groups: int, workers: int) -> dict[str, VoiceCalibration]:
    """Calibrate each distinct espeak voice; voice k goes to group k % groups, each group a fresh process."""
    unique = list(dict.fromkeys(espeak_voices))
    parts = [unique[g::groups] for g in range(min(groups, len(unique)))]
    out: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        for fut in [ex.submit(_calibrate_group, part) for part in parts]:
            out.update(fut.result())
    return {v: VoiceCalibration.from_dict(out[v]) for v in unique}
