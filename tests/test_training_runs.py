"""tts_core.training.runs: the resume protocol's pieces both recipes share."""
from __future__ import annotations

import json

import pytest

from tts_core.checkpoint import ResumeMismatchError
from tts_core.training import CheckpointDir, config_changes, read_metrics, refuse_other_run, truncate_metrics


def test_a_setting_added_later_does_not_orphan_older_runs():
    keys, default = ("lr", "hold_out"), {"hold_out": "none"}
    older = {"lr": 1e-3}  # saved before hold_out existed
    assert config_changes(older, {"lr": 1e-3, "hold_out": "none"}, keys, default) == []
    assert config_changes(older, {"lr": 1e-3, "hold_out": "mapper"}, keys, default) == [
        "hold_out: 'none' then, 'mapper' now"]
    with pytest.raises(ResumeMismatchError, match="it is another run — lr: 0.001 then, 0.01 now"):
        refuse_other_run("run", config_changes(older, {"lr": 1e-2, "hold_out": "none"}, keys, default))


def test_checkpoints_keep_the_newest_and_metrics_truncate_to_the_resumed_step(tmp_path):
    ckpts = CheckpointDir(tmp_path, complete=("w",))
    for step in (2, 4, 6):
        ckpts.write(step, lambda d: (d / "w").write_text(str(step)), keep=2)
    assert sorted(p.name for p in ckpts.dir.iterdir()) == ["step_00000004", "step_00000006"]
    assert ckpts.latest() == ckpts.dir / "step_00000006" and (ckpts.latest() / "w").read_text() == "6"
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')  # torn
    truncate_metrics(metrics, 2)
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
