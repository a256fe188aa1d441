"""Turn discrete voice attributes into a varied natural-language instruction (pure, seeded).

Why many phrasings: the instruction encoder must learn the *attributes*, not one template's wording. Every
phrasing names all four attributes with words that belong to exactly one level (e.g. "deep" only ever means
low pitch, "volume" only appears in loudness phrases), so a human, or a keyword parser, can read them back.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

Gender = Literal["male", "female"]
Level3 = Literal["low", "mid", "high"]
Rate = Literal["slow", "normal", "fast"]
Loudness = Literal["quiet", "normal", "loud"]

GENDERS: tuple[Gender, ...] = ("male", "female")
PITCHES: tuple[Level3, ...] = ("low", "mid", "high")
RATES: tuple[Rate, ...] = ("slow", "normal", "fast")
LOUDNESSES: tuple[Loudness, ...] = ("quiet", "normal", "loud")


@dataclass(frozen=True)
class VoiceAttributes:
    gender: Gender
    pitch: Level3
    rate: Rate
    loudness: Loudness

    def __post_init__(self) -> None:
        for name, allowed in (("gender", GENDERS), ("pitch", PITCHES), ("rate", RATES), ("loudness", LOUDNESSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")


# Slot vocabularies. Keys: attribute level -> interchangeable phrasings.
_PITCH_ADJ = {  # before "voice"/"male voice": "a deep male voice"
    "low": ("deep", "low-pitched", "low", "deep, low-pitched", "rich, deep"),
    "mid": ("medium-pitched", "mid-pitched", "moderately pitched", "average-pitched"),
    "high": ("high-pitched", "high", "light, high-pitched", "bright, high-pitched"),
}
_VOICE = {  # gendered noun phrase ending in "voice"
    "male": ("male voice", "man's voice", "masculine voice"),
    "female": ("female voice", "woman's voice", "feminine voice"),
}
_PERSON = {
    "male": ("a man", "a male speaker", "a male narrator", "a gentleman"),
    "female": ("a woman", "a female speaker", "a female narrator", "a lady"),
}
_RATE_ADV = {  # "speak ___"
    "slow": ("slowly", "at a slow pace", "at a leisurely pace", "unhurriedly", "slowly, without hurry"),
    "normal": ("at a normal pace", "at a moderate pace", "at a natural speed", "at an average speed",
               "at a regular tempo"),
    "fast": ("quickly", "fast", "at a fast pace", "rapidly", "briskly"),
}
_RATE_PRED = {  # "the delivery is ___"
    "slow": ("slow", "unhurried", "leisurely"),
    "normal": ("at a normal pace", "at a moderate pace", "at a natural speed"),
    "fast": ("fast", "quick", "rapid", "brisk"),
}
_LOUD_ADV = {
    "quiet": ("quietly", "softly", "in a hushed tone", "in a soft, quiet tone"),
    "normal": ("at a normal volume", "at a moderate volume", "at a conversational volume", "at a medium volume"),
    "loud": ("loudly", "in a loud, booming way", "in a loud, clear tone", "with a loud, projecting delivery"),
}
_LOUD_PRED = {
    "quiet": ("quiet", "soft", "hushed"),
    "normal": ("at a normal volume", "at a conversational volume", "at a moderate volume"),
    "loud": ("loud", "booming", "very loud"),
}
_FILLER = ("calm", "clear", "friendly", "warm", "plain", "neutral", "pleasant", "natural")

_TEMPLATES = (
    "Speak {rate_adv} and {loud_adv} in a {pitch} {voice}.",
    "A {pitch} {voice}, {rate_pred} and {loud_pred}.",
    "Please read this {rate_adv} with a {filler}, {pitch} {voice}, {loud_adv}.",
    "{Person} with a {pitch} voice, reading {rate_adv} and {loud_adv}.",
    "Use a {pitch} {voice} and talk {rate_adv}, {loud_adv}.",
    "I'd like {person} with a {pitch} voice; the delivery should be {rate_pred} and {loud_pred}.",
    "{Rate_adv}, {loud_adv}, in a {pitch} {voice}.",
    "Read the line {loud_adv} and {rate_adv}; the speaker is {person} with a {pitch} voice.",
    "Narrate {rate_adv} with a {filler} {pitch} {voice}, {loud_adv}.",
    "{Pitch} {voice}, {loud_pred}, speaking {rate_adv}.",
    "Say it {loud_adv} and {rate_adv}, as {person} with a {pitch} voice would.",
    "Voice: {person} with a {pitch} voice. Pace: {rate_pred}. Volume: {loud_pred}.",
    "Generate speech from {person} whose voice is {pitch}, speaking {rate_adv} and {loud_adv}.",
    "Could you say this {rate_adv} in a {filler}, {pitch} {voice}? Keep it {loud_pred}.",
    "Let {person} read this {loud_adv}, {rate_adv}, with a {pitch} voice.",
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_instruction(attrs: VoiceAttributes, seed: int) -> str:
    """One instruction for `attrs`; the same (attrs, seed) always gives the same text."""
    rng = random.Random(f"instruction:{seed}:{attrs.gender}:{attrs.pitch}:{attrs.rate}:{attrs.loudness}")
    slots = {
        "pitch": rng.choice(_PITCH_ADJ[attrs.pitch]),
        "voice": rng.choice(_VOICE[attrs.gender]),
        "person": rng.choice(_PERSON[attrs.gender]),
        "rate_adv": rng.choice(_RATE_ADV[attrs.rate]),
        "rate_pred": rng.choice(_RATE_PRED[attrs.rate]),
        "loud_adv": rng.choice(_LOUD_ADV[attrs.loudness]),
        "loud_pred": rng.choice(_LOUD_PRED[attrs.loudness]),
        "filler": rng.choice(_FILLER),
    }
    slots.update({_cap(k): _cap(v) for k, v in list(slots.items())})
    text = rng.choice(_TEMPLATES).format(**slots)
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)  # "a average-pitched" -> "an ..."


# ---- reading instructions back --------------------------------------------------------------------------------
_GENDER_WORDS = {
    "male": ("male", "man", "man's", "masculine", "gentleman", "boy", "guy"),
    "female": ("female", "woman", "woman's", "feminine", "lady", "girl"),
}
_EXTRA = {  # free-form words users type that the templates do not use
    "pitch": {"low": ("low-pitched", "deep", "bass", "baritone"), "high": ("high-pitched", "squeaky", "shrill")},
    "rate": {"slow": ("slow", "slowly"), "fast": ("fast", "quick", "quickly", "rapid", "rapidly", "hurried")},
    "loudness": {"quiet": ("quiet", "quietly", "soft", "softly", "whisper", "whispering", "hushed"),
                 "loud": ("loud", "loudly", "booming", "shouting")},
}


def _lexicon() -> dict[str, list[tuple[str, str]]]:
    """attribute → [(phrase, level)], longest phrase first, from the same vocabularies `make_instruction` uses."""
    table: dict[str, dict[str, set[str]]] = {"gender": {}, "pitch": {}, "rate": {}, "loudness": {}}
    sources = {"pitch": (_PITCH_ADJ,), "rate": (_RATE_ADV, _RATE_PRED), "loudness": (_LOUD_ADV, _LOUD_PRED),
               "gender": (_GENDER_WORDS,)}
    for attr, dicts in sources.items():
        for d in (*dicts, _EXTRA.get(attr, {})):
            for level, phrases in d.items():
                table[attr].setdefault(level, set()).update(p.lower() for p in phrases)
    return {a: sorted(((p, lv) for lv, ps in levels.items() for p in ps), key=lambda x: -len(x[0]))
            for a, levels in table.items()}


_LEXICON = _lexicon()


def parse_instruction(text: str) -> dict[str, str | None]:
    """Read gender / pitch / rate / loudness levels back from an instruction (None: not stated or ambiguous).

    Longest phrases win and consume their words ("high-pitched" is not also "high"), whole words only.
    Exact for every instruction `make_instruction` writes (tested); a best effort on free-form text,
    which is what evaluation needs: which direction did the instruction ask for.
    """
    out: dict[str, str | None] = {}
    for attr, entries in _LEXICON.items():
        rest = " " + re.sub(r"[^\w'\- ]+", " ", text.lower()) + " "
        found = set()
        for phrase, level in entries:
            pat = r"(?<![\w'\-])" + re.escape(phrase) + r"(?![\w'\-])"
            if re.search(pat, rest):
                found.add(level)
                rest = re.sub(pat, " ", rest)
        out[attr] = found.pop() if len(found) == 1 else None
    return out
