"""Instructions: generated in two disjoint wordings, and read back from free-form phrasings."""
from __future__ import annotations

import itertools
import re

import pytest

from tts_core.corpus.instructions import GENDERS, LOUDNESSES, PITCHES, RATES, SLOT_ATTRIBUTE, WORDINGS, \
    VoiceAttributes, make_instruction
from tts_core.corpus.reading import parse_instruction

COMBOS = [VoiceAttributes(*c) for c in itertools.product(GENDERS, PITCHES, RATES, LOUDNESSES)]
SLOTS = ("pitch_adj", "voice", "person", "rate_adv", "rate_pred", "loud_adv", "loud_pred")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text.lower())))


def _all_words(wording) -> set[str]:
    """Every word any instruction of this wording can contain: its templates and all its slot phrases."""
    words = set().union(*(_words(t) for t in wording.templates), *(_words(f) for f in wording.filler))
    for slot in SLOTS:
        for phrases in getattr(wording, slot).values():
            words |= set().union(*(_words(p) for p in phrases))
    return words


@pytest.mark.parametrize("wording", sorted(WORDINGS))
def test_parse_reads_back_every_generated_instruction(wording):
    for attrs in COMBOS:
        texts = [make_instruction(attrs, seed, wording) for seed in range(24)]
        for text in texts:
            assert parse_instruction(text) == {"gender": attrs.gender, "pitch": attrs.pitch, "rate": attrs.rate,
                                               "loudness": attrs.loudness}, text
            assert text[0].isupper() and text.endswith((".", "?")) and not re.search(r"\ba [aeiou]", text)
        assert len(set(texts)) >= 15, (wording, attrs)


def test_held_out_wording_never_occurs_in_training():
    train, held = WORDINGS["train"], WORDINGS["held_out"]
    assert not set(train.templates) & set(held.templates)
    train_words = _all_words(train)  # exhaustive: no sampling of seeds
    for slot in SLOTS:
        for level, phrases in getattr(held, slot).items():
            assert not set(phrases) & set(getattr(train, slot)[level]), (slot, level)
            if slot in SLOT_ATTRIBUTE:  # every attribute phrase has a word no training instruction can contain
                for phrase in phrases:
                    assert _words(phrase) - train_words, (slot, phrase)
    for attrs in COMBOS:
        for seed in range(8):
            text = make_instruction(attrs, seed, "held_out")
            assert _words(text) - train_words, text
            assert text not in {make_instruction(attrs, s) for s in range(40)}
    assert make_instruction(COMBOS[0], 3) == make_instruction(COMBOS[0], 3, "train")  # train is the default
    with pytest.raises(ValueError, match="wording"):
        make_instruction(COMBOS[0], 0, "test")


# (instruction, expected levels: gender, pitch, rate, loudness; None = not stated or contradictory)
PHRASINGS = [
    ("A deep, slow male voice.", ("male", "low", "slow", None)),
    ("A woman whispering quickly in a high-pitched voice", ("female", "high", "fast", "quiet")),
    ("a booming baritone", (None, "low", None, "loud")),
    ("Whispery and squeaky, like a little girl.", ("female", "high", None, "quiet")),
    ("He talks speaking slowly, not loud.", ("male", None, "slow", "normal")),
    ("She should sound neither fast nor slow, and not too quiet.", ("female", None, "normal", "normal")),
    ("Not a man: a lady with a lower voice, a bit faster than usual.", ("female", "low", "fast", None)),
    ("Please don't shout; a calm gentleman at a moderate pace.", ("male", None, "normal", "normal")),
    ("A voice that is not high but deep, and less loud than normal.", (None, "low", None, "quiet")),
    ("Speak rapidly at full volume in a shrill tone.", (None, "high", "fast", "loud")),
    ("Medium pitch, normal volume, average speed, male.", ("male", "mid", "normal", "normal")),
    ("Pace: normal. Volume: high. Pitch: low. Speaker: woman.", ("female", "low", "normal", "loud")),
    ("A soft-spoken, unhurried grandmother.", ("female", None, "slow", "quiet")),
    ("A thunderous man's voice, hasty and rushed.", ("male", None, "fast", "loud")),
    ("Neither high nor low in pitch; a hushed, leisurely delivery from a guy.", ("male", "mid", "slow", "quiet")),
    ("Less quickly, and not whispering.", (None, None, "slow", "normal")),
    ("An ordinary-paced reading in a middle register.", (None, "mid", "normal", None)),
    ("a voice that is both loud and quiet", (None, None, None, None)),  # contradictory: unknown
    ("the woman and the man", (None, None, None, None)),
    ("Read it.", (None, None, None, None)),
]


@pytest.mark.parametrize("text,expected", PHRASINGS)
def test_parse_free_form_phrasings(text, expected):
    assert parse_instruction(text) == dict(zip(("gender", "pitch", "rate", "loudness"), expected))
