"""Many captions per clip: one audio file on several metadata lines is one clip, encoded once."""
from pathlib import Path

import numpy as np
import pytest

import tts_core.cachebuild.build as build_mod
from cache import schema
from cache.reader import CacheReader, caption_table
from tts_core.cachebuild.build import BuildConfig, build_cache
from tts_core.captions import group_captions
from tts_core.metadata import read_metadata


class _Counting:
    """Wraps a frozen model and records every waveform it is given."""

    def __init__(self, model, seen: list):
        self._m, self.seen = model, seen

    def __getattr__(self, name):
        return getattr(self._m, name)

    def embed_batch(self, wavs):
        self.seen.extend(len(w) for w in wavs)
        return self._m.embed_batch(wavs)

    def tokenize_batch(self, wavs):
        self.seen.extend(len(w) for w in wavs)
        return self._m.tokenize_batch(wavs)


def _meta(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "meta" / "meta.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_three_spellings_are_one_clip_and_conflicts_name_both_lines(tmp_path):
    root = tmp_path / "meta"
    (root / "x.wav").parent.mkdir(parents=True, exist_ok=True)
    meta = _meta(tmp_path, [
        "./x.wav|Hello there.|A deep voice.",                  # line 1: the clip
        "sub/../x.wav|Hello there.|A bright voice.",           # another caption
        f"{root / 'x.wav'}|Hello there.|A whispered voice.",   # absolute spelling: another caption
        "x.wav|Hello there.|A deep voice.",                    # the same line again
        ".//x.wav|Goodbye.|A calm voice.",                     # another transcript for the same audio
        "x.wav|Hello there.|A calm voice.|spk2",               # another speaker: another clip
        "y.wav|Hello there.|A calm voice.",
    ])
    lines = group_captions(read_metadata(meta)[0], root, "meta.txt")
    assert [m.clip_of for m in lines] == [-1, 0, 0, -1, -1, -1, -1]
    assert [m.reason for m in lines] == ["", "", "", "duplicate_clip", "transcript_conflict", "", ""]
    assert "line 1" in lines[3].detail
    conflict = lines[4].detail
    assert conflict.startswith("meta.txt:5") and "line 1" in conflict and "line 5" in conflict
    assert "'Hello there.'" in conflict and "'Goodbye.'" in conflict


def test_caption_table_groups_pairs_by_clip():
    ok, cap, q = schema.STATUS_OK, schema.STATUS_CAPTION, schema.STATUS_QUARANTINED
    status = np.array([ok, cap, q, ok, cap, cap, ok])
    clip_row = np.array([0, 0, -1, 3, 0, 3, 6])
    iid = np.array([0, 1, -1, 2, 3, 0, 4])
    off, ids = caption_table(status, clip_row, iid)
    assert off.tolist() == [0, 3, 5, 6]
    assert ids.tolist() == [0, 1, 3, 2, 0, 4]


@pytest.fixture
def counted(monkeypatch):
    """Every waveform the speaker models and the speech tokenizer see during a build."""
    seen = {"ve": [], "xv": [], "tok": []}
    load_spk, load_tok = build_mod.load_speaker_models, build_mod.load_speech_tokenizer

    def speaker_models(cfg):
        ve, xv = load_spk(cfg)
        return _Counting(ve, seen["ve"]), _Counting(xv, seen["xv"])

    def speech_tokenizer(*a, **kw):
        tok, fitted = load_tok(*a, **kw)
        return _Counting(tok, seen["tok"]), fitted

    monkeypatch.setattr(build_mod, "load_speaker_models", speaker_models)
    monkeypatch.setattr(build_mod, "load_speech_tokenizer", speech_tokenizer)
    return seen


def test_a_clip_with_three_instructions_is_encoded_once(demo_corpus, tmp_path, counted):
    good = [l for l in demo_corpus.metadata.read_text(encoding="utf-8").splitlines()
            if l.strip() and not l.startswith("#")][:6]
    path, text = good[0].split("|")[:2]
    root = demo_corpus.root
    extra = [f"./{path}|{text}|Another way to say it.",
             f"{(root / path).resolve()}|{text}|A third wording.",
             f"{path}|{text} Not the same.|A fourth wording."]
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(good[:3] + extra[:1] + good[3:] + extra[1:]) + "\n", encoding="utf-8")
    store = tmp_path / "c.zarr"
    s = build_cache(BuildConfig(metadata=meta, audio_root=root, store=str(store), chunk_rows=4,
                                tokenizer_fit_clips=6))
    assert s.complete and s.n_rows == 9 and s.n_ok == 6 and s.n_captions == 8
    assert s.reasons == {"transcript_conflict": 1}
    assert "clips: 6  captions (clip, instruction pairs): 8" in "\n".join(s.lines())
    # 6 clips: each model ran once per clip, never on a caption line (the first clip's wav is not repeated)
    assert len(counted["ve"]) == len(counted["xv"]) == 6
    r = CacheReader(str(store))
    assert len(r) == 6
    off, ids = r.captions
    texts = r.instruction_texts
    first = [texts[i] for i in ids[off[0]:off[1]]]
    assert first == [good[0].split("|")[2], "Another way to say it.", "A third wording."]
    assert (np.diff(off)[1:] == 1).all()
    man = r.manifest
    assert man.status.tolist().count("caption") == 2
    assert "line 1" in man.detail[man.reason == "transcript_conflict"].iloc[0]
    g = r.group
    assert g["clips/clip_row"][:].tolist() == [0, 1, 2, 0, 4, 5, 6, 0, -1]
    assert (g["clips/spk_emb"][3] == 0).all() and g["clips/duration"][3] == 0  # audio facts live at the clip's row


def test_captions_of_a_quarantined_clip_are_quarantined(demo_corpus, tmp_path):
    good = [l for l in demo_corpus.metadata.read_text(encoding="utf-8").splitlines()
            if l.strip() and not l.startswith("#")][:3]
    root = tmp_path / "audio"
    (root / "wavs").mkdir(parents=True)
    for l in good:
        p = l.split("|")[0]
        (root / p).write_bytes((demo_corpus.root / p).read_bytes())
    (root / "empty.wav").write_bytes(b"")
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(good + ["empty.wav|Hi.|A.", "empty.wav|Hi.|B."]) + "\n", encoding="utf-8")
    store = tmp_path / "c.zarr"
    s = build_cache(BuildConfig(metadata=meta, audio_root=root, store=str(store), chunk_rows=4,
                                tokenizer_fit_clips=3))
    man = CacheReader(str(store)).manifest
    assert man.reason.tolist()[3:] == ["empty_file", "clip_quarantined"]  # the caption sits in the next batch
    assert "line 4" in man.detail.iloc[4] and s.n_captions == 3
    assert CacheReader(str(store)).group["clips/clip_row"][:].tolist() == [0, 1, 2, -1, -1]
