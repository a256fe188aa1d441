"""The Prefect layer: the build-cache flow publishes its artifacts; deployments are named as documented."""
import asyncio

import pytest

from flows.serve import DEPLOYMENT_NAME


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_build_cache_flow_publishes_artifacts(demo_corpus, tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.build_cache import build_cache_flow

    store = tmp_path / "flow.zarr"
    out = build_cache_flow(metadata=str(demo_corpus.metadata), audio_root=str(demo_corpus.root), store=str(store),
                           chunk_rows=16)
    assert out["n_ok"] == 48 and out["verdict"] in ("imbalance", "normalise")

    async def read():
        async with get_client() as c:
            return {a.key: a for a in await c.read_artifacts()}

    arts = asyncio.run(read())
    assert arts["flow-zarr-progress"].data == 100.0
    md = arts["flow-zarr-norm-report"].data
    assert "Verdict" in md and "spk_emb" in md and "norm_report.png" in md
    table = arts["flow-zarr-norm-table"].data
    assert "xvec" in table and "mean" in table


def test_deployments_are_flow_slash_dash():
    from flows.serve import deployments

    names = [f"{d.flow_name}/{d.name}" for d in deployments()]
    assert "build-cache/-" in names and DEPLOYMENT_NAME == "-"
