"""Stage-1 data: the held-out split rule and loading from a real (tiny) cache store."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cache import schema
from cache.captions import CaptionTable
from cache.reader import CacheReader
from cache.writer import CacheWriter, ClipBatch
from tts_core.identity import ModelIdentity
from tts_core.stage1.data import Stage1Data, normalise_instruction, split_rows


def _texts(n):
    return [f"voice number {i} speaking" for i in range(n)]


def test_split_never_puts_an_instruction_text_in_both_splits():
    rng = np.random.default_rng(0)
    texts = _texts(300) + ["A Deep  Voice", "a deep voice", "A DEEP VOICE\t"]  # one text, three spellings
    iid = rng.integers(len(texts), size=5000)
    tr, va = split_rows(iid, texts, held_out_frac=0.1, salt="s")
    assert len(tr) + len(va) == 5000 and len(np.intersect1d(tr, va)) == 0
    norm = np.array([normalise_instruction(t) for t in texts])
    assert not set(norm[iid[tr]]) & set(norm[iid[va]])
    # the three spellings land together
    sides = {normalise_instruction(texts[i]) in set(norm[iid[va]]) for i in (300, 301, 302)}
    assert len(sides) == 1
    frac = len(set(iid[va])) / len(set(iid))
    assert 0.05 < frac < 0.15


def test_split_is_deterministic_and_independent_of_row_order_and_other_rows():
    rng = np.random.default_rng(1)
    texts = _texts(200)
    iid = rng.integers(200, size=3000)
    tr, va = split_rows(iid, texts, 0.2)
    tr2, va2 = split_rows(iid, texts, 0.2)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    held = {texts[i] for i in iid[va]}
    perm = rng.permutation(len(iid))
    _, va_p = split_rows(iid[perm], texts, 0.2)
    assert {texts[i] for i in iid[perm][va_p]} == held
    # a bigger dataset keeps every old text on its side
    more = _texts(400)
    iid_more = np.concatenate([iid, rng.integers(400, size=3000)])
    _, va_m = split_rows(iid_more, more, 0.2)
    held_m = {more[i] for i in iid_more[va_m]}
    assert held <= held_m and not (set(texts) - held) & held_m
    # another salt, another split
    _, va_s = split_rows(iid, texts, 0.2, salt="other")
    assert {texts[i] for i in iid[va_s]} != held


def test_split_tiny_data_has_both_sides():
    tr, va = split_rows(np.array([0, 0, 1, 1, 1]), ["a", "b"], 0.01)
    assert len(tr) and len(va)
    tr, va = split_rows(np.array([0, 1, 1]), ["a", "b"], 0.99)
    assert len(tr) and len(va)
    tr, va = split_rows(np.array([0, 1]), ["a", "b"], 0.0)
    assert len(va) == 0 and len(tr) == 2


# ---- a tiny real store ----------------------------------------------------------------------------------
H = 16
N = 30
TE = ModelIdentity("tiny-text-encoder (test)", "a" * 64)
MODELS = {"voice_encoder": ModelIdentity("ve", "1" * 64), "xvector": ModelIdentity("xv", "2" * 64),
          "speech_tokenizer": ModelIdentity("s3", "3" * 64), "text_encoder": TE}


def _build_store(url: str, normalise: bool) -> dict:
    rng = np.random.default_rng(0)
    status = np.full(N, schema.STATUS_OK, np.int8)
    status[4] = schema.STATUS_QUARANTINED
    ok = status == schema.STATUS_OK
    spk = (rng.normal(size=(N, 256)) * ok[:, None]).astype(np.float32)
    xv = (14 * rng.normal(size=(N, 192)) * ok[:, None]).astype(np.float32)
    iid = np.array([-1 if (i in (7, 8) or not ok[i]) else i % 5 for i in range(N)], np.int32)
    man = pd.DataFrame({
        "row": np.arange(N), "clip_id": [f"c{i:03d}" for i in range(N)], "audio_path": [f"c{i}.wav" for i in range(N)],
        "transcript": "hello", "instruction": [f"instruction {int(k)}" if k >= 0 else "" for k in iid],
        "speaker": [f"s{i % 3}" for i in range(N)], "instruction_id": iid,
        "status": [schema.STATUS_NAMES[int(s)] for s in status], "reason": ["" if o else "too_short" for o in ok],
        "detail": "", "duration": 1.0, "line": np.arange(N) + 1})
    w = CacheWriter.open_for_build(url, n_rows=N, n_instructions=5, lines_digest="d", prefix_digest=None,
                                   models=MODELS, normalisation=schema.Normalisation(normalise, normalise),
                                   text_hidden_size=H)
    states = [rng.normal(size=(2 + k, H)).astype(np.float32) for k in range(5)]
    w.append_instruction_states(0, states)
    toks = [np.arange(5) if o else np.zeros(0, int) for o in ok]
    w.write_clip_batch(ClipBatch(0, spk, xv, np.ones(N, np.float32), iid, status, toks, man))
    w.finalize()
    return {"spk": spk, "xv": xv, "iid": iid, "ok": ok, "states": states}


@pytest.mark.parametrize("normalise", [True, False])
def test_from_reader_loads_a_real_store(tmp_path, normalise):
    url = str(tmp_path / "store.zarr")
    src = _build_store(url, normalise)
    data = Stage1Data.from_reader(CacheReader(url))
    keep = src["ok"] & (src["iid"] >= 0)
    assert data.n_clips == keep.sum() == N - 3
    assert data.dropped == {"no_instruction": 2, "degenerate_vector": 0}
    assert data.clip_ids == [f"c{i:03d}" for i in np.flatnonzero(keep)]
    assert data.speakers == [f"s{i % 3}" for i in np.flatnonzero(keep)]
    # unit vectors whatever the store's normalisation setting
    torch.testing.assert_close(data.spk.norm(dim=-1), torch.ones(data.n_clips))
    torch.testing.assert_close(data.xvec.norm(dim=-1), torch.ones(data.n_clips))
    ref = src["xv"][keep] / np.linalg.norm(src["xv"][keep], axis=1, keepdims=True)
    np.testing.assert_allclose(data.xvec.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert data.instruction_id.tolist() == src["iid"][keep].tolist()
    assert data.states.dtype == torch.float16 and data.states.shape == (5, 6, H)
    assert data.lengths.tolist() == [2, 3, 4, 5, 6]
    np.testing.assert_allclose(data.states.gather([3])[0][0, :5].float().numpy(), src["states"][3], rtol=1e-3, atol=1e-3)
    assert data.instruction_texts == [f"instruction {k}" for k in range(5)]
    assert data.text_encoder_identity == TE.to_dict()
    assert data.cache_identity["models"]["text_encoder"]["sha256"] == "a" * 64
    assert data.hidden_size == H
    assert data.captions.offsets.tolist() == list(range(data.n_clips + 1))  # one caption per clip here
    assert data.captions.ids.tolist() == data.instruction_id.tolist()
    tr, va = data.split(0.3)
    assert len(tr) + len(va) == data.n_clips


def test_stage1data_validates_shapes():
    with pytest.raises(ValueError, match="instruction_id out of range"):
        Stage1Data(spk=torch.randn(3, 256), xvec=torch.randn(3, 192), instruction_id=torch.tensor([0, 1, 5]),
                   states=torch.zeros(2, 4, 8, dtype=torch.float16), lengths=torch.tensor([2, 4]),
                   clip_ids=["a", "b", "c"], instruction_texts=["x", "y"], text_encoder_identity=TE.to_dict())
    with pytest.raises(ValueError, match="xvec"):
        Stage1Data(spk=torch.randn(3, 256), xvec=torch.randn(3, 190), instruction_id=torch.tensor([0, 1, 1]),
                   states=torch.zeros(2, 4, 8, dtype=torch.float16), lengths=torch.tensor([2, 4]),
                   clip_ids=["a", "b", "c"], instruction_texts=["x", "y"], text_encoder_identity=TE)


@pytest.mark.parametrize("clips,problem", [([[1, 0], [1], [1]], "first caption"),  # clip 0's own is 0
                                           ([[0], [1], []], "first caption"),  # clip 2 has no caption
                                           ([[0], [1]], "first caption"),  # a table over 2 clips, not 3
                                           ([[0, 2], [1], [1]], "caption ids out of range")])
def test_stage1data_refuses_a_caption_table_that_disagrees_with_its_clips(clips, problem):
    captions = CaptionTable.from_counts([len(c) for c in clips], [i for c in clips for i in c])
    with pytest.raises(ValueError, match=problem):
        Stage1Data(spk=torch.randn(3, 256), xvec=torch.randn(3, 192), instruction_id=torch.tensor([0, 1, 1]),
                   states=torch.zeros(2, 4, 8, dtype=torch.float16), lengths=torch.tensor([2, 4]),
                   clip_ids=["a", "b", "c"], instruction_texts=["x", "y"], text_encoder_identity=TE,
                   captions=captions)


def test_split_by_speaker_shares_neither_a_speaker_nor_an_instruction_text():
    rng = np.random.default_rng(0)
    n = 600
    speakers = [f"spk{int(i)}" for i in rng.integers(0, 40, n)]
    texts = [f"voice description {k}" for k in range(120)]
    iid = rng.integers(0, 120, n)  # texts shared across speakers: the leak the rule must cut
    tr, va = split_rows(iid, texts, 0.2, salt="s", speakers=speakers)
    assert len(tr) and len(va) and not set(tr) & set(va)
    sp = np.asarray(speakers)
    assert not set(sp[tr]) & set(sp[va])
    assert not {texts[i] for i in iid[tr]} & {texts[i] for i in iid[va]}
    dropped = n - len(tr) - len(va)
    assert dropped > 0  # train clips sharing a held-out text were dropped, not leaked
    held_speakers = set(sp[va])
    assert 0.05 < len(held_speakers) / 40 < 0.4
    # deterministic and independent of row order
    perm = rng.permutation(n)
    _, va_p = split_rows(iid[perm], texts, 0.2, salt="s", speakers=list(sp[perm]))
    assert set(sp[perm][va_p]) == held_speakers


def test_split_by_speaker_needs_speakers():
    data = Stage1Data(spk=torch.randn(4, 256), xvec=torch.randn(4, 192), instruction_id=torch.tensor([0, 1, 0, 1]),
                      states=torch.zeros(2, 3, 8, dtype=torch.float16), lengths=torch.tensor([3, 2]),
                      clip_ids=["a", "b", "c", "d"], instruction_texts=["x", "y"], text_encoder_identity={})
    with pytest.raises(ValueError, match="speaker column"):
        data.split(0.5, by="speaker")
