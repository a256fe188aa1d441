"""`make bench-gpu` without CUDA: a labelled dry run of every part, JSON + markdown with finite figures."""
import json
import math

import pytest

from bench.gpu import PARTS, GpuBenchConfig, finite_numbers, run_all

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_runs_every_part_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))  # where the device tool collects results
    run_all(GpuBenchConfig(dry_run=True))
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    md = (tmp_path / "gpu_bench.md").read_text()
    env = report["env"]
    assert env["dry_run"] is True and env["torch"] and env["date"] and env["device"].startswith("cpu")
    assert "DRY RUN" in md.splitlines()[0]
    assert set(report["parts"]) == {p.name for p in PARTS}
    for p in PARTS:
        part = report["parts"][p.name]
        assert part["status"] == "ok", (p.name, part.get("error"))
        nums = finite_numbers(part["result"])
        assert nums and all(math.isfinite(v) and v >= 0 for v in nums), p.name
        assert p.title in md
    llama = report["parts"]["stage2_llama"]["result"]
    assert {(r["model"], r["mode"]) for r in llama["rows"]} == {("plain", "eager"), ("ours", "eager")}
    assert all(r["tokens_s"] > 0 for r in llama["rows"]) and llama["ratio_eager"] > 0
    assert report["parts"]["stage2_turbo"]["result"]["family"] == "turbo"
    assert report["parts"]["build_cache"]["result"]["clips_s"] > 0
    assert report["parts"]["stage1_epoch"]["result"]["rows_s"] > 0
    mem = report["parts"]["memory"]["result"]
    assert set(mem["modes"]) == {"off", "on"}
    derived = mem["derived_520m"]  # checkpointing must let a bigger budget fit on every card
    assert all(derived["on"][g] > derived["off"][g] > 0 for g in ("24", "48", "80"))
    scale = report["parts"]["scale_stage1"]["result"]["sizes"]
    assert all(r["stage1"]["rows_s"] > 0 for r in scale.values())


def test_a_failing_part_is_a_row_and_the_others_still_run(tmp_path, monkeypatch):
    import bench.gpu as g

    def boom(dry, work):
        raise RuntimeError("no kernel for this")

    parts = tuple(g.Part(p.name, p.title, p.min_s, boom if p.name == "stage1_epoch" else p.run) for p in PARTS
                  if p.name in ("stage1_epoch", "memory"))
    monkeypatch.setattr(g, "PARTS", parts)
    report = run_all(GpuBenchConfig(dry_run=True, out=tmp_path))
    assert report["parts"]["stage1_epoch"]["status"] == "failed"
    assert "no kernel for this" in report["parts"]["stage1_epoch"]["error"]
    assert report["parts"]["memory"]["status"] == "ok"
    assert "failed" in (tmp_path / "gpu_bench.md").read_text()
