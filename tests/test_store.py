"""Writer/reader round trip, rollback of uncommitted writes, appends, and refusals — no models needed."""
import numpy as np
import pandas as pd
import pytest

from cache import schema
from cache.reader import CacheDataset, CacheReader
from cache.store import StoreError
from cache.writer import CacheWriter, ClipBatch
from tts_core.identity import ModelIdentity

MODELS = {r: ModelIdentity(r, f"{i:064x}") for i, r in enumerate(schema.MODEL_ROLES)}
H = 8


def _batch(start, n, rng, bad=()):
    status = np.full(n, schema.STATUS_OK, np.int8)
    status[list(bad)] = schema.STATUS_QUARANTINED
    spk = rng.normal(size=(n, 256)).astype(np.float32) * (status == 1)[:, None]
    xv = 10 * rng.normal(size=(n, 192)).astype(np.float32) * (status == 1)[:, None]
    toks = [rng.integers(0, 6561, size=int(rng.integers(3, 20))) if s == 1 else np.zeros(0, int) for s in status]
    iid = np.where(status == 1, np.arange(start, start + n) % 3, -1).astype(np.int32)
    man = pd.DataFrame({"row": np.arange(start, start + n), "clip_id": [f"c{i}" for i in range(start, start + n)],
                        "audio_path": [f"c{i}.wav" for i in range(start, start + n)], "transcript": "t",
                        "instruction": [f"inst {i % 3}" for i in range(start, start + n)], "speaker": "",
                        "instruction_id": iid, "status": [schema.STATUS_NAMES[int(s)] for s in status],
                        "reason": ["too_short" if s != 1 else "" for s in status], "detail": "",
                        "duration": 1.0, "line": np.arange(start, start + n) + 1})
    return ClipBatch(start, spk, xv, np.ones(n, np.float32), iid, status, toks, man)


def _open(url, n_rows=300, digest="d1", prefix=None, models=MODELS):
    return CacheWriter.open_for_build(url, n_rows=n_rows, n_instructions=3, lines_digest=digest, prefix_digest=prefix,
                                      models=models, normalisation=schema.Normalisation(), text_hidden_size=H)


def test_round_trip_and_reader(tmp_path):
    url = str(tmp_path / "s.zarr")
    rng = np.random.default_rng(0)
    w = _open(url)
    states = [rng.normal(size=(L, H)).astype(np.float32) for L in (3, 5, 2)]
    w.append_instruction_states(0, states)
    b1, b2 = _batch(0, 256, rng, bad=(5, 7)), _batch(256, 44, rng, bad=(0,))
    w.write_clip_batch(b1)
    w.write_clip_batch(b2)
    w.finalize()
    r = CacheReader(url)
    assert len(r) == 300 - 3
    ok_spk = np.concatenate([b1.spk_emb, b2.spk_emb])[np.concatenate([b1.status, b2.status]) == 1]
    np.testing.assert_allclose(r.spk_emb(raw=True), ok_spk)
    np.testing.assert_allclose(np.linalg.norm(r.spk_emb(), axis=1), 1, atol=1e-5)  # normalised as configured
    np.testing.assert_allclose(r.raw_norms()[1], np.linalg.norm(r.xvec(raw=True), axis=1), rtol=1e-6)
    ok_tokens = [t for t, s in zip(list(b1.tokens) + list(b2.tokens), np.concatenate([b1.status, b2.status])) if s == 1]
    for i in (0, 5, 296):
        np.testing.assert_array_equal(r.speech_tokens(i), ok_tokens[i])
    for got, want in zip(r.instruction_states([2, 0]), [states[2], states[0]]):
        np.testing.assert_allclose(got, want, atol=2e-3)  # float16 on disk
    padded, lens = r.instruction_states_padded()
    assert padded.shape == (3, 5, H) and lens.tolist() == [3, 5, 2] and not padded[2, 2:].any()
    assert r.instruction_texts == ["inst 0", "inst 1", "inst 2"]
    ds = CacheDataset(r)
    item = ds[4]
    assert item["instruction_states"].shape[0] == lens[item["instruction_id"]]
    assert_loader_workers_exit_cleanly(ds)
    # prompt tokens: given per clip (b3), else each clip's own first 150 tokens (b1)
    b3 = _batch(300, 20, rng, bad=(1,))
    b3.prompt_tokens = [t[::-1][:4] for t in b3.tokens]
    w = _open(url, n_rows=320, digest="d2", prefix="d1")
    w.write_clip_batch(b3)
    poff, pflat = np.asarray(w.g[schema.PROMPT_OFFSETS][:]), np.asarray(w.g[schema.PROMPT_TOKENS][:])
    prompt = lambda row: pflat[poff[row]:poff[row + 1]].tolist()  # noqa: E731
    assert prompt(3) == list(b1.tokens[3][:150]) and prompt(5) == []  # row 5 quarantined
    assert prompt(300) == list(b3.tokens[0][::-1][:4]) and prompt(301) == []


def assert_loader_workers_exit_cleanly(ds: CacheDataset) -> None:
    """Two worker processes read the right rows, and both exit with code 0 when the loader is dropped
    mid-epoch (a worker that dies at exit passes a test silently; its exit code says so)."""
    it = iter(ds.loader(batch_size=None, num_workers=2))
    got = [next(it)["clip_id"] for _ in range(3)]
    workers = list(it._workers)
    it._shutdown_workers()  # what dropping the iterator does
    assert got == ds.clip_ids[:3]
    assert [w.exitcode for w in workers] == [0, 0]


def test_uncommitted_writes_are_rolled_back(tmp_path):
    url = str(tmp_path / "s.zarr")
    rng = np.random.default_rng(1)
    w = _open(url)
    w.append_instruction_states(0, [np.ones((2, H), np.float32)] * 3)
    b = _batch(0, 256, rng)
    w.write_clip_batch(b)
    committed = {flat: w.g[flat].shape[0] for _, flat in schema.RAGGED_TOKENS}
    # simulate a kill in the middle of the next batch: tokens appended, commit never happened
    for flat, n in committed.items():
        w.g[flat].resize((n + 50,))
    w2 = _open(url)
    assert {flat: w2.g[flat].shape[0] for flat in committed} == committed
    assert w2.info.committed_rows == 256
    with pytest.raises(RuntimeError, match="expects 256"):
        w2.write_clip_batch(_batch(0, 256, rng))


def test_refusals(tmp_path):
    url = str(tmp_path / "s.zarr")
    _open(url)
    other = dict(MODELS, voice_encoder=ModelIdentity("voice_encoder", "f" * 64))
    with pytest.raises(StoreError, match=r"voice_encoder: store has voice_encoder \(sha256 000000000000\)"):
        _open(url, models=other)
    with pytest.raises(StoreError, match="different metadata"):
        _open(url, digest="other")
    grown = _open(url, n_rows=400, digest="d2", prefix="d1")  # lines appended at the end: allowed
    assert grown.info.n_rows == 400 and grown.g["clips/spk_emb"].shape == (400, 256)
    with pytest.raises(StoreError, match="not complete"):
        CacheReader(url)


def test_a_directory_that_is_not_a_store_is_never_cleared(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match=r"data exists and is not a cache store \(it holds thesis.tex\); nothing"):
        _open(str(tmp_path / "data"))
    assert (tmp_path / "data" / "thesis.tex").read_text() == "years of work"
