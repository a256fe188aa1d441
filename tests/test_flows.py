"""The Prefect layer: the build-cache flow publishes its artifacts; deployments are named as documented."""
import asyncio
import json
from pathlib import Path

import pytest

from flows.pictures import local_image_links
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
    assert {"build-cache/-", "train-stage1/-", "train-stage2/-", "synthesize/-", "evaluate/-", "lab/-"} <= set(names)
    assert DEPLOYMENT_NAME == "-"


def test_train_stage1_flow_publishes_progress_report_and_tensorboard(demo_store, tmp_path, prefect_harness):
    from flows.train_stage1 import train_stage1_flow

    store, _ = demo_store
    out = tmp_path / "mapper"
    res = train_stage1_flow(store=store, out=str(out), phase="both", max_steps=12, eval_every=4, batch_size=32,
                            device="cpu", min_phase_steps=0, epochs=1, hidden_dim=32, n_blocks=1)
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
    train_stage1_flow(store=store, out=str(tmp_path / "m"), phase="1", max_steps=4, eval_every=4, batch_size=32,
                      device="cpu", hidden_dim=32, n_blocks=1)
    res = train_stage2_flow(store=store, mapper=str(tmp_path / "m"), t3="tiny", out=str(tmp_path / "t3run"),
                            max_steps=4, log_every=2, batch_size=8, device="cpu")
    assert res["global_step"] == 4 and res["trainable"]["adapters"] > 0

    # the synthesize deployment's flow: a batch file -> wavs + a table artifact; a bad line is named
    from flows.evaluate import synthesize_flow

    batch = tmp_path / "batch.txt"
    batch.write_text("Hello there.|A deep male voice.\nGood morning.|A high, fast female voice.\n")
    rows = synthesize_flow(run=str(tmp_path / "t3run"), batch=str(batch), out_dir=str(tmp_path / "wavs"),
                           max_new_tokens=10)
    assert [r["line"] for r in rows] == [1, 2] and all(Path(r["wav"]).is_file() for r in rows)
    batch.write_text("Hello there.|A deep male voice.\nno instruction here\n")
    with pytest.raises(ValueError, match="batch.txt:2"):
        synthesize_flow(run=str(tmp_path / "t3run"), batch=str(batch), out_dir=str(tmp_path / "wavs2"))

    arts = _artifacts()
    assert arts["t3run-stage2-progress"].data == 100.0
    assert "adapter" in arts["t3run-stage2-report"].data
    # the loss-curve picture travels inside the artifact: no link to a file of this machine (broken in the UI)
    assert local_image_links(arts["t3run-stage2-report"].data) == []
    assert "![loss curves](data:image/png;base64," in arts["t3run-stage2-report"].data
    for k, a in arts.items():  # every markdown artifact published so far (stage 1, stage 2, build-cache, ...)
        if a.type == "markdown":
            assert local_image_links(a.data) == [], k
    assert "Good morning." in arts["wavs-wavs"].data


def test_evaluate_flow_publishes_report_table_and_links(t3_run, demo_store, tmp_path, prefect_harness):
    from flows.evaluate import evaluate_flow

    store, _ = demo_store
    s = evaluate_flow(run=str(t3_run), store=store, out=str(tmp_path / "ev"), n=3, max_new_tokens=20)
    assert s["n"] == 3
    arts = _artifacts()
    key = t3_run.name + "-eval"
    assert "Direction accuracy" in arts[f"{key}-report"].data
    assert local_image_links(arts[f"{key}-report"].data) == []
    assert "(data:image/png;base64," in arts[f"{key}-report"].data  # eval.png, embedded
    assert "f0_hz" in arts[f"{key}-clips"].data
    assert arts[f"{key}-eval-json"].data.startswith("[eval.json](file://")


def test_embed_pictures_inlines_local_images_or_names_them(tmp_path):
    import base64

    from flows.pictures import embed_pictures, picture

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    (tmp_path / "a.png").write_bytes(png)
    md = "\n".join([picture("a.png", "rel"), picture(tmp_path / "a.png", "abs"), picture("gone.png", "missing"),
                    "![web](https://example.org/x.png)", "text `a.png` stays"])
    out = embed_pictures(md, base=tmp_path)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert out.splitlines() == [f"![rel]({uri})", f"![abs]({uri})", "*missing*: `gone.png` (not embedded: missing)",
                                "![web](https://example.org/x.png)", "text `a.png` stays"]
    assert local_image_links(out) == [] and local_image_links(md) == ["a.png", str(tmp_path / "a.png"), "gone.png"]
    big = embed_pictures(picture("a.png", "big"), base=tmp_path, max_bytes=10)
    assert big == "*big*: `a.png` (not embedded: 0 kB over 0 kB)" and local_image_links(big) == []


# ---- the CLI with and without a Prefect API ---------------------------------------------------------------------
TINY_STAGE1 = ["--phase", "1", "--device", "cpu", "--max-steps", "4", "--eval-every", "4", "--batch-size", "32",
               "--hidden-dim", "32", "--n-blocks", "1"]


def test_cli_runs_through_prefect_when_an_api_answers(demo_store, tmp_path, prefect_harness, capsys):
    from instruct_tts.cli import main

    store, _ = demo_store
    out = tmp_path / "viaprefect"
    assert main(["train-stage1", "--store", store, "--out", str(out), *TINY_STAGE1]) == 0
    assert "without Prefect" not in capsys.readouterr().err
    assert "train-set mean vector" in _artifacts()["viaprefect-stage1-report"].data  # the flow ran and published


def test_cli_runs_without_prefect_when_no_api_server_starts(demo_store, tmp_path, monkeypatch, capsys):
    """No PREFECT_API_URL and a temporary server that never answers (a process that sleeps), with the user's
    start-up timeout of 1 s: Prefect's own start-up code times out as on a busy machine; the command still
    trains and writes its report, says so in one line, and leaves no server process behind."""
    import subprocess
    import sys

    import flows.train_stage1
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  temporary_settings)
    from prefect.settings.models.server.ephemeral import ServerEphemeralSettings

    from instruct_tts.cli import main
    from instruct_tts.orchestration import STARTUP_TIMEOUT_S, startup_timeout

    started = []

    def never_answers(self):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        return started[-1]

    def flow_must_not_run(**kw):
        raise AssertionError("the flow ran without an API")

    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})  # not the session harness' server
    monkeypatch.setattr(SubprocessASGIServer, "_run_uvicorn_command", never_answers)
    monkeypatch.setattr(flows.train_stage1, "train_stage1_flow", flow_must_not_run)
    store, _ = demo_store
    out = tmp_path / "noprefect"
    assert startup_timeout(ServerEphemeralSettings.model_construct()) == STARTUP_TIMEOUT_S  # none set: generous
    assert startup_timeout(ServerEphemeralSettings.model_construct(startup_timeout_seconds=1)) == 1  # the user's
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 1},
                            restore_defaults={PREFECT_API_URL}):
        rc = main(["train-stage1", "--store", store, "--out", str(out), *TINY_STAGE1])
    printed = capsys.readouterr()
    assert rc == 0 and "train-set mean vector" in (out / "report.md").read_text() and "AvgCos" in printed.out
    said = [l for l in printed.err.splitlines() if "Prefect" in l]
    assert said == ["instruct-tts: the temporary Prefect API server did not start within 1 s (Timed out while "
                    "attempting to connect to ephemeral Prefect API server.); running without Prefect (results "
                    "go to files only, no Prefect artifacts)"]
    assert len(started) == 1 and started[0].poll() is not None  # stopped, not left running


def test_cache_loader_workers_exit_cleanly_after_a_flow_ran(demo_store, prefect_harness):
    """A flow run leaves Prefect services whose at-exit hook fails in a forked child (Prefect 3.7): DataLoader
    workers forked after it died with exit code 1. CacheDataset.loader starts them by forkserver."""
    from prefect import flow

    from cache.reader import CacheDataset, CacheReader
    from test_store import assert_loader_workers_exit_cleanly

    @flow(log_prints=True)
    def hello() -> int:
        print("hello")
        return 1

    assert hello() == 1
    assert_loader_workers_exit_cleanly(CacheDataset(CacheReader(demo_store[0])))
