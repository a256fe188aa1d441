"""The lab report: tables from the lab's measurements, the targets checked, markdown + JSON + plots.

Pure functions of the numbers `instruct_tts.lab` collects (no model is run here):

* `attribute_tables`: per attribute, one row per (held-out split, rendering) — ground-truth audio, ground-truth
  tokens through the embedded vocoder, the model, the "instruction ignored" baseline (the model's own outputs
  scored against shuffled instructions) and chance — with direction accuracy, pairs and a bootstrap 95% CI;
* `stage1_section`: mean-vector baseline, gender+pitch oracle and model AvgCos with intervals, % of gap closed;
* `targets`: issue #10's bars, each met or not, with the number it was judged on;
* `to_markdown`, `plot_*`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tts_core.evaluation.directions import ATTRIBUTES
from tts_core.evaluation.lab import CURVE_PREFIX, VECTORS
from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION, HELD_OUT_VOICE
from tts_core.evaluation.stats import direction_ci, gap_closed, mean_ci, shuffled_direction_accuracy

# attribute -> (measurement, level asking for less, for more); gender is read from F0 (male < female)
LAB_ATTRIBUTES = {**ATTRIBUTES, "gender": ("f0_hz", "male", "female")}
GROUPED_BY_GENDER = ("pitch",)
WITH_REFERENCE = "model, reference clip of the voice + instruction"
RENDERINGS = ("ground truth audio", "ground-truth tokens -> vocoder", "model", WITH_REFERENCE)
IGNORED = "instruction ignored (model outputs, shuffled instructions)"
SPLIT_TITLES = {HELD_OUT_INSTRUCTION: "held-out instructions", HELD_OUT_VOICE: "held-out voices"}
# issue #10's bars
GT_CEILING_MIN, VOCODER_CEILING_MIN, MODEL_MIN, MODEL_MIN_PAIRS = 0.98, 0.95, 0.9, 100
ORACLE_GAP_MIN, GAP_CLOSED_MIN = 0.10, 0.70
GAP_CLOSED_PER_VECTOR_MIN = 0.50  # issue #19: what stage 2 and synthesis receive closes half the gap, per vector
# issue #23's bars: known words, the T3 reaching what the embedding carries, held-out voices, clone-and-steer
KNOWN_WORDS_MIN, PROBE_SLACK, PROBE_WEAK, VOICES_MIN, REFERENCE_MIN = 0.95, 0.03, 0.9, 0.95, 0.85
REFERENCE_ATTRIBUTES = ("rate", "loudness")
VECTOR_NAMES = {"spk": "SpkCos", "xvec": "XVecCos"}
TARGET_ATTRIBUTES = ("pitch", "rate", "loudness")


def _score(rows: list[dict], attr: str, n_boot: int, seed: int, shuffled: bool = False) -> dict:
    col, low, high = LAB_ATTRIBUTES[attr]
    groups = [r.get("gender") for r in rows] if attr in GROUPED_BY_GENDER else None
    args = ([r.get(col, math.nan) for r in rows], [r.get(attr) for r in rows], low, high, groups)
    asked = [r for r in rows if r.get(attr) in (low, high)]
    counts = {"clips": len(asked), "measured": sum(math.isfinite(r.get(col, math.nan)) for r in asked)}
    if shuffled:
        return {**shuffled_direction_accuracy(*args, seed=seed), **counts}
    return {**direction_ci(*args, n_boot=n_boot, seed=seed), **counts}


def attribute_tables(renderings: dict[str, dict[str, list[dict]]], n_boot: int = 1000, seed: int = 0
                     ) -> dict[str, list[dict]]:
    """``renderings[split][rendering]`` = attribute rows (levels + measurements) → {attribute: table rows}."""
    out: dict[str, list[dict]] = {}
    for attr in LAB_ATTRIBUTES:
        table = []
        for split, by_name in renderings.items():
            for name in RENDERINGS:
                if name in by_name:
                    table.append({"split": split, "rendering": name, **_score(by_name[name], attr, n_boot, seed)})
            if "model" in by_name:
                table.append({"split": split, "rendering": IGNORED,
                              **_score(by_name["model"], attr, n_boot, seed, shuffled=True)})
            table.append({"split": split, "rendering": "chance", "accuracy": 0.5, "pairs": None, "ci": [0.5, 0.5]})
        out[attr] = table  # a rendering without pairs stays, with accuracy NaN: "nothing measurable" is a result
    return out


WORDINGS = {"train": "training wording (new texts, known words)", "held_out": "held-out wording (words no training text has)"}
VOICES = "voices"  # the held-out voices' own instructions (any wording): a row of the same table
BY_WORDING = {"all": "all held-out instructions", **WORDINGS, VOICES: "held-out voices (their instructions)"}
PROBE = "instruction-embedding probe"


def wording_section(renderings: dict[str, dict[str, list[dict]]], probe: dict[str, list[dict]] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Held-out instructions by wording (and the held-out voices' instructions), the model beside the
    instruction-embedding probe (`tts_core.evaluation.instruction_probe`) on the same clips: how much of a miss is
    unseen *words* that the frozen text encoder + stage-1 pooling does not carry (the probe misses too) rather than
    the T3 (it does not)."""
    out = []
    for wording in BY_WORDING:
        split = HELD_OUT_VOICE if wording == VOICES else HELD_OUT_INSTRUCTION
        sources = {"model": renderings.get(split, {}).get("model", []), PROBE: (probe or {}).get(split, [])}
        for source, rows in sources.items():
            chosen = [r for r in rows if wording in ("all", VOICES) or r.get("wording") == wording]
            if chosen:
                out += [{"source": source, "wording": wording, "attribute": attr, **_score(chosen, attr, n_boot, seed)}
                        for attr in TARGET_ATTRIBUTES]
    return out


def reference_voice(renderings: dict[str, dict[str, list[dict]]], n_boot: int = 1000, seed: int = 0) -> dict:
    """{rendering: mean_ci} of the VoiceEncoder cosine to the reference clip, on held-out voices: is the cloned
    voice kept while the instruction steers it (ground truth: the same voice, another clip — the ceiling; the
    instruction-only model, which never heard the reference — the baseline)."""
    rows = renderings.get(HELD_OUT_VOICE, {})
    return {name: mean_ci([r["ref_spk_cos"] for r in rows[name] if "ref_spk_cos" in r], n_boot, seed)
            for name in RENDERINGS if name in rows and any("ref_spk_cos" in r for r in rows[name])}


SWEEP_TITLES = {"repetition_penalty": "repetition penalty", "instruction_guidance": "instruction guidance W"}


def sweep_section(sweeps: dict[str, dict[float, dict[str, list[dict]]]], n_boot: int = 1000, seed: int = 0
                  ) -> dict[str, list[dict]]:
    """``sweeps[option][value][split]`` = the model's attribute rows at that sampling value → {option: rows of
    {value, split, attribute, accuracy, ci, pairs, clips, measured}}: accuracy against the option, per split."""
    return {opt: [{"value": float(v), "split": split, "attribute": attr, **_score(rows, attr, n_boot, seed)}
                  for v, by_split in by_value.items() for split, rows in by_split.items() for attr in LAB_ATTRIBUTES]
            for opt, by_value in sweeps.items()}


def _sampling_lines(r: dict) -> list[str]:
    """The sampling the model rows used, and the "accuracy vs option" tables of the sweeps (if run)."""
    smp = r.get("sampling")
    if not smp:
        return []
    main = smp["main"]
    lines = ["## Sampling", "",
             "Model renderings: repetition penalty " + ("the family's official value (1.2)"
                                                         if main.get("repetition_penalty") is None
                                                         else f"{main['repetition_penalty']}")
             + f", instruction guidance W = {main.get('instruction_guidance', 0.0)}; other options the official "
               "defaults.", ""]
    for opt, rows in smp.get("sweeps", {}).items():
        attrs = list(LAB_ATTRIBUTES)
        lines += [f"### accuracy vs {SWEEP_TITLES.get(opt, opt)}", "",
                  "The model from the instruction alone, re-rendered at each value on the same held-out clips and "
                  "seeds (the first `sweep_clips` of each split's evaluation clips); everything else as above. "
                  "Direction accuracy [95% CI] (pairs).", "",
                  "| split | " + SWEEP_TITLES.get(opt, opt) + " | " + " | ".join(attrs) + " |",
                  "|---|---|" + "---|" * len(attrs)]
        keys = sorted({(row["split"], row["value"]) for row in rows}, key=lambda k: (k[0], k[1]))
        for split, value in keys:
            cells = {row["attribute"]: row for row in rows if row["split"] == split and row["value"] == value}
            lines.append(f"| {SPLIT_TITLES.get(split, split)} | {value:g} | " + " | ".join(
                f"{_f(cells[a]['accuracy'])} {_ci(cells[a]['ci'])} ({cells[a]['pairs'] or 0})" if a in cells else "—"
                for a in attrs) + " |")
        lines.append("")
    return lines


def stage1_section(cosines: dict[str, dict[str, np.ndarray]], n_boot: int = 1000, seed: int = 0) -> dict:
    """``cosines[split]`` = `lab.stage1_cosines` output → {split: {name: mean_ci} for every name there, plus
    "oracle_minus_mean", "gap_closed" (AvgCos) and per vector v in spk/xvec "oracle_minus_mean.v", "gap_closed.v";
    "curve": one row per sampling point with its SpkCos / XVecCos / AvgCos and gaps closed}."""
    out = {}
    for split, c in cosines.items():
        s = {k: mean_ci(v, n_boot, seed) for k, v in c.items()}

        def gaps(name: str) -> dict:
            return {("gap_closed" + sfx): gap_closed(s["mean" + sfx]["value"], s["oracle" + sfx]["value"],
                                                      s[name + sfx]["value"])
                    for sfx in ("", *(f".{v}" for v in VECTORS)) if name + sfx in s}

        for sfx in ("", *(f".{v}" for v in VECTORS)):
            if "mean" + sfx in s:
                s["oracle_minus_mean" + sfx] = s["oracle" + sfx]["value"] - s["mean" + sfx]["value"]
        s.update(gaps("model"))
        s["curve"] = [{"point": k[len(CURVE_PREFIX):], "avg": s[k]["value"],
                       **{v: s[f"{k}.{v}"]["value"] for v in VECTORS}, **gaps(k)}
                      for k in c if k.startswith(CURVE_PREFIX) and not k.endswith(tuple(f".{v}" for v in VECTORS))]
        out[split] = s
    return out


def _find(table: list[dict], split: str, rendering: str) -> dict | None:
    return next((r for r in table if r["split"] == split and r["rendering"] == rendering), None)


def targets(tables: dict[str, list[dict]], stage1: dict, by_wording: list[dict] | None = None) -> list[dict]:
    """Issues #10, #19 and #23's targets: {"target", "value", "met"} each (value None when it could not be
    measured). #23's "model ≥ probe − 0.03" rows carry model − probe as their value."""
    out = []

    def add(name: str, value: float | None, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "met": bool(ok) if ok is not None else False})

    s1 = stage1.get(HELD_OUT_INSTRUCTION)
    if s1:
        add(f"corpus: oracle − mean AvgCos ≥ {ORACLE_GAP_MIN:.2f} (held-out instructions)", s1["oracle_minus_mean"],
            s1["oracle_minus_mean"] >= ORACLE_GAP_MIN)
        g = s1["gap_closed"]
        add(f"stage 1 closes ≥ {GAP_CLOSED_MIN:.0%} of the mean → oracle gap (held-out instructions)", g,
            math.isfinite(g) and g >= GAP_CLOSED_MIN)
        for v in VECTORS:
            g = s1.get(f"gap_closed.{v}", math.nan)
            add(f"stage 1 closes ≥ {GAP_CLOSED_PER_VECTOR_MIN:.0%} of the mean → oracle gap in {VECTOR_NAMES[v]} "
                "(held-out instructions)", g, math.isfinite(g) and g >= GAP_CLOSED_PER_VECTOR_MIN)
    for attr in TARGET_ATTRIBUTES:
        t = tables.get(attr, [])
        for rendering, bar in (("ground truth audio", GT_CEILING_MIN), ("ground-truth tokens -> vocoder",
                                                                         VOCODER_CEILING_MIN)):
            r = _find(t, HELD_OUT_INSTRUCTION, rendering)
            add(f"{attr}: {rendering} ≥ {bar}", r and r["accuracy"], r is not None and r["accuracy"] >= bar)
        r = _find(t, HELD_OUT_INSTRUCTION, "model")
        add(f"{attr}: model ≥ {MODEL_MIN} on ≥ {MODEL_MIN_PAIRS} pairs of held-out instructions",
            r and r["accuracy"], r is not None and r["accuracy"] >= MODEL_MIN and r["pairs"] >= MODEL_MIN_PAIRS)
    bw = {(row.get("source", "model"), row["wording"], row["attribute"]): row["accuracy"] for row in by_wording or []}
    if bw:
        for attr in TARGET_ATTRIBUTES:
            v = bw.get(("model", "train", attr))
            add(f"{attr}: model ≥ {KNOWN_WORDS_MIN} on held-out instructions in the training wording (known words)",
                v, v is not None and v >= KNOWN_WORDS_MIN)
        for wording, title in BY_WORDING.items():
            for attr in TARGET_ATTRIBUTES:
                m, p = bw.get(("model", wording, attr)), bw.get((PROBE, wording, attr))
                if m is None or p is None or not (math.isfinite(m) and math.isfinite(p)):
                    continue
                weak = f" (the probe itself is {p:.3f} < {PROBE_WEAK}: the embedding limits it)" if p < PROBE_WEAK else ""
                add(f"{attr}, {title}: model ≥ probe − {PROBE_SLACK} (value: model − probe){weak}", m - p,
                    m >= p - PROBE_SLACK)
    for attr in (*TARGET_ATTRIBUTES, "gender"):
        r = _find(tables.get(attr, []), HELD_OUT_VOICE, "model")
        if r is not None:
            add(f"{attr}: model ≥ {VOICES_MIN} on held-out voices", r["accuracy"], r["accuracy"] >= VOICES_MIN)
    for attr in REFERENCE_ATTRIBUTES:
        r = _find(tables.get(attr, []), HELD_OUT_VOICE, WITH_REFERENCE)
        if r is not None:
            add(f"{attr}: reference clip + instruction ≥ {REFERENCE_MIN} on held-out voices", r["accuracy"],
                r["accuracy"] >= REFERENCE_MIN)
    return out


# What must match for two lab runs to compare captions per clip: same clips, same steps.
SAME_RUN_KEYS = ("n_clips", "seed", "held_out_wording", "held_out_voice_frac", "held_out_instruction_frac",
                 "stage1_steps", "stage1_batch_size", "stage2_steps", "stage2_batch_size", "stage2_lr", "t3",
                 "text_encoder", "speech_tokenizer", "mapper_hidden_dim", "mapper_blocks", "mapper_draws",
                 "mapper_temperature", "instruction_dropout", "prompt_instruction_prob", "repetition_penalty",
                 "instruction_guidance")


def held_out_instruction_results(r: dict) -> dict:
    """Held-out-instruction results of one report: stage-1 model AvgCos, the model's direction accuracy per
    target attribute, and the last held-out speech loss."""
    s1 = r.get("stage1", {}).get(HELD_OUT_INSTRUCTION, {})
    out = {"stage1_avg_cos": s1.get("model", {}).get("value")}
    for attr in TARGET_ATTRIBUTES:
        row = _find(r.get("tables", {}).get(attr, []), HELD_OUT_INSTRUCTION, "model")
        out[f"{attr}_accuracy"] = row and row["accuracy"]
    curve = r.get("stage2", {}).get("curve") or [{}]
    out["stage2_heldout_loss"] = curve[-1].get(HELD_OUT_INSTRUCTION)
    return out


def caption_comparison(r: dict, other: dict) -> dict:
    """This run's held-out-instruction results beside another run's (e.g. ``--captions-per-clip 1``), with the
    settings that differ other than the captions (none: same clips, same steps)."""
    a, b = r["config"], other.get("config", {})
    return {"out": b.get("out"), "captions_per_clip": b.get("captions_per_clip", 1),
            "differs": [k for k in SAME_RUN_KEYS if a.get(k) != b.get(k)],
            "this": held_out_instruction_results(r), "other": held_out_instruction_results(other)}


def caption_lines(r: dict) -> list[str]:
    """The report's captions paragraph (and comparison table when ``--compare-to`` was given)."""
    c = r.get("captions")
    if not c:
        return []
    lines = ["", "## Captions per training clip", "",
             f"Each training clip has {c['per_clip']} training-wording caption(s): {c['train_pairs']} (clip, "
             f"instruction) pairs over {c['train_clips']} clips, {c['train_instructions']} unique instructions "
             "(each audio encoded once; stages draw one caption per clip). Compare with a run of "
             "`--captions-per-clip 1` (same clips, same steps) through `--compare-to`."]
    cmp = r.get("compare_to")
    if cmp:
        k = cmp["captions_per_clip"]
        lines += ["", f"Held-out instructions, this run ({c['per_clip']} captions per clip) vs `{cmp['out']}` "
                      f"({k} caption(s) per clip)" + (f" — **not comparable, differs in {', '.join(cmp['differs'])}**"
                                                     if cmp["differs"] else " — same clips, same steps") + ":", "",
                  f"| measure | {c['per_clip']} per clip | {k} per clip |", "|---|---|---|"]
        for key in cmp["this"]:
            lines.append(f"| {key.replace('_', ' ')} | {_f(cmp['this'][key])} | {_f(cmp['other'].get(key))} |")
    return lines


def _f(x, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _measured(row: dict) -> str:
    return f"{row['measured']}/{row['clips']}" if "clips" in row else "—"


def _ci(ci) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]" if ci and ci[0] is not None else "—"


def to_markdown(r: dict) -> str:
    """The report (``r``: what `instruct_tts.lab` writes to report.json)."""
    cfg, counts = r["config"], r["split_counts"]
    lines = [f"# Instruction-following lab — {cfg['out']}", "",
             f"Corpus: {r['corpus']['n_clips']} clips, {r['corpus']['n_voices']} voices "
             f"({r['corpus']['n_espeak_voices']} espeak voices); split: " +
             ", ".join(f"{k} {v}" for k, v in counts.items()) + f". Wall time {r['wall_s'] / 60:.1f} min "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in r['step_seconds'].items())}; this invocation: a step reused "
             "or resumed from an earlier run counts only what it did now).", "",
             "## Targets (issues #10, #19, #23)", "", "| target | value | met |", "|---|---|---|"]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {_f(t['value'])} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "## Direction accuracy per attribute", "",
              "Of all pairs of held-out clips whose instructions ask for opposite levels, the share measured in the "
              "asked order (pitch pairs within gender; gender read from F0, male < female). 95% CI: bootstrap over "
              "clips. Ceilings: the corpus audio itself, and its tokens decoded by the embedded vocoder (the best a "
              "perfect stage 2 can reach). Model: T3 synthesizing from the instruction alone. Baselines: chance, and "
              "the model's own outputs scored against shuffled instructions (its 95% band is the permutation spread). "
              "Held-out voices: clips of espeak voices no training clip has; the *model* row hears only the "
              "instruction (the voice is not an input), so it asks whether instructions written for unseen "
              "voices are followed, beside those voices' own ceilings; the *reference clip + instruction* row "
              "conditions on another clip of that unseen voice as well (the clone-and-steer path; stage 2 trains "
              "on both at once only in the share `prompt_instruction_prob` of its rows: "
              f"{cfg.get('prompt_instruction_prob') if cfg.get('prompt_instruction_prob') is not None else 0.0} "
              "here).",
              ""]
    for attr, table in r["tables"].items():
        col, low, high = LAB_ATTRIBUTES[attr]
        lines += [f"### {attr} ({low} < {high}, by {col})", "", "| split | rendering | accuracy | 95% CI | pairs | clips measured |",
                  "|---|---|---|---|---|---|"]
        for row in table:
            lines.append(f"| {SPLIT_TITLES.get(row['split'], row['split'])} | {row['rendering']} | "
                         f"{_f(row['accuracy'])} | {_ci(row['ci'])} | {row['pairs'] if row['pairs'] else '—'} | "
                         f"{_measured(row)} |")
        lines.append("")
    if r.get("by_wording"):
        lines += ["### held-out instructions by wording, and held-out voices: the model beside what the instruction "
                  "embedding carries", "",
                  f"*{PROBE}*: a linear classifier of each attribute's level, fitted on the training instructions' "
                  "stage-1 embeddings (what the T3's adapters read), scored on the same held-out clips by the same "
                  "direction accuracy (P(more) − P(less) as the measurement). Where the probe misses too, the frozen "
                  "text encoder does not carry the wording to stage 2; where only the model misses, the T3 did not "
                  "learn it.", "",
                  "| wording | what | " + " | ".join(TARGET_ATTRIBUTES) + " |", "|---|---|" + "---|" * len(TARGET_ATTRIBUTES)]
        for wording, title in BY_WORDING.items():
            for source in ("model", PROBE):
                cells = {row["attribute"]: row for row in r["by_wording"]
                         if row["wording"] == wording and row.get("source", "model") == source}
                if cells:
                    lines.append(f"| {title} | {source} | " + " | ".join(
                        f"{_f(cells[a]['accuracy'])} {_ci(cells[a]['ci'])} ({cells[a]['pairs'] or 0} pairs)"
                        for a in TARGET_ATTRIBUTES) + " |")
        lines.append("")
    if r.get("reference_voice"):
        lines += ["### held-out voices: is the cloned voice kept?", "",
                  "VoiceEncoder cosine of each rendering to the reference clip the *reference clip + instruction* row "
                  "was given (another clip of the same unseen voice). Ground truth is the ceiling (the voice's own "
                  "other clip); the instruction-only model, which never heard the reference, is the baseline.", "",
                  "| rendering | cosine to the reference | clips |", "|---|---|---|"]
        lines += [f"| {name} | {_f(s['value'])} {_ci(s['ci'])} | {s['n']} |" for name, s in r["reference_voice"].items()]
        lines.append("")
    lines += _sampling_lines(r)
    lines += ["## Stage 1 (instruction → voice vectors) on held-out clips", "",
              "Targets use the *model* column: what stage 2 and synthesis get from the mapper (its recorded temperature "
              "and draws averaged; `mapper.json`). Diagnostics beside it: one draw (the voice-variety setting), the "
              "mean of 16 draws (the mapper's conditional mean: a draw scores below it by the spread it samples), and "
              "an oracle keyed by the espeak variant (the voice's timbre file, which no instruction describes): how "
              "much of the voice vectors' variance is out of any instruction's reach.", ""]
    for sfx, title in (("", "AvgCos"), *((f".{v}", VECTOR_NAMES[v]) for v in VECTORS)):
        lines += [f"**{title}**", "",
                  "| split | mean vector | gender+pitch oracle | model | oracle − mean | gap closed | model, one draw "
                  "| model, mean of 16 draws | variant oracle (undescribed timbre) | clips |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for split, s in r["stage1"].items():
            if "mean" + sfx not in s:
                continue
            cell = lambda k: f"{_f(s[k + sfx]['value'])} {_ci(s[k + sfx]['ci'])}" if k + sfx in s else "—"
            lines.append(f"| {SPLIT_TITLES.get(split, split)} | {cell('mean')} | {cell('oracle')} | {cell('model')} | "
                         f"{_f(s.get('oracle_minus_mean' + sfx))} | {_f(s.get('gap_closed' + sfx, math.nan) * 100, 0)}% "
                         f"| {cell('model_one_draw')} | {cell('model_mean')} | {cell('timbre_oracle')} | "
                         f"{s['mean' + sfx]['n']} |")
        lines.append("")
    for split, s in r["stage1"].items():
        if s.get("curve"):
            lines += [f"Sampling curve, {SPLIT_TITLES.get(split, split)}: temperature T of the start noise and K draws "
                      "averaged (gap closed = share of the mean → oracle gap).", "",
                      "| point | SpkCos | XVecCos | AvgCos | gap closed: SpkCos | XVecCos | AvgCos |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {c['point']} | {_f(c['spk'])} | {_f(c['xvec'])} | {_f(c['avg'])} | "
                      f"{_f(c.get('gap_closed.spk', math.nan) * 100, 0)}% | "
                      f"{_f(c.get('gap_closed.xvec', math.nan) * 100, 0)}% | "
                      f"{_f(c.get('gap_closed', math.nan) * 100, 0)}% |" for c in s["curve"]]
            lines.append("")
    lines += caption_lines(r)
    st2 = r["stage2"]
    lines += ["", "## Stage 2 (T3): training vs held-out speech loss", "",
              "Teacher-forced speech-token cross-entropy on instruction-only rows (mapper embedding, no audio prompt, "
              "dropout off) of each kept checkpoint, on held-out clips and on as many training clips; the training "
              "loss column is the loop's own (mixed instruction/audio rows, dropout on). A held-out loss far above "
              "the training-clip loss is memorisation.", "",
              "| step | training loss (loop, speech) | training clips | held-out instructions | held-out voices |",
              "|---|---|---|---|---|"]
    for p in st2["curve"]:
        lines.append(f"| {p['step']} | {_f(p.get('train_loop_speech'))} | {_f(p.get('train_rows'))} | "
                     f"{_f(p.get(HELD_OUT_INSTRUCTION))} | {_f(p.get(HELD_OUT_VOICE))} |")
    lines += ["", "Plots: `attributes.png` (accuracies with intervals), `stage2_loss.png` (curves), "
              "`measurements.png` (measured values by asked level).", "", "## Reading it", ""]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def notes(r: dict) -> list[str]:
    """Plain statements about what the numbers show, for the closing section (no silent lowering of bars)."""
    out = []
    unmet = [t["target"] for t in r["targets"] if not t["met"]]
    bw = {(row.get("source", "model"), row["wording"], row["attribute"]): row["accuracy"]
          for row in r.get("by_wording", [])}  # (source, wording, attribute) -> accuracy
    out.append("All targets met." if not unmet else f"Not met: {'; '.join(unmet)}.")
    for attr in TARGET_ATTRIBUTES:
        t = r["tables"].get(attr, [])
        voc, model = (_find(t, HELD_OUT_INSTRUCTION, n) for n in ("ground-truth tokens -> vocoder", "model"))
        if voc and voc["accuracy"] < VOCODER_CEILING_MIN:
            out.append(f"{attr}: the tokens + vocoder ceiling is {voc['accuracy']:.3f} — even a perfect T3 cannot "
                       f"reach {MODEL_MIN} through this tokenizer (`speech_tokenizer` = "
                       f"{r['config']['speech_tokenizer']}); a tokenizer that keeps the attribute is needed first.")
        elif model and not model["pairs"]:
            col = LAB_ATTRIBUTES[attr][0]
            out.append(f"{attr}: no model pairs — {col} was measurable in {model['measured']} of {model['clips']} "
                       f"model clips asking for a {attr} extreme"
                       + (" (the VAD found no speech in the others: the T3's output is not yet speech-like)"
                          if col == "rate_lps" else "") + ".")
        elif model and voc and model["accuracy"] < MODEL_MIN:
            probe = bw.get((PROBE, "all", attr), math.nan)
            if probe < MODEL_MIN:
                why = (f"the instruction embedding itself limits it: even the linear probe reads only "
                       f"{probe:.3f} from it on these clips (by-wording table)")
                known_model, known_probe = (bw.get((s, "train", attr), math.nan) for s in ("model", PROBE))
                if known_model < MODEL_MIN <= known_probe:
                    why += (f"; and on known words the T3 reaches {known_model:.3f} where the probe reads "
                            f"{known_probe:.3f}, so the T3 limits it too")
            else:
                why = ("the T3 has not learned it at this size/step count" +
                       (f" (the instruction embedding carries it: probe {probe:.3f})" if math.isfinite(probe) else "") +
                       "; see the stage-2 curve (more steps while the held-out loss still falls, more data when it "
                       "has turned up)")
            out.append(f"{attr}: model {model['accuracy']:.3f} under a {voc['accuracy']:.3f} ceiling — {why}.")
    both = [a for a in TARGET_ATTRIBUTES if all(math.isfinite(bw.get(("model", w, a), math.nan)) for w in WORDINGS)]
    if both:
        out.append("Model on held-out instructions, known words in new texts vs unseen words: "
                   + ", ".join(f"{a} {bw[('model', 'train', a)]:.3f} vs {bw[('model', 'held_out', a)]:.3f}"
                               for a in both) + ".")
    probed = [a for a in TARGET_ATTRIBUTES if math.isfinite(bw.get((PROBE, "held_out", a), math.nan))]
    if probed:
        out.append("What the instruction embedding carries (linear probe fitted on the training instructions), known "
                   "vs unseen words: " + ", ".join(f"{a} {bw.get((PROBE, 'train', a), math.nan):.3f} vs "
                                                  f"{bw[(PROBE, 'held_out', a)]:.3f}" for a in probed)
                   + ". Where the unseen-word probe is far under the bar, the frozen text encoder + stage-1 pooling does "
                   "not say what the unseen words ask for, and no T3 trained on these instructions can follow them: "
                   "that part of the held-out-instruction target needs a stronger text encoder (flan-t5-large in "
                   "production) or training phrasings that cover the unseen words' meanings.")
    curve = r["stage2"]["curve"]
    if len(curve) >= 2 and curve[-1].get(HELD_OUT_INSTRUCTION) is not None:
        ho = [p[HELD_OUT_INSTRUCTION] for p in curve if p.get(HELD_OUT_INSTRUCTION) is not None]
        best = int(np.nanargmin(ho))
        tr = curve[-1].get("train_rows")
        out.append(f"Stage 2 held-out speech loss {ho[0]:.3f} → {ho[-1]:.3f} (lowest {ho[best]:.3f} at step "
                   f"{curve[best]['step']}); on training clips {_f(tr)} at the end"
                   + (" — still falling at the last checkpoint: more steps would help." if best == len(ho) - 1
                      else " — it turned up before the end: the T3 memorises; more data or fewer steps."))
    s1 = r["stage1"].get(HELD_OUT_INSTRUCTION)
    if s1 and s1["model"]["value"] < s1["mean"]["value"]:
        out.append(f"Stage 1 is below the mean-vector baseline on held-out instructions ({s1['model']['value']:.3f} vs "
                   f"{s1['mean']['value']:.3f}) after {r['config']['stage1_steps']} steps: the mapper draws a flow "
                   "sample of the voice vectors, which scores below a conditional mean when the vectors vary little "
                   "with what an instruction says (its own held-out curve: runs/mapper/report.md).")
    if s1 and s1["oracle_minus_mean"] < ORACLE_GAP_MIN:
        timbre = s1.get("timbre_oracle", {}).get("value")
        per_vector = [f"{VECTOR_NAMES[v]} {s1[f'oracle_minus_mean.{v}']:.3f}" for v in VECTORS
                      if f"oracle_minus_mean.{v}" in s1]
        short = [VECTOR_NAMES[v] for v in VECTORS if s1.get(f"oracle_minus_mean.{v}", math.inf) < ORACLE_GAP_MIN]
        out.append(f"The oracle beats the mean vector by only {s1['oracle_minus_mean']:.3f} AvgCos on held-out "
                   "instructions"
                   + (f" ({', '.join(per_vector)}; below {ORACLE_GAP_MIN:.2f}: {', '.join(short) or 'neither alone'})"
                      if per_vector else "")
                   + ": the voice vectors vary little with gender/pitch in this corpus or encoder, so "
                   "stage 1 has little to learn."
                   + (f" An oracle keyed by the espeak variant (timbre no instruction describes) beats it by "
                      f"{timbre - s1['mean']['value']:.3f}: most of what the speaker encoders see is that timbre."
                      if timbre is not None else ""))
    return out


def plot_attributes(tables: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), sharey=True)
    for ax, (attr, table) in zip(np.atleast_1d(axes), tables.items()):
        rows = [t for t in table if t["rendering"] != "chance"]
        y = [t["accuracy"] for t in rows]
        err = np.array([[t["accuracy"] - t["ci"][0], t["ci"][1] - t["accuracy"]] for t in rows]).T
        colors = ["C0" if t["split"] == HELD_OUT_INSTRUCTION else "C1" for t in rows]
        ax.bar(range(len(rows)), y, color=colors, yerr=np.nan_to_num(err), capsize=3)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.axhline(MODEL_MIN, color="green", ls="--", lw=1)
        ax.set_xticks(range(len(rows)), [t["rendering"].split(" (")[0].replace("ground-truth", "GT")
                                         .replace("ground truth", "GT") for t in rows], rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(attr)
        ax.set_ylim(0, 1.05)
    np.atleast_1d(axes)[0].set_ylabel("direction accuracy (blue: held-out instr., orange: held-out voices)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_stage2(train_log: list[dict], curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if train_log:
        ax.plot([h["step"] for h in train_log], [h["loss_speech"] for h in train_log], lw=1, alpha=0.6,
                label="training loop: speech loss")
    for key, label in (("train_rows", "training clips (teacher-forced, instruction-only)"),
                       (HELD_OUT_INSTRUCTION, "held-out instructions"), (HELD_OUT_VOICE, "held-out voices")):
        pts = [(p["step"], p[key]) for p in curve if p.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("speech-token cross-entropy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_measurements(renderings: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in RENDERINGS if any(n in v for v in renderings.values())]
    attrs = list(ATTRIBUTES)
    fig, axes = plt.subplots(len(names), len(attrs), figsize=(4 * len(attrs), 3 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        rows = [r for v in renderings.values() for r in v.get(name, [])]
        for j, attr in enumerate(attrs):
            col, low, high = ATTRIBUTES[attr]
            ax = axes[i][j]
            for x, level in enumerate((low, high)):
                ys = [r[col] for r in rows if r.get(attr) == level and np.isfinite(r.get(col, math.nan))]
                ax.scatter(np.full(len(ys), x) + np.random.default_rng(x).uniform(-0.15, 0.15, len(ys)), ys, s=6,
                           alpha=0.6)
            ax.set_xticks([0, 1], [low, high])
            ax.set_title(f"{name}: {col}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
