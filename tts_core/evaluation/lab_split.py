"""Which lab-corpus clips train and which are held out, decided before anything trains.

Roles (one per clip):

* ``held_out_voice``: every clip of a held-out *espeak voice* — the speaker id before ``@``, so the two pitch-factor
  twins of one espeak voice (`voices.py`) go together and neither leaks into training; voices are drawn by a salted
  hash (`stage1.data` rule), ``voice_frac`` of them;
* ``held_out_instruction``: the other clips whose instruction uses the held-out wording (phrasings no training text
  contains), and the clips whose instruction *text* hashes below ``instruction_frac``;
* ``dropped``: a train-wording clip whose (normalised) instruction text equals a held-out clip's — used by
  neither side, so no instruction text is both trained on and scored;
* ``train``: the rest.

Nothing held out ever reaches a training cache: the lab builds the training store from the ``train`` clips only.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from tts_core.stage1.data import _held_keys, normalise_instruction

TRAIN, HELD_OUT_INSTRUCTION, HELD_OUT_VOICE, DROPPED = "train", "held_out_instruction", "held_out_voice", "dropped"
HELD_OUT = (HELD_OUT_INSTRUCTION, HELD_OUT_VOICE)
SALT = "instruct-tts/lab"


def espeak_voice(speaker: str) -> str:
    """``en-us+f2@0.92`` → ``en-us+f2``: the unit a held-out voice split holds out."""
    return str(speaker).partition("@")[0]


def espeak_variant(speaker: str) -> str:
    """``en-us+f2@0.92`` → ``f2``: the variant file (timbre, formants), shared across accents and pitch factors."""
    return espeak_voice(speaker).partition("+")[2] or espeak_voice(speaker)


def split_lab_clips(speakers: Sequence[str], wordings: Sequence[str], instructions: Sequence[str],
                    voice_frac: float = 0.1, instruction_frac: float = 0.05, salt: str = SALT) -> list[str]:
    """One role per clip (module doc); inputs are per clip, in corpus order."""
    if not len(speakers) == len(wordings) == len(instructions):
        raise ValueError(f"{len(speakers)} speakers, {len(wordings)} wordings, {len(instructions)} instructions")
    voices = [espeak_voice(s) for s in speakers]
    held_voices = _held_keys(voices, voice_frac, salt + "/voice") if voice_frac > 0 else set()
    norm = [normalise_instruction(t) for t in instructions]
    held_texts = _held_keys(norm, instruction_frac, salt + "/instruction") if instruction_frac > 0 else set()
    roles = []
    for v, w, t in zip(voices, wordings, norm):
        if v in held_voices:
            roles.append(HELD_OUT_VOICE)
        elif w == "held_out" or t in held_texts:
            roles.append(HELD_OUT_INSTRUCTION)
        else:
            roles.append(TRAIN)
    scored = {t for t, r in zip(norm, roles) if r in HELD_OUT}
    return [DROPPED if r == TRAIN and t in scored else r for t, r in zip(norm, roles)]


def role_counts(roles: Sequence[str]) -> dict[str, int]:
    c = Counter(roles)
    return {r: int(c.get(r, 0)) for r in (TRAIN, HELD_OUT_INSTRUCTION, HELD_OUT_VOICE, DROPPED)}
