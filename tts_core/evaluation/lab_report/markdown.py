"""report.md: the lab report as markdown (``r``: what `instruct_tts.lab` writes to report.json), one function
per section, in the report's order."""
from __future__ import annotations

import math

from tts_core.evaluation.held_out import VECTORS
from tts_core.evaluation.lab_report.scores import BY_WORDING, LAB_ATTRIBUTES, PROBE, TARGET_ATTRIBUTES, VOICE_COSINE
from tts_core.evaluation.lab_report.targets import VECTOR_NAMES
from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION, HELD_OUT_VOICE

SPLIT_TITLES = {HELD_OUT_INSTRUCTION: "held-out instructions", HELD_OUT_VOICE: "held-out voices"}
SWEEP_TITLES = {"repetition_penalty": "repetition penalty", "instruction_guidance": "instruction guidance W",
                "reference_guidance": "instruction guidance W with a reference clip"}


def fmt(x, nd: int = 3) -> str:
    """A number as the report prints it ("—" for none / not finite)."""
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def fmt_ci(ci) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci and ci[0] is not None else "—"


def _measured(row: dict) -> str:
    return f"{row['measured']}/{row['clips']}" if "clips" in row else "—"


def to_markdown(r: dict) -> str:
    """The report (``r``: what `instruct_tts.lab` writes to report.json)."""
    sections = (_targets_lines, _attribute_lines, _by_wording_lines, _reference_voice_lines, _sampling_lines,
                _stage1_lines, caption_lines, _stage2_lines, _profile_lines)
    return "\n".join(line for section in sections for line in section(r)) + "\n"


def _targets_lines(r: dict) -> list[str]:
    """Title, corpus, split and wall time; the targets table."""
    cfg, counts = r["config"], r["split_counts"]
    lines = [f"# Instruction-following lab — {cfg['out']}", "",
             f"Corpus: {r['corpus']['n_clips']} clips, {r['corpus']['n_voices']} voices "
             f"({r['corpus']['n_espeak_voices']} espeak voices); split: " +
             ", ".join(f"{k} {v}" for k, v in counts.items()) + f". Wall time {r['wall_s'] / 60:.1f} min "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in r['step_seconds'].items())}; this invocation: a step reused "
             "or resumed from an earlier run counts only what it did now).", "",
             "## Targets (issues #10, #19, #23, #29)", "", "| target | value | met |", "|---|---|---|"]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {fmt(t['value'])} | {'yes' if t['met'] else '**no**'} |")
    return lines


def _attribute_lines(r: dict) -> list[str]:
    """Direction accuracy: one table per attribute."""
    cfg = r["config"]
    lines = ["", "## Direction accuracy per attribute", "",
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
                         f"{fmt(row['accuracy'])} | {fmt_ci(row['ci'])} | {row['pairs'] if row['pairs'] else '—'} | "
                         f"{_measured(row)} |")
        lines.append("")
    return lines


def _by_wording_lines(r: dict) -> list[str]:
    """Held-out instructions by wording, and held-out voices: the model beside the instruction-embedding probe."""
    if not r.get("by_wording"):
        return []
    lines = ["### held-out instructions by wording, and held-out voices: the model beside what the instruction "
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
                    f"{fmt(cells[a]['accuracy'])} {fmt_ci(cells[a]['ci'])} ({cells[a]['pairs'] or 0} pairs)"
                    for a in TARGET_ATTRIBUTES) + " |")
    lines.append("")
    return lines


def _reference_voice_lines(r: dict) -> list[str]:
    """Held-out voices: the VoiceEncoder cosine of each rendering to the reference clip."""
    if not r.get("reference_voice"):
        return []
    lines = ["### held-out voices: is the cloned voice kept?", "",
             "VoiceEncoder cosine of each rendering to the reference clip the *reference clip + instruction* row "
             "was given (another clip of the same unseen voice). Ground truth is the ceiling (the voice's own "
             "other clip); the instruction-only model, which never heard the reference, is the baseline.", "",
             "| rendering | cosine to the reference | clips |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(s['value'])} {fmt_ci(s['ci'])} | {s['n']} |" for name, s in r["reference_voice"].items()]
    lines.append("")
    return lines


def _stage1_lines(r: dict) -> list[str]:
    """Stage 1: AvgCos and each vector's cosine against the baselines; the sampling curve."""
    lines = ["## Stage 1 (instruction → voice vectors) on held-out clips", "",
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
            cell = lambda k: f"{fmt(s[k + sfx]['value'])} {fmt_ci(s[k + sfx]['ci'])}" if k + sfx in s else "—"
            lines.append(f"| {SPLIT_TITLES.get(split, split)} | {cell('mean')} | {cell('oracle')} | {cell('model')} | "
                         f"{fmt(s.get('oracle_minus_mean' + sfx))} | {fmt(s.get('gap_closed' + sfx, math.nan) * 100, 0)}% "
                         f"| {cell('model_one_draw')} | {cell('model_mean')} | {cell('timbre_oracle')} | "
                         f"{s['mean' + sfx]['n']} |")
        lines.append("")
    for split, s in r["stage1"].items():
        if s.get("curve"):
            lines += [f"Sampling curve, {SPLIT_TITLES.get(split, split)}: temperature T of the start noise and K draws "
                      "averaged (gap closed = share of the mean → oracle gap).", "",
                      "| point | SpkCos | XVecCos | AvgCos | gap closed: SpkCos | XVecCos | AvgCos |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {c['point']} | {fmt(c['spk'])} | {fmt(c['xvec'])} | {fmt(c['avg'])} | "
                      f"{fmt(c.get('gap_closed.spk', math.nan) * 100, 0)}% | "
                      f"{fmt(c.get('gap_closed.xvec', math.nan) * 100, 0)}% | "
                      f"{fmt(c.get('gap_closed', math.nan) * 100, 0)}% |" for c in s["curve"]]
            lines.append("")
    return lines


def _stage2_lines(r: dict) -> list[str]:
    """Stage 2's loss curve, the plots, and the closing notes."""
    st2 = r["stage2"]
    lines = ["", "## Stage 2 (T3): training vs held-out speech loss", "",
             "Teacher-forced speech-token cross-entropy on instruction-only rows (mapper embedding, no audio prompt, "
             "dropout off) of each kept checkpoint, on held-out clips and on as many training clips; the training "
             "loss column is the loop's own (mixed instruction/audio rows, dropout on). A held-out loss far above "
             "the training-clip loss is memorisation.", "",
             "| step | training loss (loop, speech) | training clips | held-out instructions | held-out voices |",
             "|---|---|---|---|---|"]
    for p in st2["curve"]:
        lines.append(f"| {p['step']} | {fmt(p.get('train_loop_speech'))} | {fmt(p.get('train_rows'))} | "
                     f"{fmt(p.get(HELD_OUT_INSTRUCTION))} | {fmt(p.get(HELD_OUT_VOICE))} |")
    lines += ["", "Plots: `attributes.png` (accuracies with intervals), `stage2_loss.png` (curves), "
              "`measurements.png` (measured values by asked level).", "", "## Reading it", ""]
    lines += [f"- {n}" for n in r["notes"]]
    return lines


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
             + f", instruction guidance W = {main.get('instruction_guidance', 0.0)}"
             + (f" ({smp['reference_instruction_guidance']} with a reference clip)"
                if smp.get("reference_instruction_guidance") is not None else "")
             + "; other options the official defaults.", ""]
    for opt, rows in smp.get("sweeps", {}).items():
        attrs = list(LAB_ATTRIBUTES) + ([VOICE_COSINE] if any(r["attribute"] == VOICE_COSINE for r in rows) else [])
        what = ("The model with the same voice's other clip as the reference *and* the instruction (held-out voices), "
                "re-rendered at each W on the same clips, references and seeds (the first `sweep_clips` of the "
                "evaluation clips); everything else as above. Direction accuracy [95% CI] (pairs); voice cosine: "
                "mean VoiceEncoder cosine to the reference [95% CI] (clips; ground truth's is in 'is the cloned voice kept?')."
                if opt == "reference_guidance" else
                "The model from the instruction alone, re-rendered at each value on the same held-out clips and "
                "seeds (the first `sweep_clips` of each split's evaluation clips); everything else as above. "
                "Direction accuracy [95% CI] (pairs).")
        lines += [f"### accuracy vs {SWEEP_TITLES.get(opt, opt)}", "", what, "",
                  "| split | " + SWEEP_TITLES.get(opt, opt) + " | " + " | ".join(attrs) + " |",
                  "|---|---|" + "---|" * len(attrs)]
        keys = sorted({(row["split"], row["value"]) for row in rows}, key=lambda k: (k[0], k[1]))
        for split, value in keys:
            cells = {row["attribute"]: row for row in rows if row["split"] == split and row["value"] == value}
            lines.append(f"| {SPLIT_TITLES.get(split, split)} | {value:g} | " + " | ".join(
                f"{fmt(cells[a]['accuracy'])} {fmt_ci(cells[a]['ci'])} ({cells[a]['pairs'] or 0})" if a in cells else "—"
                for a in attrs) + " |")
        lines.append("")
    return lines


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
            lines.append(f"| {key.replace('_', ' ')} | {fmt(cmp['this'][key])} | {fmt(cmp['other'].get(key))} |")
    return lines


def _profile_lines(r: dict) -> list[str]:
    """Where this invocation's wall time went: each step, and inside it what the lab timed (caches per store,
    stage 2's steps vs its set-up, each evaluation measurement)."""
    steps, prof = r.get("step_seconds") or {}, r.get("profile") or {}
    if not steps:
        return []
    lines = ["", "## Profile", "", "Wall seconds of this invocation (a step reused or resumed counts only what it did "
             "now).", "", "| step | part | seconds |", "|---|---|---|"]
    for step, total in steps.items():
        lines.append(f"| {step} | (all) | {total:.0f} |")
        for part, v in (prof.get(step) or {}).items():
            if part == "s_per_step":
                lines.append(f"| {step} | seconds per step | {v:.3f} |")
            else:
                lines.append(f"| {step} | {part} | {v:.0f} |")
    return lines
