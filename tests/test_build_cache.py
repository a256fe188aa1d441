"""End-to-end cache builds with the real embedded models: quarantine, idempotence, lock, resume after kill -9."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from filelock import FileLock

from bad_audio import write_bad_clips
from tts_core.cachebuild.build import BuildConfig, build_cache
from cache.reader import CacheReader
from cache.store import StoreError, lock_path

CHUNK = 16


def _corpus_with_bad_lines(demo_corpus, tmp_path, n_good=24) -> tuple[Path, Path, dict]:
    root = tmp_path / "audio"
    shutil.copytree(demo_corpus.root / "wavs", root / "wavs")
    expected = write_bad_clips(root / "bad")
    good = [l for l in demo_corpus.metadata.read_text(encoding="utf-8").splitlines() if l.strip()][:n_good]
    bad = [f"bad/{name}|Một câu tiếng Việt.|A calm voice." for name in expected]
    extra = ["wavs/x.wav|only two", "wavs/y.wav||instr", good[0]]  # field count, empty field, duplicate
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(good[:10] + bad + good[10:] + extra) + "\n", encoding="utf-8")
    reasons = {f"bad/{k}": v for k, v in expected.items()}
    return meta, root, reasons


def _cfg(meta, root, store, **kw):
    return BuildConfig(metadata=meta, audio_root=root, store=str(store), chunk_rows=CHUNK, tokenizer_fit_clips=20, **kw)


def test_build_quarantines_every_reason_and_is_idempotent(demo_corpus, tmp_path):
    meta, root, reasons = _corpus_with_bad_lines(demo_corpus, tmp_path)
    store = tmp_path / "c.zarr"
    s = build_cache(_cfg(meta, root, store))
    assert s.complete and s.did_model_work
    man = CacheReader(str(store)).manifest
    by_path = dict(zip(man.audio_path, man.reason))
    for path, reason in reasons.items():
        assert by_path[path] == reason, path
    assert s.reasons["bad_field_count"] == 1 and s.reasons["empty_field"] == 1 and s.reasons["duplicate_clip"] == 1
    want_ok = 24 + sum(1 for r in reasons.values() if not r)
    assert s.n_ok == want_ok and s.n_rows == len(man) == want_ok + s.n_quarantined
    row = man[man.audio_path == "bad/stereo.wav"].iloc[0]
    assert row.status == "ok" and row.detail == "2ch->mono"
    assert man[man.audio_path == "bad/nan.wav"].iloc[0].transcript == "Một câu tiếng Việt."  # byte-exact UTF-8

    r = CacheReader(str(store))
    assert len(r) == want_ok
    ok = r.ok_manifest
    assert r.n_instructions == ok.instruction.nunique()  # the bad clips' instruction also has an OK clip (stereo)
    # instruction dedup: clips with the same text share one id, and the id maps back to that text
    for text, grp in ok.groupby("instruction"):
        assert grp.instruction_id.nunique() == 1
        assert r.instruction_texts[int(grp.instruction_id.iloc[0])] == text
    assert all(len(r.speech_tokens(i)) > 0 for i in range(len(r)))
    durations = r.duration()
    n_tok = np.array([len(r.speech_tokens(i)) for i in range(len(r))])
    assert np.allclose(n_tok, durations * 25, atol=2)  # 25 Hz tokens
    assert (store / "norm_report.json").exists() and (store / "norm_report.png").exists()

    def chunks():
        return {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file() and "/c/" in str(p)}

    mtimes = chunks()
    assert mtimes
    again = build_cache(_cfg(meta, root, store))
    assert not again.did_model_work and "nothing to do" in "\n".join(again.lines())
    assert chunks() == mtimes  # no chunk rewritten


def test_second_concurrent_build_is_refused(demo_corpus, tmp_path):
    store = tmp_path / "c.zarr"
    with FileLock(str(lock_path(str(store)))):
        with pytest.raises(StoreError, match="another build is writing"):
            build_cache(_cfg(demo_corpus.metadata, demo_corpus.root, store))


def test_mismatched_model_identity_is_refused(demo_corpus, tmp_path):
    store = tmp_path / "c.zarr"
    build_cache(_cfg(demo_corpus.metadata, demo_corpus.root, store, max_batches=1))
    g = zarr.open_group(str(store), mode="r+")
    models = dict(g.attrs["models"])
    models["voice_encoder"] = dict(models["voice_encoder"], sha256="0" * 64)
    g.attrs["models"] = models
    with pytest.raises(StoreError, match="voice_encoder: store has .*sha256 000000000000"):
        build_cache(_cfg(demo_corpus.metadata, demo_corpus.root, store))


def _arrays(store: Path) -> dict:
    g = zarr.open_group(str(store), mode="r")
    out = {}
    for path in ("clips/spk_emb", "clips/xvec", "clips/spk_norm", "clips/xvec_norm", "clips/duration",
                 "clips/instruction_id", "clips/status", "clips/token_offsets", "tokens/flat",
                 "instructions/offsets", "instructions/states"):
        out[path] = g[path][...]
    return out


def test_resume_after_kill_is_identical(demo_corpus, tmp_path):
    ref, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "instruct_tts", "build-cache", "--no-prefect", "--metadata", str(demo_corpus.metadata),
           "--audio-root", str(demo_corpus.root), "--chunk-rows", str(CHUNK), "--loader-threads", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the uninterrupted reference build runs beside the one that gets killed: its own process, the same result
    ref_log = tmp_path / "ref.log"
    with ref_log.open("wb") as log:
        reference = subprocess.Popen(cmd + ["--store", str(ref)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        proc = subprocess.Popen(cmd + ["--store", str(killed)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        committed = 0
        while time.time() < deadline and proc.poll() is None:
            try:
                committed = zarr.open_group(str(killed), mode="r").attrs.get("committed_rows", 0)
            except Exception:
                committed = 0
            if committed >= CHUNK:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "build finished before it could be killed; use a bigger corpus"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        n_rows = zarr.open_group(str(killed), mode="r").attrs["n_rows"]
        assert CHUNK <= committed < n_rows
        subprocess.run(cmd + ["--store", str(killed)], env=env, check=True, capture_output=True)
        assert reference.wait(timeout=300) == 0, ref_log.read_text()[-2000:]
    finally:
        reference.kill()
        reference.wait()
    a, b = _arrays(ref), _arrays(killed)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    pd.testing.assert_frame_equal(CacheReader(str(ref)).manifest, CacheReader(str(killed)).manifest)


def test_prompt_tokens_are_tokens_of_the_first_6_seconds():
    """T3's prompt is Chatterbox's: the tokens of the clip's first 6 s, cut *before* tokenizing (a tokenizer
    that looks at the whole clip gives other tokens for a cropped prefix). A clip ≤ 6 s is its own cut."""
    from tts_core.cachebuild.shards import encode_batch
    from tts_core.audio import LoadedAudio
    from tts_core.metadata import MetaLine

    class WholeClipTokenizer:  # every token depends on the clip's loudest sample, like S3's per-clip mel max
        def tokenize_batch(self, wavs):
            return [(np.arange(len(w) // 640) + int(np.abs(w).max() * 1000)) % 6561 for w in wavs]

    class Embed:
        def __init__(self, dim):
            self.dim = dim

        def embed_batch(self, wavs):
            return np.ones((len(wavs), self.dim), np.float32)

    sr = 16_000
    quiet_start = np.concatenate([np.full(6 * sr, 0.1), np.full(6 * sr, 0.5)]).astype(np.float32)  # 12 s
    short = np.full(4 * sr, 0.2, np.float32)
    lines = [MetaLine(i, i + 1, f"{i}.wav", "t", "i", "", language=lang) for i, lang in enumerate(("fr", ""))]
    loaded = [LoadedAudio(quiet_start, 12.0), LoadedAudio(short, 4.0)]
    b = encode_batch(lines, loaded, [0, 0], Embed(256), Embed(192), WholeClipTokenizer())
    tok = WholeClipTokenizer()
    assert b.manifest.status.tolist() == ["ok", "ok"]
    assert b.prompt_tokens[0].tolist() == tok.tokenize_batch([quiet_start[:6 * sr]])[0].tolist()
    assert len(b.prompt_tokens[0]) == 150 and b.prompt_tokens[0].tolist() != b.tokens[0][:150].tolist()
    assert b.prompt_tokens[1].tolist() == b.tokens[1].tolist()  # 4 s: its own tokens
    assert b.manifest.language.tolist() == ["fr", ""]
    # Turbo's prompt: the first 15 s (≤ 375 tokens); both clips are shorter, so each is its own cut
    assert [p.tolist() for p in b.prompt15_tokens] == [t.tolist() for t in b.tokens]
    longest = np.concatenate([np.full(15 * sr, 0.1), np.full(5 * sr, 0.9)]).astype(np.float32)  # 20 s
    b = encode_batch(lines[:1], [LoadedAudio(longest, 20.0)], [0], Embed(256), Embed(192), WholeClipTokenizer())
    assert b.prompt15_tokens[0].tolist() == tok.tokenize_batch([longest[:15 * sr]])[0].tolist()
    assert len(b.prompt15_tokens[0]) == 375 and b.prompt15_tokens[0].tolist() != b.tokens[0][:375].tolist()
    assert b.prompt_tokens[0].tolist() == tok.tokenize_batch([longest[:6 * sr]])[0].tolist()


def test_stored_prompts_are_the_families_reference_cuts():
    """One stored prompt per distinct family prompt length, each as long as that family's T3 feeds."""
    from cache import schema
    from tts_core.t3 import T3Config
    from tts_core.t3.families import FAMILIES, TURBO
    from tts_core.t3.turbo import turbo_config

    assert sorted(p.seconds for p in schema.PROMPTS) == sorted({f.prompt_seconds for f in FAMILIES.values()})
    for name, fam in FAMILIES.items():
        cfg = turbo_config() if name == TURBO else T3Config()
        assert schema.prompt_arrays(fam.prompt_seconds).max_tokens == cfg.speech_cond_prompt_len, name
