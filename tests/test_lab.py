"""The instruction-following lab: its statistics (pure), its split rule, and the whole pipeline at the tiny preset.

The end-to-end test runs `instruct-tts lab` at the tiny preset once (~1-3 min on 2 cores: corpus, two caches, both
stages, evaluation) and checks the report's structure and the values that can fail: ground-truth ceilings, pair
counts, intervals around their estimates, held-out voices and wordings absent from the training store.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tts_core.evaluation.lab_split import (
    DROPPED, HELD_OUT_INSTRUCTION, HELD_OUT_VOICE, TRAIN, espeak_voice, split_lab_clips,
)
from tts_core.evaluation.held_out import SAMPLING_CURVE
from tts_core.evaluation.stats import bootstrap_ci, direction_ci, gap_closed, mean_ci, shuffled_direction_accuracy


# ---- statistics -------------------------------------------------------------------------------------------------
def test_direction_ci_perfect_separation_is_certain():
    levels = ["low"] * 10 + ["high"] * 10
    r = direction_ci(list(range(20)), levels, "low", "high", n_boot=300)
    assert r["accuracy"] == 1.0 and r["pairs"] == 100 and r["ci"] == [1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_ci_contains_estimate_and_narrows_with_more_clips(seed):
    rng = np.random.default_rng(seed)

    def sample(n):  # "high" clips measure 0.5 sd higher: true AUC ~0.64
        levels = np.array(["low", "high"] * (n // 2))
        return rng.normal(size=n) + 0.5 * (levels == "high"), levels

    small, big = (direction_ci(*sample(n), "low", "high", n_boot=400, seed=seed) for n in (40, 800))
    for r in (small, big):
        assert r["ci"][0] <= r["accuracy"] <= r["ci"][1]
    assert big["ci"][1] - big["ci"][0] < 0.5 * (small["ci"][1] - small["ci"][0])
    assert big["ci"][0] > 0.5  # 800 clips separate a 0.5-sd effect from chance


def test_direction_ci_respects_groups_and_skips_nan():
    # within each gender low < high, across genders not: grouped accuracy 1, ungrouped not
    vals = [100, 120, 200, 220, math.nan]
    lv = ["low", "high", "low", "high", "high"]
    g = ["male", "male", "female", "female", "male"]
    assert direction_ci(vals, lv, "low", "high", g, n_boot=100)["accuracy"] == 1.0
    assert direction_ci(vals, lv, "low", "high", g, n_boot=100)["pairs"] == 2
    assert direction_ci(vals, lv, "low", "high", n_boot=100)["accuracy"] == 0.75


def test_shuffled_baseline_is_chance_even_for_perfect_measurements():
    levels = ["low"] * 30 + ["high"] * 30
    r = shuffled_direction_accuracy(list(range(60)), levels, "low", "high", n_perm=300)
    assert abs(r["accuracy"] - 0.5) < 0.03 and r["ci"][0] < 0.5 < r["ci"][1] and r["pairs"] == 900


def test_bootstrap_and_mean_ci_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci(0, lambda i: 1.0))
    assert all(math.isnan(x) for x in bootstrap_ci(5, lambda i: math.nan))
    m = mean_ci([0.2, 0.4, 0.6, 0.8], n_boot=500)
    assert m["value"] == pytest.approx(0.5) and m["n"] == 4 and 0.2 <= m["ci"][0] < 0.5 < m["ci"][1] <= 0.8


def test_gap_closed():
    assert gap_closed(0.7, 0.8, 0.77) == pytest.approx(0.7)
    assert gap_closed(0.7, 0.8, 0.65) == pytest.approx(-0.5)
    assert math.isnan(gap_closed(0.8, 0.8, 0.9))


# ---- split ------------------------------------------------------------------------------------------------------
def test_split_holds_out_espeak_voices_with_twins_and_every_held_out_wording():
    voices = [f"en+{v}@{f}" for v in ("m1", "m2", "m3", "f1", "f2", "f3", "f4", "m4", "m5", "m6") for f in ("0.92", "1.08")]
    speakers = [v for v in voices for _ in range(6)]
    wordings = ["held_out" if i % 10 == 3 else "train" for i in range(len(speakers))]
    instructions = [f"instruction {i % 50}" for i in range(len(speakers))]  # repeated texts: leaks to drop
    roles = split_lab_clips(speakers, wordings, instructions, voice_frac=0.2, instruction_frac=0.1)
    assert roles == split_lab_clips(speakers, wordings, instructions, voice_frac=0.2, instruction_frac=0.1)
    held_v = {espeak_voice(s) for s, r in zip(speakers, roles) if r == HELD_OUT_VOICE}
    train_v = {espeak_voice(s) for s, r in zip(speakers, roles) if r == TRAIN}
    assert held_v and train_v and not held_v & train_v  # twins ('@0.92', '@1.08') go together
    assert all(r != TRAIN for w, r in zip(wordings, roles) if w == "held_out")
    scored = {t for t, r in zip(instructions, roles) if r in (HELD_OUT_INSTRUCTION, HELD_OUT_VOICE)}
    assert not scored & {t for t, r in zip(instructions, roles) if r == TRAIN}
    assert DROPPED in roles and HELD_OUT_INSTRUCTION in roles


# ---- the pipeline, tiny -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from instruct_tts.lab import LabConfig, run_lab

    out = tmp_path_factory.mktemp("lab")
    report = run_lab(LabConfig.preset("tiny", out=out), say=lambda s: None)
    return out, report


def test_lab_writes_its_report_files(lab):
    out, report = lab
    for name in ("report.md", "report.json", "measurements.json", "attributes.png", "stage2_loss.png",
                 "measurements.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["targets"] == json.loads(json.dumps(report["targets"]))
    md = (out / "report.md").read_text()
    for heading in ("## Targets", "### pitch", "### rate", "### loudness", "### gender", "## Stage 1", "## Stage 2"):
        assert heading in md


def test_lab_tables_have_ceilings_model_baselines_with_intervals(lab):
    out, report = lab
    tables = report["tables"]
    assert set(tables) == {"pitch", "rate", "loudness", "gender"}
    for attr, table in tables.items():
        for split in (HELD_OUT_INSTRUCTION, HELD_OUT_VOICE):
            names = [r["rendering"] for r in table if r["split"] == split]
            with_ref = ["model, reference clip of the voice + instruction"] if split == HELD_OUT_VOICE else []
            assert names == ["ground truth audio", "ground-truth tokens -> vocoder", "model", *with_ref,
                             "instruction ignored (model outputs, shuffled instructions)", "chance"], (attr, split)
        for r in table:  # the tiny T3's clips may hold no speech the VAD finds (no rate pairs): NaN, 0 pairs
            if r["rendering"] == "chance":
                continue
            if not r["pairs"]:
                assert math.isnan(r["accuracy"]), r
            elif r["rendering"].startswith("instruction ignored"):  # mean and spread of a permutation distribution
                assert 0 <= r["ci"][0] <= r["ci"][1] <= 1 and 0 <= r["accuracy"] <= 1, r
            else:
                assert r["ci"][0] <= r["accuracy"] <= r["ci"][1], r
    gt = {(a, r["split"]): r for a, t in tables.items() for r in t if r["rendering"] == "ground truth audio"}
    for (attr, split), r in gt.items():  # calibrated levels: the measures read pitch, loudness and gender exactly
        # (the tiny run holds out one espeak voice, one gender: no gender pairs among held-out voices)
        if (attr, split) != ("gender", HELD_OUT_VOICE):
            assert r["pairs"] > 0 and (attr == "rate" or r["accuracy"] >= 0.98), (attr, split, r)
    # pair counts agree with a recount from the per-clip measurements: quiet x loud clips (loudness is always finite)
    clips = json.loads((out / "measurements.json").read_text())
    for split in (HELD_OUT_INSTRUCTION, HELD_OUT_VOICE):
        asked = [c["loudness"] for c in clips if c["split"] == split and c["rendering"] == "ground truth audio"]
        assert gt["loudness", split]["pairs"] == asked.count("quiet") * asked.count("loud") > 0


def test_lab_splits_the_model_on_held_out_instructions_by_wording(lab):
    """Known words in new texts vs unseen words, the model beside the instruction-embedding probe: each wording's
    loudness pairs are its own quiet x loud clips (a recount from measurements.json), the two wordings never pair
    across each other, and the probe is scored on exactly the model's clips."""
    out, report = lab
    clips = [c for c in json.loads((out / "measurements.json").read_text())
             if c["split"] == HELD_OUT_INSTRUCTION and c["rendering"] == "model"]
    rows = {(r["source"], r["wording"], r["attribute"]): r for r in report["by_wording"]}
    sources = ("model", "instruction-embedding probe")
    assert set(rows) == {(s, w, a) for s in sources for w in ("all", "train", "held_out", "voices")
                         for a in ("pitch", "rate", "loudness")}
    voices = next(r for r in report["tables"]["loudness"] if r["split"] == HELD_OUT_VOICE and r["rendering"] == "model")
    assert rows["model", "voices", "loudness"]["pairs"] == voices["pairs"]
    for name, s in report["reference_voice"].items():  # every held-out-voice clip measured against its reference
        assert s["n"] == next(r for r in report["tables"]["gender"] if r["split"] == HELD_OUT_VOICE
                              and r["rendering"] == name)["clips"] and -1 <= s["value"] <= 1
    assert report["reference_voice"]["ground truth audio"]["value"] > report["reference_voice"]["model"]["value"]
    for wording in ("train", "held_out"):
        asked = [c["loudness"] for c in clips if c["wording"] == wording]
        for source in sources:
            assert (rows[source, wording, "loudness"]["pairs"] or 0) == asked.count("quiet") * asked.count("loud")
    model = next(r for r in report["tables"]["loudness"] if r["split"] == HELD_OUT_INSTRUCTION and r["rendering"] == "model")
    assert rows["model", "all", "loudness"]["pairs"] == model["pairs"]
    assert sum(rows["model", w, "loudness"]["pairs"] or 0 for w in ("train", "held_out")) <= model["pairs"]
    probe_known = rows["instruction-embedding probe", "train", "loudness"]
    if probe_known["pairs"]:  # known words: the probe reads the levels it was fitted on, above chance even here
        # (the tiny preset's 20-step pooling over CAM++ targets: measured 0.75 on its few pairs; with the GE2E
        # stand-in's targets it read ≥ 0.9 — the ≥ 0.95 property itself is the pure probe test below)
        assert probe_known["accuracy"] > 0.5, probe_known
    assert "by wording" in (out / "report.md").read_text()


def test_lab_held_out_clips_never_reach_the_training_store(lab):
    out, report = lab
    from cache.reader import CacheReader

    assert report["held_out_voices"] and not set(report["held_out_voices"]) & set(report["training_voices"])
    train = CacheReader(str(out / "cache" / "train.zarr")).ok_manifest
    trained_voices = {espeak_voice(s) for s in train["speaker"]}
    assert not trained_voices & set(report["held_out_voices"])
    roles = dict(line.split(",") for line in (out / "split" / "roles.csv").read_text().splitlines()[1:])
    import csv

    with (out / "corpus" / "attributes.csv").open() as f:
        attrs = list(csv.DictReader(f))
    in_train = {c.rsplit("/", 1)[-1] for c in train["clip_id"]}
    held_wording = {a["clip_id"] for a in attrs if a["wording"] == "held_out"}
    assert held_wording and not held_wording & in_train
    assert in_train == {c for c, r in roles.items() if r == TRAIN}
    n_all = len(CacheReader(str(out / "cache" / "all.zarr")).ok_manifest)
    assert n_all == report["split_counts"][TRAIN] + report["split_counts"][HELD_OUT_INSTRUCTION] + \
        report["split_counts"][HELD_OUT_VOICE]


def test_speech_loss_probe_computes_only_its_rows_tables_and_scores_as_the_full_ones(lab):
    """The held-out loss curve's rows get the mapper tables of the instructions they can draw, nothing more, and
    score exactly as with the store's full tables."""
    import torch

    from cache.reader import CacheReader
    from tts_core.evaluation.held_out import SpeechLossProbe
    from tts_core.stage1.artifacts import load_mapper
    from tts_core.stage2.prepare import prepare_stage2_data
    from tts_core.stage2.text_tokenizer import load_text_tokenizer

    out, _ = lab
    store, mapper_dir, run = str(out / "cache" / "all.zarr"), out / "runs" / "mapper", out / "runs" / "t3"
    probe = SpeechLossProbe(store, mapper_dir, run)
    rows = probe.rows(probe.data.clip_ids[::7])
    assert 0 < probe.tabled.sum() < len(probe.tabled)
    encoder, mapper, meta = load_mapper(mapper_dir)
    full = prepare_stage2_data(CacheReader(store), load_text_tokenizer(None, t3_dir=run), encoder, mapper,
                               mapper_meta=meta, mapper_seed=probe.mapper_seed)
    done = torch.from_numpy(np.flatnonzero(probe.tabled))
    torch.testing.assert_close(probe.data.mapper_spk[done], full.mapper_spk[done], rtol=1e-5, atol=1e-6)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    partial = probe.loss(ckpt, rows)
    probe.data = full
    assert math.isfinite(partial) and partial == pytest.approx(probe.loss(ckpt, rows), rel=1e-5)


def test_lab_sampling_sweeps_rerender_the_same_clips(lab):
    """The tiny preset sweeps repetition penalty (1.0, 1.2) and instruction guidance W (0, 2): at the main table's
    own settings (1.2 = the official default, W = 0) a sweep holds the main model rows clip for clip (same clips,
    seeds and sampling: reused, not rendered again; W = 0's token identity is tests/test_t3_model.py's),
    the other values re-render the same clips, and the report has an "accuracy vs" table per option."""
    out, report = lab
    sweeps = report["sampling"]["sweeps"]
    assert set(sweeps) == {"repetition_penalty", "instruction_guidance", "reference_guidance"}
    assert report["sampling"]["main"] == {"temperature": None, "top_p": None, "top_k": None, "min_p": None,
                                          "repetition_penalty": None, "cfg_weight": None, "instruction_guidance": 0.0}
    clips = json.loads((out / "measurements.json").read_text())
    for opt, same in (("repetition_penalty", 1.2), ("instruction_guidance", 0.0)):
        assert {(r["value"], r["split"]) for r in sweeps[opt]} == {
            (v, s) for v in ((1.0, 1.2) if opt == "repetition_penalty" else (0.0, 2.0))
            for s in (HELD_OUT_INSTRUCTION, HELD_OUT_VOICE)}
        for split in (HELD_OUT_INSTRUCTION, HELD_OUT_VOICE):
            main = [c for c in clips if c["split"] == split and c["rendering"] == "model"][:4]
            swept = [c for c in clips if c["split"] == split and c["rendering"] == f"model, {opt} = {same:g}"]
            assert [c["clip_id"] for c in swept] == [c["clip_id"] for c in main] and len(main) == 4
            for a, b in zip(main, swept):
                for col in ("f0_hz", "rate_lps", "loudness_lufs"):
                    assert a[col] == b[col] or (math.isnan(a[col]) and math.isnan(b[col])), (opt, col, a, b)
    md = (out / "report.md").read_text()
    assert "### accuracy vs repetition penalty" in md and "### accuracy vs instruction guidance W" in md
    # W with a reference clip: held-out voices only, the same clips and references as the main "reference clip +
    # instruction" rows (W 0 = the tiny preset's main W: reused), each with its voice cosine; the voice column only here
    from tts_core.evaluation.lab_report import WITH_REFERENCE

    ref = sweeps["reference_guidance"]
    assert {(r["value"], r["split"]) for r in ref} == {(v, HELD_OUT_VOICE) for v in (0.0, 2.0)}
    main = [c for c in clips if c["split"] == HELD_OUT_VOICE and c["rendering"] == WITH_REFERENCE][:4]
    for w in (0.0, 2.0):
        swept = [c for c in clips if c["rendering"] == f"model, reference_guidance = {w:g}"]
        assert [(c["clip_id"], c["reference_clip"]) for c in swept] == [(c["clip_id"], c["reference_clip"])
                                                                        for c in main]
        assert all(-1.0 <= c["ref_spk_cos"] <= 1.0 for c in swept)
        if w == 0.0:
            assert [c["ref_spk_cos"] for c in swept] == [c["ref_spk_cos"] for c in main]
        voice = next(r for r in ref if r["value"] == w and r["attribute"] == "voice cosine")
        assert voice["accuracy"] == pytest.approx(np.mean([c["ref_spk_cos"] for c in swept])) and voice["pairs"] == 4
    assert not any(r["attribute"] == "voice cosine" for opt in ("repetition_penalty", "instruction_guidance")
                   for r in sweeps[opt])
    assert "### accuracy vs instruction guidance W with a reference clip" in md


def test_issue_23_targets_judge_known_words_probe_slack_voices_and_reference():
    from tts_core.evaluation.lab_report import PROBE, WITH_REFERENCE, targets

    def row(split, rendering, acc):
        return {"split": split, "rendering": rendering, "accuracy": acc, "pairs": 200, "ci": [acc, acc]}

    tables = {a: [row(HELD_OUT_VOICE, "model", 0.96 if a != "rate" else 0.90),
                  row(HELD_OUT_VOICE, WITH_REFERENCE, 0.86 if a != "rate" else 0.50)]
              for a in ("pitch", "rate", "loudness", "gender")}
    by_wording = [{"source": s, "wording": w, "attribute": a,
                   "accuracy": {("model", "train"): 0.96, (PROBE, "train"): 1.0, ("model", "all"): 0.80,
                                (PROBE, "all"): 0.85}.get((s, w), 0.9)}
                  for s in ("model", PROBE) for w in ("all", "train", "held_out", "voices") for a in ("pitch", "rate", "loudness")]
    t = {x["target"]: x for x in targets(tables, {}, by_wording)}
    known = [x for k, x in t.items() if "training wording (known words)" in k]
    assert len(known) == 3 and all(x["met"] and x["value"] == 0.96 for x in known)
    slack = {k: x for k, x in t.items() if "model ≥ probe" in k}
    assert len(slack) == 12  # 3 attributes x (all, training wording, held-out wording, held-out voices)
    unmet = {k for k, x in slack.items() if not x["met"]}  # 0.96 vs 1.0 and 0.80 vs 0.85: more than 0.03 short
    assert unmet == {k for k in slack if "training wording" in k or "all held-out" in k}
    assert all(x["value"] == pytest.approx(0.0) for k, x in slack.items() if k not in unmet)
    assert all("the embedding limits it" in k for k in slack if ", all held-out" in k)  # probe 0.85 < 0.9: said
    voices = {k: x["met"] for k, x in t.items() if "on held-out voices" in k and "reference" not in k}
    assert voices == {f"{a}: model ≥ 0.95 on held-out voices": a != "rate" for a in ("pitch", "rate", "loudness", "gender")}
    ref = {k: x["met"] for k, x in t.items() if "reference clip" in k}
    assert ref == {"rate: reference clip + instruction ≥ 0.85 on held-out voices": False,
                   "loudness: reference clip + instruction ≥ 0.85 on held-out voices": True}


def test_sweep_section_scores_each_value():
    from tts_core.evaluation.lab_report import sweep_section, to_markdown  # noqa: F401

    def rows(order):  # 4 clips asking low/high rate; `order` +1: measured in the asked direction
        return [{"rate": lvl, "rate_lps": 10 + order * (5 if lvl == "fast" else -5)} for lvl in ("slow", "fast") * 2]

    out = sweep_section({"instruction_guidance": {0.0: {"x": rows(-1)}, 2.0: {"x": rows(+1)}}}, n_boot=50)
    rate = {r["value"]: r for r in out["instruction_guidance"] if r["attribute"] == "rate"}
    assert rate[0.0]["accuracy"] == 0.0 and rate[2.0]["accuracy"] == 1.0 and rate[2.0]["pairs"] == 4


def test_lab_stage_sections(lab):
    _, report = lab
    for split in (HELD_OUT_INSTRUCTION, HELD_OUT_VOICE):
        s = report["stage1"][split]  # "model" is the curve point of the lab's recorded mapper sampling
        for name in ("mean", "oracle", "model", "model_one_draw", "model_mean", "timbre_oracle"):
            for k in (name, name + ".spk", name + ".xvec"):
                assert -1 <= s[k]["value"] <= 1 and s[k]["ci"][0] <= s[k]["value"] <= s[k]["ci"][1] and s[k]["n"] > 0
            # AvgCos is the mean of the two vectors' cosines, clip by clip
            assert s[name]["value"] == pytest.approx((s[name + ".spk"]["value"] + s[name + ".xvec"]["value"]) / 2)
        assert s["oracle_minus_mean"] == pytest.approx(s["oracle"]["value"] - s["mean"]["value"])
        for v in ("spk", "xvec"):
            assert s[f"gap_closed.{v}"] == pytest.approx(gap_closed(s[f"mean.{v}"]["value"], s[f"oracle.{v}"]["value"],
                                                                    s[f"model.{v}"]["value"]), nan_ok=True)
        # the lab records its draw count in the mapper, and "model" is exactly that curve point
        points = {c["point"]: c for c in s["curve"]}
        assert len(points) == len(SAMPLING_CURVE)
        chosen = points[f"T={report['config']['mapper_temperature']:g} K={report['config']['mapper_draws']}"]
        assert chosen["avg"] == pytest.approx(s["model"]["value"])
        assert chosen["spk"] == pytest.approx(s["model.spk"]["value"])
        # the mean of the mapper's draws is closer to the targets on average than one draw (cosine is concave
        # along a sphere's chords; it holds clip by clip only in expectation, so on the mean over clips)
        assert s["model_mean"]["value"] >= s["model_one_draw"]["value"] - 0.01
    curve = report["stage2"]["curve"]
    assert [p["step"] for p in curve] == [6, 12]
    for p in curve:  # fresh T3 over a ~1k-token vocabulary: CE well above 0, finite
        for k in ("train_rows", HELD_OUT_INSTRUCTION, HELD_OUT_VOICE):
            assert 0 < p[k] < 20, (p, k)
    assert curve[-1]["train_rows"] < curve[0]["train_rows"]  # 12 steps lower the loss on the training clips
    assert {t["target"].split(":")[0] for t in report["targets"]} >= {"pitch", "rate", "loudness"}


# ---- settings: presets, ablations, flags, --set (pure) ----------------------------------------------------------
def _lab_cfg(*argv: str):
    from instruct_tts.cli import build_parser
    from instruct_tts.options import command_options, lab_config

    return lab_config(command_options(build_parser().parse_args(["lab", *argv])))


def test_lab_set_types_each_field_and_old_flags_still_set_theirs():
    cfg = _lab_cfg("--preset", "tiny", "--set", "sweep_clips=5", "--set", "stage2_lr=1e-3", "--set",
                   "guidance_sweep=0,2.5", "--set", "repetition_penalty=none", "--repetition-sweep", "",
                   "--instruction-dropout", "0.25", "--n-clips", "200")
    assert (cfg.sweep_clips, cfg.stage2_lr, cfg.guidance_sweep, cfg.repetition_sweep) == (5, 1e-3, (0.0, 2.5), ())
    assert cfg.repetition_penalty is None and cfg.instruction_dropout == 0.25 and cfg.n_clips == 200
    assert cfg.t3 == "tiny" and cfg.loss_clips == 12  # the rest: the preset's
    assert _lab_cfg("--set", "sweep_clips=5", "--sweep-clips", "6").sweep_clips == 6  # the last one given


@pytest.mark.parametrize("argv, says", [
    (["--set", "no_such_field=1"], ["no_such_field", "sweep_clips", "stage2_lr"]),  # names the valid fields
    (["--set", "sweep_clips=many"], ["sweep_clips", "an integer"]),
    (["--set", "guidance_sweep=0,x"], ["guidance_sweep", "comma-separated"]),
    (["--set", "n_clips=5"], ["n_clips", "--n-clips"]),  # a field with a flag of its own is set by the flag
    (["--set", "sweep_clips"], ["FIELD=VALUE"]),
])
def test_lab_set_refuses_what_is_not_a_typed_field_naming_it(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        _lab_cfg(*argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and all(s in err for s in says), err


def test_lab_deployment_settings_take_json_values_and_are_checked_the_same_way():
    from instruct_tts.options import lab_config, stage_options

    cfg = lab_config(stage_options("lab", preset="tiny", ablation=["no-prompt-rows"],
                                   settings={"guidance_sweep": [0, 1.5, 3], "sweep_clips": 7,
                                             "instruction_guidance": None}))
    assert (cfg.guidance_sweep, cfg.sweep_clips, cfg.prompt_instruction_prob) == ((0.0, 1.5, 3.0), 7, 0.0)
    assert cfg.instruction_guidance is None  # --set may give back None where the preset pinned a value
    with pytest.raises(ValueError, match="sweep_clips.*an integer"):
        lab_config(stage_options("lab", settings={"sweep_clips": 7.5}))


def test_lab_help_hides_old_flags_and_lists_every_set_field_with_its_default():
    from dataclasses import fields

    from instruct_tts.cli import build_parser
    from instruct_tts.lab import LabConfig
    from instruct_tts.options import subcommand

    lab = subcommand(build_parser(), "lab")
    text = lab.format_help()
    assert "--guidance-sweep" not in text and "--instruction-dropout" not in text and "--set FIELD=VALUE" in text
    flagged = {a.dest for a in lab._actions}
    compact = " ".join(text.split()).replace("- ", "-")  # argparse wraps lines, also at hyphens
    for f in fields(LabConfig):
        assert f.name in flagged or f"{f.name}=" in compact, f.name
    assert "stage1_batch_size=64 (tiny: 32)" in compact
    assert "--draws" not in subcommand(build_parser(), "train-stage1").format_help()


def test_lab_ablations_take_out_one_ingredient_over_any_preset():
    from instruct_tts.lab import ABLATIONS, LabConfig

    c1 = _lab_cfg("--preset", "tiny", "--ablation", "one-caption")
    assert (c1.captions_per_clip, c1.repetition_sweep, c1.guidance_sweep, c1.n_clips) == (1, (), (), 96)
    both = _lab_cfg("--ablation", "no-prompt-rows", "--ablation", "no-null-instruction")
    assert (both.prompt_instruction_prob, both.instruction_dropout, both.guidance_sweep) == (0.0, 0.0, ())
    assert both.sampling().instruction_guidance == 0.0  # no null instruction: unguided, as run_lab requires
    for name, values in ABLATIONS.items():
        cfg = LabConfig.preset("default", ablations=[name])
        assert all(getattr(cfg, k) == v for k, v in values.items()) and cfg != LabConfig.preset("default"), name


def test_same_run_fields_are_every_field_but_the_named_exceptions():
    from dataclasses import fields

    from instruct_tts.lab import LabConfig
    from instruct_tts.lab.config import NOT_RUN_IDENTITY, same_run_fields

    names = [f.name for f in fields(LabConfig)]
    assert NOT_RUN_IDENTITY <= set(names)
    assert list(same_run_fields()) == [n for n in names if n not in NOT_RUN_IDENTITY]
    assert {"eval_clips", "loss_clips", "max_new_tokens", "curve_points", "mapper_draws"} <= set(same_run_fields())


# ---- instruction-embedding probe (pure) -------------------------------------------------------------------------
def test_probe_reads_levels_along_the_direction_that_carries_them_and_nothing_from_noise():
    from tts_core.evaluation.directions import direction_accuracy
    from tts_core.evaluation.instruction_probe import fit_level_probes, probe_scores

    rng = np.random.default_rng(0)
    rates = np.array(["slow", "normal", "fast"])[rng.integers(0, 3, 600)]
    signal = np.select([rates == "slow", rates == "fast"], [-1.0, 1.0], 0.0)
    emb = rng.normal(size=(600, 16))
    emb[:, 3] += 2 * signal  # dimension 3 carries rate; nothing carries loudness
    levels = [{"rate": r, "loudness": "loud" if i % 2 else "quiet", "pitch": None} for i, r in enumerate(rates)]
    probes = fit_level_probes(emb[:400], levels[:400])
    assert set(probes) == {"rate", "loudness"}  # pitch: no level in the training texts, no probe
    scores = probe_scores(probes, emb[400:])
    assert np.isnan(scores["pitch"]).all()
    rate_acc, n = direction_accuracy(scores["rate"], rates[400:], "slow", "fast")
    assert rate_acc > 0.95 and n > 1000
    loud = [lv["loudness"] for lv in levels[400:]]
    loud_acc, _ = direction_accuracy(scores["loudness"], loud, "quiet", "loud")
    assert abs(loud_acc - 0.5) < 0.1  # fitted on noise: chance on new rows


def test_lab_runs_over_another_text_encoder(lab, tmp_path):
    """`instruct-tts lab --text-encoder DIR` (flan-t5-large in production; here a tiny random T5 in its format):
    both caches hold its states, both stages and the probe run over its hidden size, and the report is written."""
    import shutil

    from cache.reader import CacheReader
    from instruct_tts.lab import LabConfig, run_lab
    from text_encoder_files import write_tiny_t5_dir
    from tts_core.stage1.artifacts import load_mapper

    first, _ = lab
    t5 = tmp_path / "t5"
    write_tiny_t5_dir(t5)
    out = tmp_path / "lab"
    shutil.copytree(first / "corpus", out / "corpus")  # the same corpus: reused, not regenerated
    no_sweeps = dict(repetition_sweep=(), guidance_sweep=(), reference_guidance_sweep=())  # the first lab ran them
    report = run_lab(LabConfig.preset("tiny", out=out, text_encoder=str(t5), **no_sweeps), say=lambda s: None)
    for store in ("train.zarr", "all.zarr"):
        reader = CacheReader(str(out / "cache" / store))
        assert reader.text_hidden_size == 32 and reader.identities["text_encoder"].name == f"t5:{t5.name}"
    encoder, _, _ = load_mapper(out / "runs" / "mapper")
    assert encoder.hidden_size == 32
    assert {r["source"] for r in report["by_wording"]} == {"model", "instruction-embedding probe"}
    assert (out / "report.md").stat().st_size > 0


def test_lab_guides_with_the_runs_default_and_refuses_guidance_without_a_null_instruction(tmp_path):
    """The lab renders at the W synthesis would use (`INSTRUCTION_GUIDANCE` with stage 2's null instruction, 0
    without one), and a guided setting with ``instruction_dropout`` 0 is refused before anything is written."""
    from instruct_tts.lab import LabConfig, run_lab
    from tts_core.sampling_defaults import INSTRUCTION_GUIDANCE

    assert LabConfig().sampling().instruction_guidance == INSTRUCTION_GUIDANCE
    assert LabConfig(instruction_dropout=0.0).sampling().instruction_guidance == 0.0
    assert LabConfig(instruction_guidance=1.5).sampling().instruction_guidance == 1.5
    for cfg in (LabConfig(out=tmp_path / "a", instruction_dropout=0.0),  # the default sweep guides (W 1.5, 3)
                LabConfig(out=tmp_path / "b", instruction_dropout=0.0, instruction_guidance=2.0, guidance_sweep=())):
        with pytest.raises(ValueError, match="--instruction-dropout is 0"):
            run_lab(cfg)
    assert not any(tmp_path.iterdir())
