"""Stage 2's report: ``report.md`` (+ ``loss_curves.png``) from the run summary and the metrics rows."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from tts_core.atomic_files import atomic_write_text
from tts_core.stage2.row_mix import INSTRUCTION_ONLY_FRAC, SEGMENT_LABELS, SEGMENT_SHORT, SEGMENTS, segment_key
from tts_core.t3.config import CHATTERBOX_SPEECH_IDS
from tts_core.training import fmt as _fmt

log = logging.getLogger(__name__)


def write_report(out: Path, summary: dict, history: list[dict], plot: bool) -> None:
    png = None
    if plot and history:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            steps = [r["step"] for r in history]
            for ax, head, title in ((axes[0], "text", "text loss"), (axes[1], "speech", "speech loss")):
                for seg, style in zip(SEGMENTS, ("-", "--")):
                    ax.plot(steps, [r.get(segment_key(head, seg)) for r in history], style,
                            label=SEGMENT_SHORT[seg] + " rows")
                ax.set_title(title)
                ax.set_xlabel("step")
                ax.legend()
            axes[2].plot(steps, [r["loss"] for r in history])
            axes[2].set_title("total loss")
            axes[2].set_xlabel("step")
            fig.tight_layout()
            fig.savefig(out / "loss_curves.png", dpi=80)
            plt.close(fig)
            png = "loss_curves.png"
        except Exception as e:  # a report never fails a run
            log.warning("loss plot skipped: %s", e)
    s = summary
    lines = [
        "# Stage 2 — T3 with instruction adapters", "",
        f"- T3: `{s['t3_source']}`" + (f" — {s['t3_found']}" if s.get("t3_found") else "")
        + (f" — {s['load_report']}" if s.get("load_report") else " (fresh weights)"),
        *_speech_vocab_lines(s),
        f"- text tokenizer: `{s['tokenizer']['identity']['name']}` (vocab {s['tokenizer']['vocab_size']})",
        f"- stage-1 mapper: `{s['mapper_dir']}`; text encoder `{s['text_encoder'].get('name')}`",
        f"- data: {s['data']['rows']} rows used of {s['data']['n_ok']} OK clips (dropped: {s['data']['dropped']}); "
        f"{s['data']['n_instructions']} instructions; rows without a same-speaker prompt clip: "
        f"{s['data']['own_prompt_frac']:.1%}; padding {s['data']['pad_frac']:.1%} of batch tokens",
        f"- row mix (instruction_prob {s['config']['instruction_prob']}, prompt_instruction_prob "
        f"{s['config'].get('prompt_instruction_prob', 0.0)}, instruction_dropout "
        f"{s['config'].get('instruction_dropout', 0.0)}), of the rows with an instruction: "
        + ", ".join(f"{k} {v:.1%}" for k, v in (s['data'].get('row_mix') or {}).items()),
        f"- world size {s['world_size']}; device {s['device']}; "
        f"amp {s['amp']}; compile {s['config']['compile']}",
        f"- steps {s['global_step']} (epoch {s['epoch']}); stopped: {s['stopped_reason']}; non-finite steps skipped "
        f"{s['nonfinite_steps']}", *_held_out_lines(s), "",
        "## Parameters", "", "| group | trainable |", "|---|---|",
        *[f"| {g} | {n:,} |" for g, n in s["trainable"].items()],
        f"| **total** | **{sum(s['trainable'].values()):,}** |", "", "| frozen | params |", "|---|---|",
        *[f"| {g} | {n:,} |" for g, n in s["frozen"].items()], "",
        "## Loss per segment", "",
    ]
    if png:
        lines += [f"![loss curves]({png})", ""]
    val = bool(s.get("val"))  # held-out columns only for a run with hold_out
    keys = [segment_key(head, seg) for head in ("text", "speech") for seg in SEGMENTS]
    columns = [f"{head} ({SEGMENT_SHORT[seg]})" for head in ("text", "speech") for seg in SEGMENTS]
    lines += [f"{SEGMENT_SHORT['with_prompt']}: {SEGMENT_LABELS['with_prompt']}.", "",
              "| step | epoch | lr | loss | " + " | ".join(columns) + " | instruction-only frac | tok/s |"
              + (" held-out text | held-out speech |" if val else ""),
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if val else "")]
    stride = max(1, math.ceil(len(history) / 40))
    shown = history[::stride] + ([history[-1]] if history and (len(history) - 1) % stride else [])
    for r in shown:
        lines.append(f"| {r['step']} | {r['epoch']:.3f} | {r['lr']:.2e} | {_fmt(r['loss'])} | "
                     + " | ".join(_fmt(r.get(k)) for k in keys)
                     + f" | {_fmt(r.get(INSTRUCTION_ONLY_FRAC))} | {r.get('tokens_per_s', 0):.0f} |"
                     + (f" {_fmt(r.get('val_text_loss'))} | {_fmt(r.get('val_speech_loss'))} |" if val else ""))
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _held_out_lines(s: dict) -> list[str]:
    """The held-out losses at the end beside the last training losses (hold_out="mapper" only)."""
    v = s.get("val")
    if not v:
        return []
    d, last = s["data"], s.get("last_row") or {}
    return [f"- held-out (the stage-1 mapper's split): {d.get('held_out_rows')} rows, never trained on "
            f"({d.get('excluded_rows')} more left out of both sides); at the end: speech loss "
            f"{_fmt(v['val_speech_loss'])}, text loss {_fmt(v['val_text_loss'])} (instruction-only rows) — last "
            f"training row: speech {_fmt(last.get(segment_key('speech', 'instruction_only')))}, text "
            f"{_fmt(last.get(segment_key('text', 'instruction_only')))}"]


def _speech_vocab_lines(s: dict) -> list[str]:
    """The T3's speech table (``stage2.json`` ``speech_vocab``): what it was sized to, or that it is Chatterbox's."""
    v = s.get("speech_vocab")
    if not v:
        return []
    why = (f"sized to the store's `{v['sized_to']}` speech tokenizer" if v.get("sized_to")
           else "Chatterbox's speech table" if (v["size"], v["start"], v["stop"]) == CHATTERBOX_SPEECH_IDS
           else "the T3 source's")
    return [f"- speech vocabulary: {v['size']} rows (codes 0–{v['start'] - 1}, BOS {v['start']}, EOS {v['stop']}); "
            f"{why}"]
