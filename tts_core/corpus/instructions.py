"""Turn discrete voice attributes into a varied natural-language instruction (pure, seeded).

Why many phrasings: the instruction encoder must learn the *attributes*, not one template's wording. Every
phrasing names all four attributes with words that belong to exactly one level (e.g. "deep" only ever means
low pitch, "volume" only appears in loudness phrases), so a human, or `reading.parse_instruction`, can read
them back.

Two wordings: ``train`` (what a corpus normally uses) and ``held_out`` (other templates and other words for
every level: "bass", "whispery", "neither fast nor slow", ...). A corpus can write a share of its clips with
the held-out wording, so an evaluation can ask whether a model follows wording it never saw in training.
The two share no template and no slot phrase, and every held-out phrase has a word no training text has
(tests/test_instructions.py checks all of this exhaustively).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

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


# Slot vocabularies of the training wording. Keys: attribute level -> interchangeable phrasings.
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


@dataclass(frozen=True)
class Wording:
    """One set of slot vocabularies and templates (see `make_instruction` for the slots)."""

    pitch_adj: Mapping[str, tuple[str, ...]]
    voice: Mapping[str, tuple[str, ...]]
    person: Mapping[str, tuple[str, ...]]
    rate_adv: Mapping[str, tuple[str, ...]]
    rate_pred: Mapping[str, tuple[str, ...]]
    loud_adv: Mapping[str, tuple[str, ...]]
    loud_pred: Mapping[str, tuple[str, ...]]
    filler: tuple[str, ...]
    templates: tuple[str, ...]


# slot of a `Wording` -> the attribute its phrases state (gender is read from its own words, see reading.py)
SLOT_ATTRIBUTE = {"pitch_adj": "pitch", "rate_adv": "rate", "rate_pred": "rate", "loud_adv": "loudness",
                  "loud_pred": "loudness"}


_HELD_OUT = Wording(
    pitch_adj={"low": ("bass", "deep-toned", "husky, low-register"),
               "mid": ("middle-register", "mid-range"),
               "high": ("squeaky", "shrill", "piping", "treble")},
    voice={"male": ("guy's voice", "male timbre"), "female": ("girl's voice", "female timbre")},
    person={"male": ("a guy", "a male reader", "a fellow"), "female": ("a girl", "a female reader", "a gal")},
    rate_adv={"slow": ("languidly", "at a crawl", "in a drawn-out manner"),
              "normal": ("at an everyday tempo", "at a typical speed", "neither hurriedly nor sluggishly"),
              "fast": ("hastily", "speedily", "at a gallop", "in a rush")},
    rate_pred={"slow": ("drawn-out", "sluggish", "plodding"),
               "normal": ("typical in tempo", "neither fast nor slow", "evenly paced"),
               "fast": ("hasty", "speedy", "rushed")},
    loud_adv={"quiet": ("in a whisper", "faintly", "in a murmur"),
              "normal": ("at an everyday loudness", "at a typical loudness", "neither loudly nor softly"),
              "loud": ("thunderously", "at full volume", "in a bellowing tone")},
    loud_pred={"quiet": ("whispery", "faint", "barely audible", "subdued"),
               "normal": ("neither loud nor soft", "of ordinary loudness", "typical in loudness"),
               "loud": ("thunderous", "bellowing", "blaring", "deafening")},
    filler=("crisp", "smooth", "expressive", "even"),
    templates=(
        "Imagine {person} with a {pitch} voice who talks {rate_adv} and {loud_adv}.",
        "The voice should be {pitch}, the delivery {rate_pred} and {loud_pred}; the speaker is {person}.",
        "Make it sound like {person} with a {filler}, {pitch} voice, {rate_pred} and {loud_pred}.",
        "In a {pitch} {voice}, deliver this {loud_adv} and {rate_adv}.",
        "Picture a {pitch} {voice} reciting {rate_adv}; it comes out {loud_pred}.",
    ),
)

WORDINGS: dict[str, Wording] = {
    "train": Wording(_PITCH_ADJ, _VOICE, _PERSON, _RATE_ADV, _RATE_PRED, _LOUD_ADV, _LOUD_PRED, _FILLER, _TEMPLATES),
    "held_out": _HELD_OUT,
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_instruction(attrs: VoiceAttributes, seed: int, wording: str = "train") -> str:
    """One instruction for `attrs` in one of `WORDINGS`; the same arguments always give the same text."""
    if wording not in WORDINGS:
        raise ValueError(f"wording={wording!r}; expected one of {sorted(WORDINGS)}")
    w = WORDINGS[wording]
    salt = "" if wording == "train" else f"{wording}:"  # "train" keeps the texts corpora already have
    rng = random.Random(f"instruction:{salt}{seed}:{attrs.gender}:{attrs.pitch}:{attrs.rate}:{attrs.loudness}")
    slots = {
        "pitch": rng.choice(w.pitch_adj[attrs.pitch]),
        "voice": rng.choice(w.voice[attrs.gender]),
        "person": rng.choice(w.person[attrs.gender]),
        "rate_adv": rng.choice(w.rate_adv[attrs.rate]),
        "rate_pred": rng.choice(w.rate_pred[attrs.rate]),
        "loud_adv": rng.choice(w.loud_adv[attrs.loudness]),
        "loud_pred": rng.choice(w.loud_pred[attrs.loudness]),
        "filler": rng.choice(w.filler),
    }
    slots.update({_cap(k): _cap(v) for k, v in list(slots.items())})
    text = rng.choice(w.templates).format(**slots)
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)  # "a average-pitched" -> "an ..."


def paraphrases(attrs: VoiceAttributes, seed: int, n: int, wording: str = "train",
                exclude: Callable[[str], bool] = lambda t: False, tries: int = 16) -> list[str]:
    """Up to ``n`` distinct instructions for ``attrs`` in ``wording`` skipping texts
    ``exclude`` refuses (seeded by ``seed``): more captions of one clip, the way paraphrased datasets describe a recording."""
    seeds = random.Random(f"paraphrases/{seed}")
    out: list[str] = []
    for j in range(n * tries):
        if len(out) == n:
            break
        t = make_instruction(attrs, seeds.randrange(2**31), wording)
        if t not in out and not exclude(t):
            out.append(t)
    return out
