"""`instruct-tts lab`: the instruction-following lab (docs/lab.md), one command, one report.

* `config`: `LabConfig`, its size presets and ablations, and the fields that define a run;
* `pipeline`: `run_lab`, the six steps (corpus → split → caches → stage 1 → stage 2 → evaluation → report);
* `split_files`, `caches`, `measurements`: the steps' work (`paths`: where each writes in ``--out``);
  the report's tables, targets, markdown and plots are `tts_core.evaluation.lab_report`'s.
"""
from instruct_tts.lab.config import ABLATIONS, PRESETS, LabConfig
from instruct_tts.lab.pipeline import run_lab

__all__ = ["ABLATIONS", "PRESETS", "LabConfig", "run_lab"]
