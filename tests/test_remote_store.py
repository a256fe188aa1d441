"""A store on a non-local fsspec filesystem (memory://) is built and read by the same code as a local one."""
from __future__ import annotations

import numpy as np

from cache.build import BuildConfig, build_cache
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
