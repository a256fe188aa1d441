"""The report's closing section, "Reading it": plain statements about what the numbers show — which targets are
not met and why (a ceiling below the bar, the instruction embedding below it, a loss curve still falling or turned
up, an oracle too close to the mean, unseen wording) — never a silently lowered bar."""
from __future__ import annotations

import math

import numpy as np

from tts_core.evaluation.held_out import VECTORS
from tts_core.evaluation.lab_report.markdown import fmt
from tts_core.evaluation.lab_report.scores import LAB_ATTRIBUTES, PROBE, TARGET_ATTRIBUTES, WORDINGS, find_row
from tts_core.evaluation.lab_report.targets import MODEL_MIN, ORACLE_GAP_MIN, VECTOR_NAMES, VOCODER_CEILING_MIN
from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION


def notes(r: dict) -> list[str]:
    """Plain statements about what the numbers show, for the closing section (no silent lowering of bars)."""
    unmet = [t["target"] for t in r["targets"] if not t["met"]]
    bw = {(row.get("source", "model"), row["wording"], row["attribute"]): row["accuracy"]
          for row in r.get("by_wording", [])}  # (source, wording, attribute) -> accuracy
    out = ["All targets met." if not unmet else f"Not met: {'; '.join(unmet)}."]
    return out + _attribute_notes(r, bw) + _wording_notes(bw) + _stage_notes(r)


def _attribute_notes(r: dict, bw: dict) -> list[str]:
    """Per target attribute on held-out instructions: what limits the model (ceiling, probe, or the T3)."""
    out = []
    for attr in TARGET_ATTRIBUTES:
        t = r["tables"].get(attr, [])
        voc, model = (find_row(t, HELD_OUT_INSTRUCTION, n) for n in ("ground-truth tokens -> vocoder", "model"))
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
    return out


def _wording_notes(bw: dict) -> list[str]:
    """Known words vs unseen words: the model, and what the instruction embedding carries."""
    out = []
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
    return out


def _stage_notes(r: dict) -> list[str]:
    """The stage-2 held-out loss curve; stage 1 against the mean vector and the oracle."""
    out = []
    curve = r["stage2"]["curve"]
    if len(curve) >= 2 and curve[-1].get(HELD_OUT_INSTRUCTION) is not None:
        ho = [p[HELD_OUT_INSTRUCTION] for p in curve if p.get(HELD_OUT_INSTRUCTION) is not None]
        best = int(np.nanargmin(ho))
        tr = curve[-1].get("train_rows")
        out.append(f"Stage 2 held-out speech loss {ho[0]:.3f} → {ho[-1]:.3f} (lowest {ho[best]:.3f} at step "
                   f"{curve[best]['step']}); on training clips {fmt(tr)} at the end"
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
