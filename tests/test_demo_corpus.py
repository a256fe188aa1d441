"""The espeak-ng demo corpus: deterministic, idempotent, well-formed, and its audio does what its text says."""
import csv
import dataclasses
import itertools
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tts_core.corpus.demo import (DEFAULT_VOICES, DemoCorpusConfig, generate_demo_corpus, plan_clips,
                                  render_clip)
from tts_core.corpus.espeak import EspeakSynth, variant_gender
from tts_core.corpus.instructions import GENDERS, LOUDNESSES, PITCHES, RATES, VoiceAttributes, make_instruction
from tts_core.corpus.sentences import SENTENCES
from tts_core.metadata import read_metadata

N = 24  # 8 default voices x 3: every voice gets each pitch, rate and loudness level exactly once


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_demo_corpus(DemoCorpusConfig(out_dir=tmp_path_factory.mktemp("demo"), n_clips=N, seed=0))


@pytest.fixture(scope="module")
def rows(corpus):
    """attributes.csv rows joined with their metadata line and audio."""
    with corpus.attributes.open(encoding="utf-8", newline="") as f:
        attrs = list(csv.DictReader(f))
    meta = [line.split("|") for line in corpus.metadata.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for a, (path, text, instruction, speaker) in zip(attrs, meta, strict=True):
        assert a["path"] == path and a["speaker"] == speaker
        wav, sr = sf.read(corpus.root / path, dtype="float32")
        out.append({**a, "text": text, "instruction": instruction, "wav": wav, "sr": sr})
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- determinism and idempotency -------------------------------------------------------------------------------

def test_same_config_gives_byte_identical_files(corpus, tmp_path):
    # a different worker count and a parent process that has already spoken must not change a single byte
    EspeakSynth().synth("This utterance changes the library's internal state.", "en+f3")
    again = generate_demo_corpus(DemoCorpusConfig(out_dir=tmp_path / "again", n_clips=N, seed=0, workers=1))
    a, b = _files(corpus.root), _files(again.root)
    assert len([k for k in a if k.endswith(".wav")]) == N
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_smaller_corpus_is_a_prefix_existing_one_is_reused_new_config_regenerates(corpus, tmp_path):
    out = tmp_path / "c"
    first = generate_demo_corpus(DemoCorpusConfig(out_dir=out, n_clips=12, seed=0))
    assert first.generated and first.n_clips == 12
    big = _files(corpus.root)
    for name, data in _files(out).items():
        if name.endswith(".wav"):
            assert big[name] == data, name  # clip i does not depend on n_clips
    big_lines = corpus.metadata.read_text(encoding="utf-8").splitlines()
    assert (out / "metadata.txt").read_text(encoding="utf-8").splitlines() == big_lines[:12]

    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    second = generate_demo_corpus(DemoCorpusConfig(out_dir=out, n_clips=12, seed=0, workers=1))
    assert not second.generated and second == dataclasses.replace(first, generated=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp  # nothing rewritten

    third = generate_demo_corpus(DemoCorpusConfig(out_dir=out, n_clips=8, seed=1))  # new config: regenerate
    assert third.generated and len(list((out / "wavs").glob("*.wav"))) == 8  # stale clips removed
    assert (out / "metadata.txt").read_text(encoding="utf-8").splitlines() != big_lines[:8]


def test_refuses_to_overwrite_a_foreign_wav_folder(tmp_path):
    (tmp_path / "wavs").mkdir()
    (tmp_path / "wavs" / "mine.wav").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        generate_demo_corpus(DemoCorpusConfig(out_dir=tmp_path, n_clips=4))
    assert (tmp_path / "wavs" / "mine.wav").read_bytes() == b"not ours"


# ---- format ----------------------------------------------------------------------------------------------------

def test_metadata_format_and_audio_files(corpus, rows):
    raw = corpus.metadata.read_bytes()
    raw.decode("utf-8")  # strict
    lines = [l for l in raw.decode("utf-8").split("\n") if l]
    assert len(lines) == N and raw.endswith(b"\n")
    for line in lines:
        fields = line.split("|")
        assert len(fields) == 4 and all(f == f.strip() and f for f in fields)
        assert not Path(fields[0]).is_absolute() and fields[0].startswith("wavs/")
        assert fields[1] in SENTENCES and fields[3] in DEFAULT_VOICES
    parsed, _ = read_metadata(corpus.metadata)  # the cache builder's own parser accepts every line
    assert [m.reason for m in parsed] == [""] * N
    assert len({m.clip_id for m in parsed}) == N and {m.speaker for m in parsed} == set(DEFAULT_VOICES)
    for r in rows:
        info = sf.info(corpus.root / r["path"])
        assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
        assert 0.5 < len(r["wav"]) / r["sr"] < 15  # inside the cache's AudioPolicy bounds
        assert float(np.abs(r["wav"]).max()) < 0.96  # never clipped
        assert abs(len(r["wav"]) / r["sr"] - float(r["duration_s"])) < 1e-3


def test_default_voices_exist_and_cover_both_genders(corpus, rows):
    genders = {v: variant_gender(v.split("+")[1]) for v in DEFAULT_VOICES}
    assert len(DEFAULT_VOICES) >= 6 and set(genders.values()) == {"male", "female"}
    assert all(genders[v] == ("male" if v.split("+")[1].startswith("m") else "female") for v in DEFAULT_VOICES)
    for r in rows:
        assert r["gender"] == genders[r["speaker"]]
    assert set(corpus.speakers) == set(DEFAULT_VOICES)


# ---- instructions ----------------------------------------------------------------------------------------------

# An independent reader of the instructions: level -> words (single tokens) or phrases (regex) that mean it.
_WORDS = {
    "gender": {"male": {"male", "man", "man's", "masculine", "gentleman"},
               "female": {"female", "woman", "woman's", "feminine", "lady"}},
    "pitch": {"low": {"deep", "low"}, "high": {"high"}},
    "rate": {"slow": {"slow", "slowly", "leisurely", "unhurried", "unhurriedly"},
             "fast": {"fast", "quick", "quickly", "rapid", "rapidly", "brisk", "briskly"}},
    "loudness": {"quiet": {"quiet", "quietly", "soft", "softly", "hushed"}, "loud": {"loud", "loudly", "booming"}},
}
_PHRASES = {
    "pitch": {"mid": r"\b(medium|mid|moderately|average)[- ]pitch"},
    "rate": {"normal": r"\b(normal|moderate|natural|average|regular) (pace|speed|tempo)\b"},
    "loudness": {"normal": r"\b(normal|moderate|conversational|medium) volume\b"},
}


def read_instruction(text: str) -> dict[str, str]:
    low = text.lower()
    tokens = set(re.findall(r"[a-z]+(?:'s)?", low))
    found = {}
    for attr in ("gender", "pitch", "rate", "loudness"):
        hits = {lvl for lvl, words in _WORDS[attr].items() if tokens & words}
        hits |= {lvl for lvl, rx in _PHRASES.get(attr, {}).items() if re.search(rx, low)}
        assert len(hits) == 1, f"{attr}: {sorted(hits)} in {text!r}"
        found[attr] = hits.pop()
    return found


def test_corpus_instructions_state_the_attributes(rows):
    for r in rows:
        assert read_instruction(r["instruction"]) == {k: r[k] for k in ("gender", "pitch", "rate", "loudness")}
    assert len({r["instruction"] for r in rows}) == N


def test_every_attribute_combination_reads_back_and_varies():
    for combo in itertools.product(GENDERS, PITCHES, RATES, LOUDNESSES):
        attrs = VoiceAttributes(*combo)
        texts = [make_instruction(attrs, seed) for seed in range(40)]
        for t in texts:
            assert read_instruction(t) == dataclasses.asdict(attrs)
            assert t[0].isupper() and t.endswith((".", "?")) and "  " not in t and not re.search(r"\ba [aeiou]", t)
        assert len(set(texts)) >= 25, combo  # many phrasings, not one template
        assert texts == [make_instruction(attrs, seed) for seed in range(40)]  # pure and seeded
    with pytest.raises(ValueError):
        VoiceAttributes("male", "medium", "slow", "loud")


# ---- measured audio goes the instructed way ---------------------------------------------------------------------

def median_f0(wav: np.ndarray, sr: int) -> float:
    """Median F0 over voiced 40 ms frames by normalised autocorrelation (60-450 Hz)."""
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = int(sr / 450), int(sr / 60)
    floor = 0.3 * np.sqrt(np.mean(wav**2))
    f0 = []
    for start in range(0, len(wav) - frame, hop):
        x = wav[start:start + frame] - wav[start:start + frame].mean()
        if np.sqrt(np.mean(x**2)) < floor:
            continue
        ac = np.correlate(x, x, "full")[frame - 1:]
        ac /= ac[0] + 1e-12
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5:
            f0.append(sr / lag)
    assert len(f0) > 20
    return float(np.median(f0))


def _by_voice(rows, attr):
    out = defaultdict(dict)
    for r in rows:
        out[r["speaker"]][r[attr]] = r
    assert all(len(levels) == 3 for levels in out.values()) and len(out) == len(DEFAULT_VOICES)
    return out


def test_high_pitch_clips_have_higher_f0_than_low_for_every_voice(rows):
    ratios = []
    for voice, lv in _by_voice(rows, "pitch").items():
        f0 = {k: median_f0(r["wav"], r["sr"]) for k, r in lv.items()}
        assert f0["high"] > 1.2 * f0["low"], (voice, f0)
        assert int(lv["high"]["espeak_pitch"]) > int(lv["mid"]["espeak_pitch"]) > int(lv["low"]["espeak_pitch"])
        ratios.append(f0["high"] / f0["low"])
    assert np.median(ratios) > 1.4
    female = [median_f0(r["wav"], r["sr"]) for r in rows if r["gender"] == "female" and r["pitch"] == "mid"]
    male = [median_f0(r["wav"], r["sr"]) for r in rows if r["gender"] == "male" and r["pitch"] == "mid"]
    assert min(female) > max(male)  # the gender words are audible too


def test_loud_clips_have_more_energy_than_quiet_for_every_voice(rows):
    for voice, lv in _by_voice(rows, "loudness").items():
        rms = {k: float(np.sqrt(np.mean(r["wav"] ** 2))) for k, r in lv.items()}
        assert rms["loud"] > 1.5 * rms["quiet"], (voice, rms)
        assert int(lv["loud"]["espeak_volume"]) > int(lv["normal"]["espeak_volume"]) > int(lv["quiet"]["espeak_volume"])


def test_slow_clips_last_longer_than_fast_ones(corpus, rows):
    # across sentences: seconds per character of transcript
    spc = defaultdict(list)
    for r in rows:
        spc[r["rate"]].append(len(r["wav"]) / r["sr"] / len(r["text"]))
    assert np.median(spc["slow"]) > 1.2 * np.median(spc["normal"]) > 1.2 * 1.1 * np.median(spc["fast"])
    # same sentence, same voice: each slow clip re-spoken at the rate its voice uses for its fast clip
    specs = {s.clip_id: s for s in plan_clips(DemoCorpusConfig(out_dir=corpus.root, n_clips=N, seed=0))}
    synth = EspeakSynth()
    for voice, lv in _by_voice(rows, "rate").items():
        slow = specs[lv["slow"]["clip_id"]]
        fast_rate = int(lv["fast"]["espeak_rate_wpm"])
        fast = dataclasses.replace(slow, params=dataclasses.replace(slow.params, rate=fast_rate))
        wav, _ = render_clip(synth, fast)
        slow_s, fast_s = len(lv["slow"]["wav"]) / lv["slow"]["sr"], len(wav) / synth.sample_rate
        assert slow_s > 1.4 * fast_s, (voice, slow.text, slow_s, fast_s)
