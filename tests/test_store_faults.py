"""Faults during and after a cache build (issue #13).

- A build killed at *every single* store write (fault-injection hook in cache.store: each Zarr key set or
  delete, each temp-file write and rename of a manifest) resumes, by rerunning the same build, to a store
  byte-identical to an uninterrupted build — including kills while the store is being created and while the
  embedded tokenizer's codebook is written.
- Disk full, read-only file system, permission denied: one line naming the path and what to do (through the
  CLI, no traceback); after "freeing space" the rerun ends identical.
- A finished store with a deleted, corrupted or truncated part: refused by name, never read back as zeros.
- The lock is keyed by the resolved store location (a symlinked parent is the same store).

Speed (the sweep runs ~200 builds): models load once per process, and audio decoding and model *work* are
memoised by their exact input — a clip by its path, a batch's encoding by its rows and the tokenizer's
identity, instruction states by their texts, the embedded tokenizer's fit by its clips (fitting is
deterministic: tests/test_tokenizers_text.py). The store code runs for real every time. The norm report files (rewritten from the finished store on every run) are
not written here.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from filelock import FileLock

import tts_core.cachebuild.build as build_mod
from cache import norms, schema
from tts_core.cachebuild.build import BuildConfig, build_cache
from cache.reader import CacheReader
from cache.store import StoreError, lock_path, store_location, write_hook
from instruct_tts.cli import main as cli_main
from tts_core.encoders.mel_vq import MelVQTokenizer

CHUNK = 3  # 7 rows: batches of 3, 3 and 1 (a partial last chunk, all quarantined: an all-zero chunk)


class Killed(BaseException):
    """A simulated kill -9: nothing in the build catches a BaseException."""


@pytest.fixture(scope="module")
def corpus(demo_corpus, tmp_path_factory):
    lines = [l for l in demo_corpus.metadata.read_text(encoding="utf-8").splitlines() if l.strip()][:6]
    meta = tmp_path_factory.mktemp("faults") / "meta.txt"
    meta.write_text("\n".join(lines + ["wavs/missing.wav|No audio.|A calm voice."]) + "\n", encoding="utf-8")
    return meta, demo_corpus.root


def _memo(fn, key):
    memo: dict = {}

    def call(*args, **kw):
        k = key(*args, **kw)
        if k not in memo:
            memo[k] = fn(*args, **kw)
        return memo[k]
    return call


_speaker_models = functools.cache(build_mod.load_speaker_models)


@functools.cache
def _text_encoder(cfg, _load=build_mod.load_text_encoder):
    enc = _load(cfg)
    enc.encode = _memo(enc.encode, lambda texts: tuple(texts))
    return enc


_encode = _memo(build_mod.encode_batch, lambda batch, loaded, iids, ve, xv, tok, *name: (
    tuple(m.row for m in batch), tok.identity.sha256))
_load_clip = _memo(build_mod.load_clip, lambda path, policy: (str(path), policy))
_load_line = _memo(build_mod.load_line, lambda root, name, policy, m: (str(root), name, policy, m))
_fit = _memo(MelVQTokenizer.fit, lambda wavs, **kw: (
    hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in wavs)).hexdigest(), tuple(sorted(kw.items()))))


def _fast(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(build_mod, "load_speaker_models", _speaker_models)
    mp.setattr(build_mod, "load_text_encoder", _text_encoder)
    mp.setattr(build_mod, "encode_batch", _encode)
    mp.setattr(build_mod, "load_clip", _load_clip)
    mp.setattr(build_mod, "load_line", _load_line)
    mp.setattr(MelVQTokenizer, "fit", _fit)
    mp.setattr(norms, "save_report", lambda report, out, fs=None: {})


@pytest.fixture(autouse=True)
def fast_models(monkeypatch):
    _fast(monkeypatch)


def _args(corpus, store) -> list[str]:
    meta, root = corpus
    return ["build-cache", "--no-prefect", "--metadata", str(meta), "--audio-root", str(root), "--store", str(store),
            "--chunk-rows", str(CHUNK), "--loader-threads", "1"]


def _build(corpus, store):
    meta, root = corpus
    return build_cache(BuildConfig(metadata=meta, audio_root=root, store=str(store), chunk_rows=CHUNK, loader_threads=1))


def snapshot(store: Path) -> dict[str, object]:
    """Every file's bytes; the root attributes as JSON without the creation time."""
    out: dict[str, object] = {}
    for p in sorted(store.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(store))
            out[rel] = p.read_bytes()
    root = json.loads(out.pop("zarr.json"))
    root["attributes"].pop("created")
    out["zarr.json"] = root
    return out


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted build, and the list of the writes it made, in order."""
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    writes: list[str] = []
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixture is not active here
        _fast(mp)
        with write_hook(lambda path: writes.append(path[len(str(store)):])):
            s = _build(corpus, store)
    assert s.complete and s.n_rows == 7 and s.n_ok == 6
    return store, writes


def _fail_at(k: int, exc: BaseException):
    """A hook that raises ``exc`` at write k and at every write after it (a dead process writes nothing)."""
    count = [0]

    def hook(path: str) -> None:
        count[0] += 1
        if count[0] > k:
            raise exc
    return hook


def _leave_torn_temp_file(store: Path, key: str) -> None:
    """What a kill in the *middle* of writing ``key`` leaves: a half-written temp file (Zarr's LocalStore
    writes `<name>.<uuid>.partial` then renames; we write `<name>.tmp` then rename), the old file intact."""
    if key.endswith(".tmp"):
        torn = Path(str(store) + key)
    elif key.endswith("zarr.json") or "/c/" in key:
        torn = Path(str(store) + key).with_suffix(".0123456789abcdef.partial")
    else:
        return
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x00half")


def test_kill_at_every_write_resumes_byte_identical(corpus, reference, tmp_path):
    ref, writes = reference
    want = snapshot(ref)
    # the sweep covers creation, the codebook, instruction states, every batch, the manifest and the commits
    for part in ("/zarr.json", "/models/mel_vq/codebook/c/0/0", "/models/mel_vq/zarr.json", "/instructions/states/c/0/0",
                 "/clips/spk_emb/c/2/0", "/manifest_parts/000000000006.parquet.tmp", "/manifest.parquet"):
        assert part in writes, part
    for k in range(len(writes)):
        store = tmp_path / f"k{k}.zarr"
        with write_hook(_fail_at(k, Killed())):
            with pytest.raises(Killed):
                _build(corpus, store)
        _leave_torn_temp_file(store, writes[k])
        s = _build(corpus, store)  # rerun the same build
        assert s.complete, k
        got = snapshot(store)
        assert got.keys() == want.keys(), (k, writes[k], got.keys() ^ want.keys())
        for name in want:
            assert got[name] == want[name], (k, writes[k], name)
        shutil.rmtree(store)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("instruct-tts")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where", ["/clips/xvec/c/1/0", "/manifest_parts/000000000003.parquet.tmp", "/zarr.json"])
def test_disk_full_is_one_line_and_the_rerun_resumes_identical(corpus, reference, tmp_path, capsys, where):
    ref, writes = reference
    store = tmp_path / "c.zarr"
    k = writes.index(where, writes.index("/instructions/states/c/0/0"))  # a write after creation
    with write_hook(_fail_at(k, OSError(errno.ENOSPC, "No space left on device", str(store) + where))):
        assert cli_main(_args(corpus, store)) == 2
    line = _one_line_error(capsys)
    assert "no space left on the device" in line and str(store) + where in line and "rerun the same command" in line
    assert cli_main(_args(corpus, store)) == 0  # space freed: the same command resumes
    assert snapshot(store) == snapshot(ref)


@pytest.mark.parametrize("code,phrase", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_unwritable_store_is_one_line(corpus, reference, tmp_path, capsys, code, phrase):
    ref, _ = reference
    store = tmp_path / "c.zarr"
    shutil.copytree(ref, store)
    zarr.open_group(str(store), mode="r+").attrs["complete"] = False  # finalize must write again

    def deny(path: str) -> None:
        raise OSError(code, "denied", path)

    with write_hook(deny):
        assert cli_main(_args(corpus, store)) == 2
    line = _one_line_error(capsys)
    assert phrase in line and str(store) in line and "then rerun the same command" in line


def _damaged_copy(ref: Path, tmp_path: Path) -> Path:
    store = tmp_path / "d.zarr"
    shutil.copytree(ref, store)
    return store


def test_deleted_or_corrupted_chunk_is_refused_by_name(reference, tmp_path, capsys):
    ref, _ = reference
    store = _damaged_copy(ref, tmp_path)
    (store / "clips/spk_norm/c/1").unlink()  # zarr alone would read these rows back as zeros
    assert cli_main(["report", str(store)]) == 2
    line = _one_line_error(capsys)
    assert f"{store}/clips/spk_norm/c/1 is missing" in line and f"delete {store} and rerun" in line

    store = _damaged_copy(ref, tmp_path / "b")
    chunk = store / "clips/xvec/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    r = CacheReader(str(store))
    r.spk_emb()  # the undamaged arrays still read
    with pytest.raises(StoreError, match=f"{store}/clips/xvec/c/0/0 is corrupted"):
        r.xvec()


def test_truncated_ragged_array_and_damaged_manifest_are_refused(reference, tmp_path):
    ref, _ = reference
    store = _damaged_copy(ref, tmp_path)
    zarr.open_group(str(store), mode="r+")[schema.TOKENS].resize((5,))
    with pytest.raises(StoreError, match="tokens/flat is 5 rows long where the store records"):
        CacheReader(str(store))

    store = _damaged_copy(ref, tmp_path / "m")
    manifest = store / schema.MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreError, match="manifest.parquet is corrupted"):
        CacheReader(str(store)).manifest
    manifest.unlink()
    with pytest.raises(StoreError, match="manifest.parquet is missing"):
        CacheReader(str(store)).manifest


def test_interrupted_codebook_of_an_old_kill_is_repaired(corpus, reference, tmp_path):
    """The issue's two unresumable stores: codebook group without its array, and array without its config."""
    ref, _ = reference
    for damage in ("array", "attrs"):
        store = _damaged_copy(ref, tmp_path / damage)
        g = zarr.open_group(str(store), mode="r+")
        g.attrs.update({"complete": False})
        if damage == "array":
            shutil.rmtree(store / schema.MEL_VQ_GROUP / "codebook")
        else:
            g[schema.MEL_VQ_GROUP].attrs.clear()
        assert build_mod.saved_codebook(str(store)) is None
        assert _build(corpus, store).complete
        assert snapshot(store) == snapshot(ref)


def test_lock_is_keyed_by_the_resolved_store(corpus, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    via_link = tmp_path / "link" / "c.zarr"
    assert lock_path(str(via_link)) == lock_path(str(real / "c.zarr")) == lock_path(f"file://{real}/./c.zarr")
    assert store_location("memory://x//y.zarr/") == store_location("memory:///x/y.zarr")
    with FileLock(str(lock_path(str(real / "c.zarr"))), timeout=0):
        with pytest.raises(StoreError, match="another build is writing"):
            _build(corpus, via_link)
    assert not (real / "c.zarr").exists()


@pytest.mark.parametrize("kill", [True, False])
def test_store_through_a_symlink_is_recreated_inside_the_link(corpus, reference, tmp_path, kill):
    """#22: `cache/x.zarr -> /big/x.zarr` killed before its first committed row (or a link made ahead to an
    empty directory) is (re)created through the link: its own entries go, the link and its neighbours stay."""
    ref, writes = reference
    big = tmp_path / "big"
    (big / "x.zarr").mkdir(parents=True)
    (big / "other.txt").write_text("not the store's")
    (tmp_path / "cache").mkdir()
    link = tmp_path / "cache" / "x.zarr"
    link.symlink_to(big / "x.zarr", target_is_directory=True)
    if kill:  # after some arrays exist, before the store's attributes: an interrupted creation
        k = writes.index("/instructions/states/zarr.json")
        with write_hook(_fail_at(k, Killed())):
            with pytest.raises(Killed):
                _build(corpus, link)
        assert (big / "x.zarr" / "clips").is_dir()
    s = _build(corpus, link)
    assert s.complete and link.is_symlink() and link.resolve() == (big / "x.zarr").resolve()
    assert (big / "other.txt").read_text() == "not the store's"
    assert sorted(p.name for p in big.iterdir()) == ["other.txt", "x.zarr", "x.zarr.lock"]
    assert snapshot(big / "x.zarr") == snapshot(ref)


def test_resume_with_another_audio_root_is_refused(corpus, tmp_path):
    """#22: the audio root is part of what a store was built from, like its metadata lines."""
    meta, root = corpus
    other = tmp_path / "copy_of_audio"
    shutil.copytree(root, other)
    store = tmp_path / "c.zarr"

    def cfg(audio_root, **kw):
        return BuildConfig(metadata=meta, audio_root=audio_root, store=str(store), chunk_rows=CHUNK, loader_threads=1,
                           **kw)

    assert not build_cache(cfg(root, max_batches=1)).complete  # interrupted after one batch
    with pytest.raises(StoreError) as info:
        build_cache(cfg(other))
    msg = str(info.value)
    assert f"built from audio under {root.resolve()}" in msg and f"--audio-root {other.resolve()}" in msg
    assert zarr.open_group(str(store), mode="r").attrs["committed_rows"] == CHUNK  # nothing written
    assert build_cache(cfg(Path(str(root) + "/./"))).complete  # the same root, spelled otherwise: resumes
