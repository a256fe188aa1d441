"""Voices of the embedded corpus: espeak-ng variant × English accent × the speaker's own pitch.

A voice id is ``<accent>+<variant>`` (what espeak-ng itself takes, e.g. ``en-us+f2``), optionally followed by
``@<pitch factor>`` (e.g. ``en-us+f2@0.92``): the same espeak voice as a different speaker, whose pitch at every
level is that factor times the level's target (calibrated corpora only, see `calibration.py`). The id is the
speaker id in the metadata, so whole voices can be held out. Gender comes from the variant file.

`lab_voices()` is the lab's catalogue: every gendered, human-sounding variant of the installed espeak-ng ×
its English accents × two pitch factors (~640 voices), in a seeded order so any prefix mixes accents,
variants and genders.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from tts_core.corpus.espeak import data_path, variant_gender

ENGLISH_ACCENTS: tuple[str, ...] = ("en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                                    "en-gb-x-rp", "en-us-nyc")
# gendered variants that are not human-like speech: no voicing (whisper*), robots, a growl
EXCLUDED_VARIANTS = frozenset({"whisper", "whisperf", "UniRobot", "anikaRobot", "Demonic"})
LAB_PITCH_FACTORS: tuple[float, ...] = (0.92, 1.08)


@dataclass(frozen=True)
class Voice:
    id: str  # as written in the metadata's speaker column
    espeak: str  # "<accent>+<variant>", what libespeak-ng is given
    variant: str
    gender: str
    pitch_factor: float | None  # None: the plain espeak voice (uncalibrated corpora)


def parse_voice(voice_id: str) -> Voice:
    """Validate a voice id (one clear error naming it) and split it into its parts."""
    espeak, _, factor = voice_id.partition("@")
    variant = espeak.partition("+")[2]
    if not variant:
        raise ValueError(f"voice {voice_id!r} has no variant; use '<language>+<variant>', e.g. 'en+m3'")
    gender = variant_gender(variant)
    if gender not in ("male", "female"):
        raise ValueError(f"voice {voice_id!r} is {gender!r}; instructions need male or female")
    try:
        pitch_factor = float(factor) if factor else None
    except ValueError:
        raise ValueError(f"voice {voice_id!r}: '@' must be followed by a pitch factor, e.g. 'en+m3@0.92'") from None
    if pitch_factor is not None and not 0.5 <= pitch_factor <= 2.0:
        raise ValueError(f"voice {voice_id!r}: pitch factor {pitch_factor} outside 0.5-2")
    return Voice(voice_id, espeak, variant, gender, pitch_factor)


def gendered_variants() -> tuple[str, ...]:
    """Variants of the installed espeak-ng that declare male or female, less `EXCLUDED_VARIANTS`, sorted."""
    out = []
    for path in sorted((data_path() / "voices" / "!v").iterdir()):
        if path.is_file() and path.name not in EXCLUDED_VARIANTS:
            try:
                if variant_gender(path.name) in ("male", "female"):
                    out.append(path.name)
            except ValueError:  # declares no gender
                continue
    return tuple(out)


def lab_voices(accents: tuple[str, ...] = ENGLISH_ACCENTS, variants: tuple[str, ...] | None = None,
               pitch_factors: tuple[float, ...] = LAB_PITCH_FACTORS, seed: int = 0) -> tuple[str, ...]:
    """accent × variant × pitch factor voice ids, shuffled with `seed` (a prefix is a mixed sample)."""
    variants = gendered_variants() if variants is None else variants
    ids = [f"{a}+{v}@{f:g}" for a in accents for v in variants for f in pitch_factors]
    random.Random(f"lab-voices:{seed}").shuffle(ids)
    return tuple(ids)
