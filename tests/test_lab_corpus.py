"""The lab corpus: hundreds of distinct voices, calibrated levels that the audio realises, held-out wording."""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import soundfile as sf

from tts_core.corpus.calibration import VoiceCalibration
from tts_core.corpus.demo import DemoCorpusConfig, LOUDNESS_TARGET_LUFS, PEAK_LIMIT, generate_demo_corpus, main, \
    plan_clips
from tts_core.corpus.reading import parse_instruction
from tts_core.corpus.voices import ENGLISH_ACCENTS, lab_voices, parse_voice
from tts_core.evaluation.directions import accuracies
from tts_core.evaluation.measures import measure

N_VOICES, N = 12, 36  # 3 clips per voice: small enough for CI (calibration ~4 s, render + measures ~6 s)


@pytest.fixture(scope="module")
def lab_rows(tmp_path_factory):
    cfg = DemoCorpusConfig(out_dir=tmp_path_factory.mktemp("lab"), n_clips=N, voices=lab_voices()[:N_VOICES],
                           calibrated=True, held_out_wording=0.5)
    corpus = generate_demo_corpus(cfg)
    with corpus.attributes.open(encoding="utf-8", newline="") as f:
        attrs = list(csv.DictReader(f))
    meta = [line.split("|") for line in corpus.metadata.read_text(encoding="utf-8").splitlines()]
    rows = []
    for a, (path, text, instruction, speaker) in zip(attrs, meta, strict=True):
        wav, sr = sf.read(corpus.root / path, dtype="float32")
        rows.append({**a, "instruction": instruction, "meta_speaker": speaker, "wav": wav, "sr": sr, "text": text,
                     **measure(wav, sr, text)})
    return rows


def test_catalogue_has_hundreds_of_distinct_voices():
    ids = lab_voices()
    voices = [parse_voice(v) for v in ids]
    assert len(set(ids)) == len(ids) >= 600
    assert len({(v.espeak, v.pitch_factor) for v in voices}) == len(ids)  # distinct settings, not just names
    assert {v.espeak.split("+")[0] for v in voices} == set(ENGLISH_ACCENTS)
    variants = {v.variant: v.gender for v in voices}
    assert sum(g == "female" for g in variants.values()) >= 15 and sum(g == "male" for g in variants.values()) >= 20
    assert sorted(lab_voices(seed=1)) == sorted(ids) and lab_voices(seed=1)[:20] != ids[:20]
    head = [parse_voice(v) for v in ids[:N_VOICES]]  # any prefix is mixed
    assert {v.gender for v in head} == {"male", "female"} and len({v.espeak.split("+")[0] for v in head}) >= 4


def test_espeak_voices_of_the_catalogue_sound_distinct(one_thread):
    """VoiceEncoder identifies the voice: each clip's nearest other clip is the same voice's other sentence.
    Seen on these 12 voices: 24 of 24; within-voice cosine 0.96, between 0.69 (on the first 16: 28 of 32)."""
    import torch
    import torchaudio.functional as AF

    from tts_core.corpus.espeak import EspeakSynth
    from tts_core.corpus.sentences import SENTENCES
    from tts_core.encoders.voice_encoder import VoiceEncoder

    synth = EspeakSynth()
    voices = list(dict.fromkeys(parse_voice(v).espeak for v in lab_voices()))[:N_VOICES]
    wavs, labels = [], []
    for voice, k in itertools.product(voices, range(2)):
        wav = synth.synth(f"{SENTENCES[10 + k]} {SENTENCES[30 + k]}", voice)
        wavs.append(AF.resample(torch.from_numpy(wav), synth.sample_rate, 16_000).numpy())
        labels.append(voice)
    emb = VoiceEncoder.from_resemblyzer().eval().embed_batch(wavs)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = emb @ emb.T
    np.fill_diagonal(cos, -1.0)
    assert np.mean([labels[i] == labels[j] for i, j in enumerate(cos.argmax(1))]) >= 0.75
    same = np.asarray(labels)[:, None] == np.asarray(labels)[None, :]
    np.fill_diagonal(same, False)
    assert cos[same].mean() > cos[~same & (cos > -1)].mean() + 0.15


def test_calibrated_levels_are_realised_in_the_audio(lab_rows):
    acc = accuracies([{**r, **{k: r[k] for k in ("gender", "pitch", "rate", "loudness")}} for r in lab_rows])
    print({k: (round(v["accuracy"], 3), v["pairs"]) for k, v in acc.items()})
    for attr, v in acc.items():
        assert v["pairs"] >= 30 and v["accuracy"] >= 0.98, (attr, v)  # seen: 1.0 on each
    f0 = [r["f0_hz"] / float(r["target_f0_hz"]) for r in lab_rows]
    lps = [r["rate_lps"] / float(r["target_lps"]) for r in lab_rows]
    # seen over (seed, first voice) (0, 0), (1, 0), (2, 12), (0, 300): every accuracy 1.0 but rate 0.993 once;
    # F0 0.80-1.48 of target (far from 1 only where the target is out of the voice's calibrated reach), median
    # 0.98-1.00; rate 0.63-1.44 (sentences differ in letters per sound), median 0.99-1.02
    assert 0.9 < np.median(f0) < 1.1 and 0.7 < min(f0) and max(f0) < 1.6, f0
    assert 0.9 < np.median(lps) < 1.1 and 0.55 < min(lps) and max(lps) < 1.6, lps
    for r in lab_rows:  # loudness is a gain: exact unless the peak limit stopped it
        if float(r["peak"]) < PEAK_LIMIT - 0.01:
            assert r["loudness_lufs"] == pytest.approx(float(r["target_lufs"]), abs=0.3)
        assert abs(float(r["target_lufs"]) - LOUDNESS_TARGET_LUFS[r["loudness"]]) <= 1.5


def test_speakers_genders_and_held_out_wording(lab_rows):
    assert len({r["meta_speaker"] for r in lab_rows}) == N_VOICES
    for r in lab_rows:
        assert r["meta_speaker"] == r["speaker"] and "@" in r["speaker"]
        assert r["gender"] == parse_voice(r["speaker"]).gender
        assert parse_instruction(r["instruction"]) == {k: r[k] for k in ("gender", "pitch", "rate", "loudness")}
    held = sum(r["wording"] == "held_out" for r in lab_rows)
    assert 0.25 * N < held < 0.75 * N  # a share of 0.5, drawn per clip


def test_calibration_interpolates_and_plans_refuse_what_they_cannot_do(tmp_path):
    cal = VoiceCalibration((10, 50, 90), (100.0, 150.0, 250.0), (130, 240), (10.0, 20.0))
    assert [cal.pitch_for(f) for f in (100.0, 150.0, 250.0)] == [10, 50, 90]
    assert 10 < cal.pitch_for(120.0) < 50 and cal.pitch_for(20.0) == 10 and cal.pitch_for(2000.0) == 90
    assert cal.rate_for(10.0) == 130 and cal.rate_for(20.0) == 240 and 130 < cal.rate_for(15.0) < 240
    with pytest.raises(ValueError, match="calibrated"):
        plan_clips(DemoCorpusConfig(out_dir=tmp_path, n_clips=4, voices=("en+m3@0.92",)))
    with pytest.raises(ValueError, match="no calibration"):
        plan_clips(DemoCorpusConfig(out_dir=tmp_path, n_clips=4, voices=("en+m3",), calibrated=True), {})
    plan = plan_clips(DemoCorpusConfig(out_dir=tmp_path, n_clips=30, voices=("en+m3", "en+f3@1.08"),
                                       calibrated=True), {"en+m3": cal, "en+f3": cal})
    for s in plan:  # the female voice's targets are her gender's, times her own factor
        assert (s.voice == "en+f3@1.08") == (s.target_f0_hz > 150) and s.espeak_voice == s.voice.split("@")[0]
    assert main(["--out", str(tmp_path / "x"), "--voices", "en+nobody"]) == 2  # one error line, no traceback


def test_world_vq_tokens_carry_every_attribute(lab_rows, one_thread):
    """The lab's tokenizer + vocoder ceiling (issue #10: ≥ 0.95 on every attribute): each clip → world-vq tokens
    (fitted on these 36 clips, as build-cache fits it) → WORLD audio → the evaluation's measures.
    Seen: this sample 1.0 / 1.0 / 1.0 (pitch / rate / loudness); other 36-clip samples (12 voices of
    `lab_voices(seed=s)`, corpus seed s, s = 0-4) 1.0 on every attribute except pitch 0.986 for s = 4, where
    ground truth scores 0.986 too; token F0 / ground-truth F0 median 0.99-1.00, all clips within 10%."""
    import torch
    import torchaudio.functional as AF

    from tts_core.encoders.world_vq import WorldVQTokenizer

    wavs = [AF.resample(torch.from_numpy(r["wav"]), r["sr"], 16_000).numpy() for r in lab_rows]
    tok = WorldVQTokenizer.fit(wavs, seed=0)
    rows = [{**{k: r[k] for k in ("gender", "pitch", "rate", "loudness")},
             **measure(tok.decode(tok.tokenize_batch([w])[0]), 16_000, r["text"])} for r, w in zip(lab_rows, wavs)]
    acc = accuracies(rows)
    print({k: (round(v["accuracy"], 3), v["pairs"]) for k, v in acc.items()})
    assert all(v["accuracy"] >= 0.95 and v["pairs"] >= 60 for v in acc.values()), acc
    ratio = np.array([x["f0_hz"] / r["f0_hz"] for x, r in zip(rows, lab_rows)])
    assert np.median(np.abs(ratio - 1)) < 0.05
