"""The instruction-following metric, proven on ground truth before it judges a model."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import soundfile as sf

from tts_core.corpus.instructions import GENDERS, LOUDNESSES, PITCHES, RATES, VoiceAttributes, make_instruction, \
    parse_instruction
from tts_core.evaluation.directions import accuracies, direction_accuracy
from tts_core.evaluation.measures import loudness_lufs, measure, median_f0, speaking_rate


def test_parse_reads_back_every_generated_instruction():
    for g, p, r, l in itertools.product(GENDERS, PITCHES, RATES, LOUDNESSES):
        for seed in range(12):
            text = make_instruction(VoiceAttributes(g, p, r, l), seed)
            assert parse_instruction(text) == {"gender": g, "pitch": p, "rate": r, "loudness": l}, text


def test_parse_free_form_and_ambiguity():
    assert parse_instruction("A deep, slow male voice.") == {"gender": "male", "pitch": "low", "rate": "slow",
                                                              "loudness": None}
    got = parse_instruction("A woman whispering quickly in a high-pitched voice")
    assert got == {"gender": "female", "pitch": "high", "rate": "fast", "loudness": "quiet"}
    assert parse_instruction("a voice that is both loud and quiet")["loudness"] is None  # contradictory: unknown
    assert parse_instruction("the woman and the man")["gender"] is None


def test_direction_accuracy_pairs_groups_ties_and_nan():
    acc, n = direction_accuracy([1, 2, 3, 4], ["low", "low", "high", "high"], "low", "high")
    assert (acc, n) == (1.0, 4)
    acc, n = direction_accuracy([3, 1, 2, 3], ["low", "high", "high", "low"], "low", "high")
    assert (acc, n) == (0.0, 4)  # every high clip measured below every low clip
    assert direction_accuracy([2.0, 2.0], ["low", "high"], "low", "high") == (0.5, 1)  # a tie counts one half
    # groups: a high female and a low male are never compared
    acc, n = direction_accuracy([100, 300, 150, 250], ["low", "high", "low", "high"], "low", "high",
                                groups=["m", "f", "f", "m"])
    assert n == 2 and acc == 1.0
    acc, n = direction_accuracy([math.nan, 2.0], ["low", "high"], "low", "high")
    assert n == 0 and math.isnan(acc)


def test_measures_on_synthetic_signals():
    sr = 16_000
    t = np.arange(int(1.5 * sr)) / sr
    low, high = 0.3 * np.sin(2 * np.pi * 110 * t), 0.3 * np.sin(2 * np.pi * 220 * t)
    assert median_f0(low, sr) == pytest.approx(110, rel=0.03) and median_f0(high, sr) == pytest.approx(220, rel=0.03)
    assert loudness_lufs(0.5 * low, sr) < loudness_lufs(low, sr) - 5  # -6 dB of gain
    padded = np.concatenate([np.zeros(sr), low, np.zeros(sr)])
    # silence is trimmed (to trim's frame resolution: up to one 2048-sample frame each side)
    assert speaking_rate(padded, sr, "abc def") == pytest.approx(6 / 1.5, rel=0.1)
    assert speaking_rate(padded, sr, "abc def") > 1.5 * 6 / 3.5  # untrimmed would be 6 / 3.5


def test_ground_truth_corpus_goes_the_instructed_direction(demo_corpus):
    rows = []
    for line in demo_corpus.metadata.read_text().splitlines():
        path, transcript, instruction, _ = line.split("|")
        wav, sr = sf.read(demo_corpus.root / path, dtype="float32")
        rows.append({**measure(wav, sr, transcript), **parse_instruction(instruction)})
    acc = accuracies(rows)
    print({k: (round(v["accuracy"], 3), v["pairs"]) for k, v in acc.items()})
    for attr, v in acc.items():
        assert v["pairs"] >= 20, attr
        assert v["accuracy"] >= 0.95, (attr, v)
