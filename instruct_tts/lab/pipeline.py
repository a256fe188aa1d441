"""`instruct-tts lab`: does training make the model follow instructions? One command, one report.

lab corpus (espeak-ng, calibrated levels, hundreds of voices) → split (held-out voices, held-out instructions incl.
every held-out-wording clip; `evaluation.lab_split`) → two caches: ``train.zarr`` (the training clips only) and
``all.zarr`` (a copy of it grown by the held-out clips: same rows, same tokenizer, one codebook) → stage 1 and
stage 2 on ``train.zarr`` → on held-out clips: stage-1 cosines vs mean/oracle, stage-2 held-out speech loss per
checkpoint, and direction accuracies of ground-truth audio, ground-truth tokens through the vocoder, and the model →
``report.md``, ``report.json``, ``measurements.json`` and plots in ``--out``.

Each stage is the stage's own library call (the lab is orchestration + report: `split_files`, `caches`,
`measurements`, and `tts_core.evaluation.lab_report`); every step resumes or is reused, so rerunning the command
redoes only what is missing (the evaluation is always recomputed).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from instruct_tts.lab.config import LabConfig, same_run_fields
from instruct_tts.lab.paths import LabPaths

if TYPE_CHECKING:
    from instruct_tts.lab.measurements import HeldOutMeasurements


def run_lab(cfg: LabConfig, say: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole lab; returns the report dict (also written to ``out/report.json``)."""
    from instruct_tts.lab.caches import build_caches
    from instruct_tts.lab.measurements import measure_held_out
    from instruct_tts.lab.split_files import corpus_clips, write_split
    from tts_core.corpus.demo import generate_demo_corpus, lab_corpus_config
    from tts_core.sampling_defaults import trained_null_instruction
    from tts_core.stage2 import Stage2Config

    p = LabPaths(Path(cfg.out))
    t_start, seconds, profile = time.time(), {}, {}
    guided = max((cfg.sampling().instruction_guidance or 0.0, cfg.sampling(reference=True).instruction_guidance or 0.0,
                  *cfg.guidance_sweep, *cfg.reference_guidance_sweep), default=0.0)
    if guided > 0 and not trained_null_instruction(Stage2Config.from_dict(cfg.stage2_train()).run_record()):
        # found now, not after the training it would waste
        raise ValueError(f"instruction guidance W = {guided:g} needs stage 2's null instruction, but "
                         "--instruction-dropout is 0: pass --instruction-guidance 0 --guidance-sweep '' "
                         "--set reference_guidance_sweep= as well (or --ablation no-null-instruction)")

    def step(name: str, k: int, what: str):
        say(f"[{k}/6] {what}")
        seconds[name] = time.time()

    def done(name: str) -> None:
        seconds[name] = time.time() - seconds[name]

    step("corpus", 1, f"lab corpus: {cfg.n_clips} clips -> {p.corpus}")
    corpus = generate_demo_corpus(lab_corpus_config(p.corpus, n_clips=cfg.n_clips, seed=cfg.seed,
                                                    held_out_wording=cfg.held_out_wording))
    clips = corpus_clips(corpus)
    roles = write_split(cfg, clips, p.split)
    done("corpus")

    step("caches", 2, f"build-cache: training clips -> {p.train_store}, + held-out clips -> {p.all_store}")
    profile["caches"] = build_caches(cfg, corpus.root, p, say)
    done("caches")

    step("stage1", 3, f"train-stage1 ({cfg.stage1_steps} steps max) -> {p.mapper}")
    from tts_core.mapper.flow import MapperConfig
    from tts_core.stage1.from_store import train_stage1_from_store
    from tts_core.stage1.train import Stage1TrainConfig

    train_stage1_from_store(p.train_store, Stage1TrainConfig(**cfg.stage1_train(), out_dir=str(p.mapper)),
                            MapperConfig(hidden_dim=cfg.mapper_hidden_dim, n_blocks=cfg.mapper_blocks,
                                         draws=cfg.mapper_draws, temperature=cfg.mapper_temperature))
    done("stage1")

    step("stage2", 4, f"train-stage2 ({cfg.t3} T3, {cfg.stage2_steps} steps) -> {p.t3}")
    from tts_core.stage2.train import Stage2Config, train_stage2

    train_stage2(Stage2Config.from_dict({**cfg.stage2_train(), "store": p.train_store, "mapper_dir": str(p.mapper),
                                         "t3": cfg.t3, "out_dir": str(p.t3)}))
    done("stage2")

    step("evaluate", 5, f"evaluate held-out clips ({cfg.eval_clips} per split synthesized)")
    measured = measure_held_out(cfg, p, corpus.root, clips, roles, say)
    done("evaluate")
    profile["stage2"] = stage2_profile(p, seconds["stage2"])
    profile["evaluate"] = measured.seconds

    step("report", 6, f"report -> {p.out / 'report.md'}")
    report = _report(cfg, corpus, clips, roles, measured, seconds, time.time() - t_start, profile)
    (p.out / "measurements.json").write_text(json.dumps(measured.records, indent=1, default=_json))
    say(f"lab done in {report['wall_s'] / 60:.1f} min: {p.out / 'report.md'}")
    return report


def stage2_profile(p: LabPaths, total_s: float) -> dict:
    """Stage 2's wall time split into its steps and the rest (set-up: frozen models, the instruction tables, data;
    and saving), from the loop's own log (each row's time): steps = seconds per step × steps. Empty when no step
    ran in this invocation."""
    rows = [json.loads(ln) for ln in (p.t3 / "metrics.jsonl").read_text().splitlines() if ln.strip()] \
        if (p.t3 / "metrics.jsonl").is_file() else []
    if len(rows) < 2 or total_s <= 0 or rows[-1]["time"] - rows[0]["time"] > total_s:
        return {}
    per_step = (rows[-1]["time"] - rows[0]["time"]) / max(rows[-1]["step"] - rows[0]["step"], 1)
    steps_s = per_step * rows[-1]["step"]
    return {"steps": steps_s, "set-up and saving": total_s - steps_s, "s_per_step": per_step}


def _report(cfg: LabConfig, corpus, clips: list[dict], roles: dict, m: HeldOutMeasurements, seconds: dict,
            wall_s: float, profile: dict | None = None) -> dict:
    """The report dict from the measurements, written as report.json, report.md and the plots."""
    from instruct_tts.lab.caches import caption_counts
    from tts_core.atomic_files import atomic_write_text
    from tts_core.evaluation import lab_report as lr
    from tts_core.evaluation.lab_split import HELD_OUT_VOICE, TRAIN, espeak_voice, role_counts

    out = Path(cfg.out)
    stage1_cos, curve, train_log, renderings, probe, sweeps = (m.stage1_cosines, m.curve, m.train_log, m.renderings,
                                                                m.probe, m.sweeps)
    tables = lr.attribute_tables(renderings, cfg.n_boot, cfg.seed)
    stage1 = lr.stage1_section(stage1_cos, cfg.n_boot, cfg.seed)
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "corpus": {"n_clips": corpus.n_clips, "n_voices": len(corpus.speakers),
                   "n_espeak_voices": len({espeak_voice(s) for s in corpus.speakers})},
        "split_counts": role_counts(list(roles.values())),
        "held_out_voices": sorted({espeak_voice(c["speaker"]) for c in clips if roles[c["cache_id"]] == HELD_OUT_VOICE}),
        "training_voices": sorted({espeak_voice(c["speaker"]) for c in clips if roles[c["cache_id"]] == TRAIN}),
        "step_seconds": {k: float(v) for k, v in seconds.items() if k != "report"},
        "profile": profile or {},
        "wall_s": float(wall_s),
        "tables": tables, "by_wording": lr.wording_section(renderings, probe, cfg.n_boot, cfg.seed), "stage1": stage1,
        "stage2": {"curve": curve, "final_train_loss": train_log[-1] if train_log else None},
        "sampling": {"main": {k: v for k, v in asdict(cfg.sampling()).items() if k != "max_new_tokens"},
                     "reference_instruction_guidance": cfg.sampling(reference=True).instruction_guidance,
                     "sweeps": lr.sweep_section(sweeps or {}, cfg.n_boot, cfg.seed)},
    }
    report["captions"] = caption_counts(cfg, out)
    if cfg.compare_to:
        report["compare_to"] = lr.caption_comparison(report, json.loads((Path(cfg.compare_to) / "report.json")
                                                                        .read_text(encoding="utf-8")),
                                                     same_run_fields())
    report["reference_voice"] = lr.reference_voice(renderings, cfg.n_boot, cfg.seed)
    report["targets"] = lr.targets(tables, stage1, report["by_wording"], report["reference_voice"])
    report["notes"] = lr.notes(report)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=_json))
    atomic_write_text(out / "report.md", lr.to_markdown(report))
    lr.plot_attributes(tables, out / "attributes.png")
    lr.plot_stage2(train_log, curve, out / "stage2_loss.png")
    lr.plot_measurements(renderings, out / "measurements.png")
    return report


def _json(x):
    import numpy as np

    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))
