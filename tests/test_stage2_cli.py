"""train-stage2 as a user runs it: on the real embedded-default cache, after a (short) stage 1."""
from __future__ import annotations

import json

import pytest

from instruct_tts.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mapper_run(demo_store, tmp_path_factory):
    store, _ = demo_store
    out = tmp_path_factory.mktemp("s2cli") / "mapper"
    assert main(["train-stage1", "--store", store, "--out", str(out), "--no-prefect", "--device", "cpu",
                 "--phase", "1", "--max-steps", "8", "--eval-every", "4", "--batch-size", "32",
                 "--hidden-dim", "32", "--n-blocks", "1"]) == 0
    return out


def test_cli_train_stage2_tiny_on_the_demo_cache(demo_store, mapper_run, tmp_path, capsys):
    store, _ = demo_store
    out = tmp_path / "t3"
    rc = main(["train-stage2", "--store", store, "--mapper", str(mapper_run), "--t3", "tiny", "--out", str(out),
               "--no-prefect", "--device", "cpu", "--batch-size", "8", "--max-steps", "6", "--log-every", "3",
               "--warmup-steps", "2", "--lr", "1e-3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "adapter" in printed  # trainable parameters per group are in the printed report
    assert (out / "t3_cfg.safetensors").is_file() and (out / "stage2.json").is_file()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(r["total_steps"] == 6 for r in rows)
    # both row kinds were trained on (50/50 mixing by default)
    assert 0 < sum(r["inst_frac"] for r in rows) / len(rows) < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("stage2/loss")] == [3, 6]


def test_cli_train_stage2_names_a_bad_t3(demo_store, mapper_run, tmp_path, capsys):
    store, _ = demo_store
    rc = main(["train-stage2", "--store", store, "--mapper", str(mapper_run), "--t3", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "t3"), "--no-prefect"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "preset" in err
