"""build-cache fanned out over a local Dask cluster (2 worker processes, through prefect-dask), or over local
processes (`process_shard_map`, the lab's), writes the same store as the single-process build: byte for byte, except the CAM++ x-vectors, whose convolutions sum in
another order under another thread count (a worker's) — equal to float32 rounding (measured: ≤ 3e-6)."""
from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
import pytest
import zarr

from cache import schema
from tts_core.cachebuild.build import BuildConfig, build_cache
from tts_core.frozen import FrozenModelsConfig

THREAD_DEPENDENT = ("clips/xvec", "clips/xvec_norm")  # CAM++ (oneDNN convolutions): rounding depends on threads
ARRAYS = ("clips/spk_emb", "clips/xvec", "clips/spk_norm", "clips/xvec_norm", "clips/duration",
          "clips/instruction_id", "clips/status", schema.TOKENS, schema.TOKEN_OFFSETS, schema.PROMPT_TOKENS,
          schema.PROMPT_OFFSETS, schema.INSTRUCTION_STATES)


@pytest.fixture(scope="module")
def single_store(demo_corpus, tmp_path_factory) -> str:
    single = str(tmp_path_factory.mktemp("single") / "single.zarr")
    build_cache(BuildConfig(metadata=demo_corpus.metadata, audio_root=demo_corpus.root, store=single,
                            models=FrozenModelsConfig(), chunk_rows=8))
    return single


def assert_same_store(single: str, dist: str) -> None:
    a, b = zarr.open_group(single, mode="r"), zarr.open_group(dist, mode="r")
    for name in ARRAYS:
        assert name in a, name
        x, y = a[name][...], b[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name in THREAD_DEPENDENT:
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4, err_msg=name)
            assert np.abs(x).max() > 0.01, name  # real vectors were written, not zeros
        else:
            assert x.tobytes() == y.tobytes(), name
    ma = pd.read_parquet(fsspec.open(f"{single}/{schema.MANIFEST_FILE}").open())
    mb = pd.read_parquet(fsspec.open(f"{dist}/{schema.MANIFEST_FILE}").open())
    assert ma.equals(mb) and list(mb.row) == list(range(48))
    assert np.array_equal(a[f"{schema.MEL_VQ_GROUP}/codebook"][...], b[f"{schema.MEL_VQ_GROUP}/codebook"][...])


def test_process_pool_build_equals_single_process_build(demo_corpus, single_store, tmp_path):
    from tts_core.cachebuild.shards import process_shard_map

    seen = []
    with process_shard_map(2) as shard_map:
        def spy(jobs):
            jobs = list(jobs)
            seen.extend(j.start for j in jobs)
            return shard_map(jobs)

        out = build_cache(BuildConfig(metadata=demo_corpus.metadata, audio_root=demo_corpus.root,
                                      store=str(tmp_path / "pool.zarr"), models=FrozenModelsConfig(), chunk_rows=8),
                          shard_map=spy)
    assert out.n_ok == 48 and seen == list(range(0, 48, 8))  # every shard went through the pool, in row order
    assert_same_store(single_store, str(tmp_path / "pool.zarr"))


def test_dask_build_equals_single_process_build(demo_corpus, single_store, tmp_path, prefect_harness):
    from flows.build_cache import build_cache_flow

    dist = str(tmp_path / "dask.zarr")
    out = build_cache_flow(metadata=str(demo_corpus.metadata), audio_root=str(demo_corpus.root), store=dist,
                           chunk_rows=8, task_runner="dask", workers=2)
    assert out["n_ok"] == 48
    assert_same_store(single_store, dist)

    # the clip shards really were Prefect task runs of the Dask task runner (48 rows / 8 per shard)
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async def shard_runs():
        async with get_client() as c:
            return await c.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="encode-shard")))

    runs = asyncio.run(shard_runs())
    assert len(runs) >= 6 and all(r.state.is_completed() for r in runs)
