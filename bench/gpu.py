"""Every GPU figure from one command that fits a short device window: ``make bench-gpu``
(= ``uv run python -m bench.gpu``).

Parts, most important first, each calling an existing bench's function with a size and a time budget:

  stage2_llama   `bench.t3_throughput.measure`: our T3 + adapters at 520m vs plain `transformers` Llama, bf16,
                 eager and compiled — non-pad tokens/s, MFU, peak memory; goals ≥ 1.05× compiled plain, ≥ 130k tok/s
  build_cache    `bench.cache_build.frozen_throughput`: production-shaped frozen models on 10 s clips — clips/s,
                 GPU utilisation, projected 300k-clip build; goal ≥ 150 clips/s
  stage1_epoch   `bench.stage1_epoch.synthetic_epoch`: one 300k-row epoch at H=1024; goal < 15 s
  memory         `bench.t3_memory.measure`: peak memory vs token budget, activation checkpointing off / on,
                 largest budget that fits, and what fits 24 / 48 / 80 GB
  stage2_turbo   the same as stage2_llama for Turbo's GPT-2 T3 vs plain `GPT2LMHeadModel`
  scale_stage1   `bench.scale.run_scale`: its stage-1 rows (write a 10k store, load + train on the device)

Each part runs under try/except (a failure is a row saying so; the others still run) and is skipped once the
whole run's deadline (``--deadline-s``, 450 s: the 8-minute window less start-up) would be passed. Results are
written after every part — ``gpu_bench.json`` and ``gpu_bench.md`` under ``$OUT`` when set, else
``bench/results/`` — so a run killed by the device's timeout still leaves a partial table (the part in flight
says "running"). Without CUDA (or with ``--dry-run``) every part runs at a tiny size on the CPU and the
table says DRY RUN in its title: it checks the code, its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class GpuBenchConfig:
    dry_run: bool = False
    out: Path | None = None  # None: $OUT, else bench/results/
    deadline_s: float = 450.0
    parts: tuple[str, ...] = ()  # () = all, in PARTS order


@dataclass
class Part:
    name: str
    title: str
    min_s: float  # not started with less than this left before the deadline
    run: Callable[[bool, Path], dict]  # (dry run, scratch dir) → result


# ---- the parts -----------------------------------------------------------------------------------------------------
def _stage2(family: str) -> Callable[[bool, Path], dict]:
    def run(dry: bool, work: Path) -> dict:
        from bench.t3_throughput import ThroughputConfig, measure

        if dry:
            c = ThroughputConfig(preset="tiny", family=family, device="cpu", rows=16, batch_size=2, steps=1, warmup=1,
                                 length_scale=0.1)
        else:
            c = ThroughputConfig(preset="520m", family=family, device="cuda", rows=4096, batch_size=16, steps=12,
                                 warmup=3, bf16=True, compile=True, time_budget_s=12.0)
        return measure(c)
    return run


def _build_cache(dry: bool, work: Path) -> dict:
    from bench.cache_build import FrozenBenchConfig, frozen_throughput

    c = FrozenBenchConfig(device="cpu", clips=2, batch=2, clip_s=0.5, tiny=True) if dry else \
        FrozenBenchConfig(device="cuda", clips=512, batch=64)
    return frozen_throughput(c)


def _stage1(dry: bool, work: Path) -> dict:
    from bench.stage1_epoch import EpochConfig, synthetic_epoch

    c = EpochConfig(rows=256, unique=32, hidden=32, batch_size=64, device="cpu", mapper_hidden=32, mapper_blocks=1) \
        if dry else EpochConfig(device="cuda")
    return synthetic_epoch(c, work)


def _memory(dry: bool, work: Path) -> dict:
    from bench.t3_memory import MemoryConfig, measure

    c = MemoryConfig(preset="tiny", device="cpu", budgets=(128,), steps=1) if dry else MemoryConfig(device="cuda")
    res = measure(c)
    if dry:  # the 520m figures a CPU can give: the derived model
        from bench.t3_memory import derived_model, fits
        from tts_core.t3 import T3Config

        cfg = T3Config.preset("520m")
        res["derived_520m"] = {("on" if ck else "off"): {g: fits(*derived_model(cfg, ck), g) for g in c.cards_gb}
                               for ck in (False, True)}
    return res


def _scale(dry: bool, work: Path) -> dict:
    from bench.scale import ScaleConfig, run_scale

    c = ScaleConfig(sizes=(500,), hidden=32, stages=("write", "stage1"), steps=2, batch_size=64, mapper_hidden=32,
                    mapper_blocks=1, workdir=work) if dry else \
        ScaleConfig(sizes=(10_000,), stages=("write", "stage1"), device="cuda", workdir=work)
    res = run_scale(c, log=lambda m: print(m, flush=True))
    got = {str(n): r for n, r in res.items()}
    missing = [f"{n}:{k}" for n, r in got.items() for k in ("write", "stage1_load", "stage1") if k not in r]
    if missing:
        raise RuntimeError(f"scale stages failed (their stderr is above): {missing}")
    return {"sizes": got}


PARTS = (
    Part("stage2_llama", "stage 2: T3 520m + adapters vs plain Llama", 150, _stage2("llama")),
    Part("build_cache", "build-cache: production-shaped frozen models, 10 s clips", 40, _build_cache),
    Part("stage1_epoch", "stage 1: one 300k-row epoch, H=1024", 40, _stage1),
    Part("memory", "stage 2 memory: token budget, activation checkpointing off/on", 60, _memory),
    Part("stage2_turbo", "stage 2: Turbo GPT-2 T3 + adapters vs plain GPT-2", 120, _stage2("turbo")),
    Part("scale_stage1", "bench/scale.py stage-1 rows on the device", 40, _scale),
)


# ---- report ----------------------------------------------------------------------------------------------------------
def environment(dry: bool) -> dict:
    cuda = torch.cuda.is_available() and not dry
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": dry,
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                                 f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else None}


def _n(x, fmt: str = ",.0f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{unit}"


def _goals(goals: dict, dry: bool) -> str:
    if not goals:
        return ""
    return "; ".join(f"{g}: {'n/a (dry run)' if dry else ('**met**' if ok else '**not met**')}"
                     for g, ok in goals.items())


def _rows(name: str, r: dict, dry: bool) -> list[tuple[str, str, str]]:
    """(measure, figure, goal) rows of one part's result."""
    if name.startswith("stage2_"):
        base = {(x["model"], x["mode"]): x for x in r["rows"]}
        out = []
        for x in r["rows"]:
            anchor = base[("plain", x["mode"])]
            ratio = f" = **{x['tokens_s'] / anchor['tokens_s']:.2f}×** plain {x['mode']}" if x["model"] == "ours" else ""
            out.append((f"{x['model']} {x['mode']}: non-pad tokens/s{ratio}",
                        f"{_n(x['tokens_s'])} tok/s; MFU {_n(x['mfu'] and 100 * x['mfu'], '.1f', '%')}; peak "
                        f"{_n(x['peak_mem_gib'], '.1f', ' GiB')}; padding {x['padding']:.1%}; "
                        f"{x['steps']} steps (warm-up/compile {x['warmup_s']:.0f} s)", ""))
        out[-1] = (*out[-1][:2], _goals(r.get("goals", {}), dry))
        return out
    if name == "build_cache":
        per = ", ".join(f"{k} {v:,.0f}" for k, v in r["per_model_clips_s"].items())
        return [(f"clips/s, all four models in sequence ({r['clip_s']:g} s clips)",
                 f"{r['clips_s']:,.1f} clips/s (per model: {per}); GPU util {_n(r['gpu_util_pct'], '.0f', '%')}; "
                 f"300k clips in {r['projected_300k_s'] / 3600:,.2f} h", _goals(r["goals"], dry))]
    if name == "stage1_epoch":
        return [(f"one epoch of {r['rows']:,} rows at H={r['hidden']} ({r['unique']:,} instructions)",
                 f"{r['rows_s']:,.0f} rows/s = {r['epoch_s']:.1f} s per epoch (300k: {300_000 / r['rows_s']:.1f} s)",
                 _goals(r["goals"], dry))]
    if name == "memory":
        out = []
        for mode, m in r["modes"].items():
            fit = ", ".join(f"{g} GB: {t:,}" for g, t in m["cards"].items())
            out.append((f"activation checkpointing {mode}: largest budget run (tokens)",
                        f"{m['largest_fit']:,} (fixed {m['fixed_gb']:.2f} GB + {m['per_token_kb']:.0f} KB/token, "
                        f"{m['source']}); fits {fit}", ""))
        for mode, cards in r.get("derived_520m", {}).items():
            out.append((f"520m, checkpointing {mode}: token budget that fits (derived estimate)",
                        ", ".join(f"{g} GB: {t:,}" for g, t in cards.items()), ""))
        return out
    if name == "scale_stage1":
        out = []
        for n, res in r["sizes"].items():
            for key in ("write", "stage1_load", "stage1"):
                x = res[key]
                out.append((f"{int(n):,} rows: {key}", f"{x['rows_s']:,.0f} rows/s, {x['wall']:.1f} s wall, "
                                                       f"peak RSS {x['rss']:.2f} GiB", ""))
        return out
    return [("result", json.dumps(r)[:200], "")]


def markdown(report: dict) -> str:
    env = report["env"]
    title = "GPU benchmarks — DRY RUN (CPU, tiny sizes: checks the code, figures mean nothing)" \
        if env["dry_run"] else "GPU benchmarks"
    lines = [f"### {title}", "",
             f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda'] or 'n/a'}; {env['date']}; "
             f"wall {report['wall_s']:.0f} s (`make bench-gpu`).", "",
             "| part | measure | figure | goal |", "|---|---|---|---|"]
    for p in PARTS:
        st = report["parts"].get(p.name)
        if st is None:
            continue
        if st["status"] != "ok":
            lines.append(f"| {p.title} | {st['status']} | {st.get('error', '')[:300]} | |")
            continue
        for measure, fig, goal in _rows(p.name, st["result"], env["dry_run"]):
            lines.append(f"| {p.title} | {measure} | {fig} | {goal} |")
    return "\n".join(lines) + "\n"


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_bench.md").write_text(markdown(report))


# ---- the driver --------------------------------------------------------------------------------------------------------
def run_all(c: GpuBenchConfig) -> dict:
    """Run the parts (module doc); → the report (also written, after every part)."""
    t0 = time.perf_counter()
    dry = c.dry_run or not torch.cuda.is_available()
    out = Path(c.out or os.environ.get("OUT") or RESULTS)
    report = {"env": environment(dry), "wall_s": 0.0, "parts": {}}
    if dry:
        print("DRY RUN: no CUDA device (or --dry-run): every part at a tiny size on the CPU; figures mean nothing",
              flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    for p in PARTS:
        if c.parts and p.name not in c.parts:
            continue
        left = c.deadline_s - (time.perf_counter() - t0)
        if not dry and left < p.min_s:
            report["parts"][p.name] = {"status": "skipped", "error": f"out of time ({left:.0f} s left < {p.min_s} s)"}
            _write(report, out)
            continue
        report["parts"][p.name] = {"status": "running (did not finish)"}
        _write(report, out)
        print(f"== {p.name}: {p.title}", flush=True)
        t = time.perf_counter()
        try:
            res = p.run(dry, work / p.name)
            report["parts"][p.name] = {"status": "ok", "seconds": time.perf_counter() - t, "result": res}
        except Exception as e:  # one failing part is a row; the others still run
            traceback.print_exc()
            report["parts"][p.name] = {"status": "failed", "seconds": time.perf_counter() - t,
                                       "error": f"{type(e).__name__}: {e}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        report["wall_s"] = time.perf_counter() - t0
        print(f"   {report['parts'][p.name]['status']} in {time.perf_counter() - t:.0f} s", flush=True)
        _write(report, out)
    report["wall_s"] = time.perf_counter() - t0
    _write(report, out)
    print(markdown(report))
    print(f"written: {out / 'gpu_bench.md'}, {out / 'gpu_bench.json'}")
    return report


def finite_numbers(x) -> list[float]:
    """Every number in a result (for checks: all must be finite)."""
    if isinstance(x, bool) or x is None:
        return []
    if isinstance(x, (int, float)):
        return [float(x)]
    if isinstance(x, dict):
        return [v for y in x.values() for v in finite_numbers(y)]
    if isinstance(x, (list, tuple)):
        return [v for y in x for v in finite_numbers(y)]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU run of every part (automatic without CUDA)")
    ap.add_argument("--out", type=Path, help="output directory (default: $OUT, else bench/results/)")
    ap.add_argument("--deadline-s", type=float, default=450.0, help="parts not started past this (device window)")
    ap.add_argument("--parts", default="", help=f"comma-separated subset of {', '.join(p.name for p in PARTS)}")
    a = ap.parse_args()
    run_all(GpuBenchConfig(dry_run=a.dry_run, out=a.out, deadline_s=a.deadline_s,
                           parts=tuple(s for s in a.parts.split(",") if s)))


if __name__ == "__main__":
    main()
