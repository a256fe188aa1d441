"""A store on a non-local fsspec filesystem is built and read by the same code as a local one:
memory://, and s3:// against a local S3-compatible server (moto) started by the test."""
from __future__ import annotations

import numpy as np
import pytest

from tts_core.cachebuild.build import BuildConfig, build_cache
from cache.reader import CacheReader
from tts_core.frozen import FrozenModelsConfig


def test_memory_filesystem_store_equals_local_store(demo_corpus, tmp_path):
    import fsspec

    urls = {"memory": "memory://instruct-tts-test/remote.zarr", "local": str(tmp_path / "local.zarr")}
    try:
        for url in urls.values():
            s = build_cache(BuildConfig(metadata=demo_corpus.metadata, audio_root=demo_corpus.root, store=url,
                                        models=FrozenModelsConfig(), chunk_rows=16))
            assert s.n_ok == 48
        fs = fsspec.filesystem("memory")
        assert fs.exists("/instruct-tts-test/remote.zarr/manifest.parquet")
        assert not (tmp_path / "memory:").exists()  # nothing leaked onto the local disk
        m, l = CacheReader(urls["memory"]), CacheReader(urls["local"])
        assert m.manifest.equals(l.manifest)
        for get in ("spk_emb", "xvec", "instruction_id", "duration"):
            assert np.array_equal(getattr(m, get)(), getattr(l, get)()), get
        assert all(np.array_equal(m.speech_tokens(i), l.speech_tokens(i)) for i in range(48))
        sm, lm = m.instruction_states_padded(), l.instruction_states_padded()
        assert np.array_equal(sm[0], lm[0]) and np.array_equal(sm[1], lm[1])
        # a second build of the finished remote store is a no-op, as it is locally
        again = build_cache(BuildConfig(metadata=demo_corpus.metadata, audio_root=demo_corpus.root,
                                        store=urls["memory"], models=FrozenModelsConfig(), chunk_rows=16))
        assert again.n_ok == 48
    finally:
        fsspec.filesystem("memory").rm("/instruct-tts-test", recursive=True)


@pytest.fixture
def s3_endpoint(monkeypatch):
    pytest.importorskip("s3fs", reason="the `cloud` extra is not installed")
    moto_server = pytest.importorskip("moto.server", reason="moto (dev dependency) is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=f"http://{host}:{port}").items():
        monkeypatch.setenv(k, v)
    import boto3
    import fsspec

    boto3.client("s3").create_bucket(Bucket="instruct-tts")
    fsspec.filesystem("s3").invalidate_cache()
    yield "s3://instruct-tts"
    server.stop()


def test_s3_store_through_a_local_s3_server_equals_local_store(demo_corpus, tmp_path, s3_endpoint):
    url, local = f"{s3_endpoint}/cache/s3.zarr", str(tmp_path / "local.zarr")
    for u in (url, local):
        assert build_cache(BuildConfig(metadata=demo_corpus.metadata, audio_root=demo_corpus.root, store=u,
                                       models=FrozenModelsConfig(), chunk_rows=16)).n_ok == 48
    r, l = CacheReader(url), CacheReader(local)
    assert r.manifest.equals(l.manifest)
    assert np.array_equal(r.spk_emb(), l.spk_emb()) and np.array_equal(r.xvec(), l.xvec())
    assert all(np.array_equal(r.speech_tokens(i), l.speech_tokens(i)) for i in range(48))
    import fsspec

    assert fsspec.filesystem("s3").exists("instruct-tts/cache/s3.zarr/norm_report.json")
