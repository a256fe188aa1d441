"""The Prefect layer: the build-cache flow publishes its artifacts; deployments are named as documented."""
import asyncio
import json
from pathlib import Path

import pytest

from flows.serve import DEPLOYMENT_NAME


def _artifacts() -> dict:
    """Every artifact the harness' server holds, by key (latest wins)."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as c:
            return {a.key: a for a in await c.read_artifacts()}

    return asyncio.run(read())


def test_build_cache_flow_publishes_artifacts(demo_corpus, tmp_path, prefect_harness):
    from flows.build_cache import build_cache_flow

    store = tmp_path / "flow.zarr"
    out = build_cache_flow(metadata=str(demo_corpus.metadata), audio_root=str(demo_corpus.root), store=str(store),
                           chunk_rows=16)
    assert out["n_ok"] == 48 and out["verdict"] in ("imbalance", "normalise")

    arts = _artifacts()
    assert arts["flow-zarr-progress"].data == 100.0
    md = arts["flow-zarr-norm-report"].data
    assert "Verdict" in md and "spk_emb" in md and "norm_report.png" in md
    table = arts["flow-zarr-norm-table"].data
    assert "xvec" in table and "mean" in table


def test_deployments_are_flow_slash_dash():
    from flows.serve import deployments

    names = [f"{d.flow_name}/{d.name}" for d in deployments()]
    assert {"build-cache/-", "train-stage1/-", "train-stage2/-", "synthesize/-", "evaluate/-"} <= set(names) and DEPLOYMENT_NAME == "-"


def test_train_stage1_flow_publishes_progress_report_and_tensorboard(demo_store, tmp_path, prefect_harness):
    from flows.train_stage1 import train_stage1_flow

    store, _ = demo_store
    out = tmp_path / "mapper"
    res = train_stage1_flow(store=store, out=str(out), phase="both",
                            train={"max_steps": 12, "eval_every": 4, "batch_size": 32, "device": "cpu",
                                   "min_phase_steps": 0, "epochs": 1},
                            mapper={"hidden_dim": 32, "n_blocks": 1})
    assert res["global_step"] == 12 and (out / "mapper.safetensors").is_file()

    arts = _artifacts()
    assert arts["mapper-stage1-progress"].data == 100.0
    md = arts["mapper-stage1-report"].data
    assert "train-set mean vector" in md and "nearest instruction" in md and "AvgCos" in md
    assert "avg_cos" in arts["mapper-stage1-history"].data
    # TensorBoard scalars written at each evaluation step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("stage1/avg_cos")]
    assert steps == [h["step"] for h in json.loads((out / "metrics.json").read_text())["history"]]


def test_train_stage2_flow_publishes_progress_and_report(demo_store, tmp_path, prefect_harness):
    from flows.train_stage1 import train_stage1_flow
    from flows.train_stage2 import train_stage2_flow

    store, _ = demo_store
    train_stage1_flow(store=store, out=str(tmp_path / "m"), phase="1",
                      train={"max_steps": 4, "eval_every": 4, "batch_size": 32, "device": "cpu"},
                      mapper={"hidden_dim": 32, "n_blocks": 1})
    res = train_stage2_flow(store=store, mapper=str(tmp_path / "m"), t3="tiny", out=str(tmp_path / "t3run"),
                            train={"max_steps": 4, "log_every": 2, "batch_size": 8, "device": "cpu"})
    assert res["global_step"] == 4 and res["trainable"]["adapters"] > 0

    # the synthesize deployment's flow: a batch file -> wavs + a table artifact; a bad line is named
    from flows.evaluate import synthesize_flow

    batch = tmp_path / "batch.txt"
    batch.write_text("Hello there.|A deep male voice.\nGood morning.|A high, fast female voice.\n")
    rows = synthesize_flow(run_dir=str(tmp_path / "t3run"), batch=str(batch), out_dir=str(tmp_path / "wavs"),
                           max_new_tokens=10)
    assert [r["line"] for r in rows] == [1, 2] and all(Path(r["wav"]).is_file() for r in rows)
    batch.write_text("Hello there.|A deep male voice.\nno instruction here\n")
    with pytest.raises(ValueError, match="batch.txt:2"):
        synthesize_flow(run_dir=str(tmp_path / "t3run"), batch=str(batch), out_dir=str(tmp_path / "wavs2"))

    arts = _artifacts()
    assert arts["t3run-stage2-progress"].data == 100.0
    assert "adapter" in arts["t3run-stage2-report"].data
    assert "Good morning." in arts["wavs-wavs"].data


def test_evaluate_flow_publishes_report_table_and_links(t3_run, demo_store, tmp_path, prefect_harness):
    from flows.evaluate import evaluate_flow

    store, _ = demo_store
    s = evaluate_flow(run_dir=str(t3_run), store=store, out_dir=str(tmp_path / "ev"), n_instructions=3,
                      max_new_tokens=20)
    assert s["n"] == 3
    arts = _artifacts()
    key = t3_run.name + "-eval"
    assert "Direction accuracy" in arts[f"{key}-report"].data
    assert "f0_hz" in arts[f"{key}-clips"].data
    assert arts[f"{key}-eval-json"].data.startswith("[eval.json](file://")
