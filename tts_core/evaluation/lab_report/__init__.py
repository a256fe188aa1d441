"""The lab report: tables from the lab's measurements, the targets checked, markdown + plots.

Pure functions of the numbers `instruct_tts.lab` collects (no model is run here), one module per concern:

* `scores`: the tables — direction accuracy per attribute, split and rendering (with the "instruction ignored"
  baseline and chance), by wording beside the instruction-embedding probe, the cloned voice kept, the sampling
  sweeps, and stage 1's cosines against the mean vector and the oracle;
* `targets`: issues #10, #19 and #23's bars, each met or not, with the number it was judged on;
* `notes`: the closing "Reading it" statements; `comparison`: another run's results beside this one's;
* `markdown` (`to_markdown`: report.md) and `plots` (attributes.png, stage2_loss.png, measurements.png).
"""
from tts_core.evaluation.lab_report.comparison import caption_comparison, held_out_instruction_results
from tts_core.evaluation.lab_report.markdown import caption_lines, to_markdown
from tts_core.evaluation.lab_report.notes import notes
from tts_core.evaluation.lab_report.plots import plot_attributes, plot_measurements, plot_stage2
from tts_core.evaluation.lab_report.scores import (
    IGNORED, LAB_ATTRIBUTES, PROBE, RENDERINGS, TARGET_ATTRIBUTES, WITH_REFERENCE, attribute_tables,
    reference_voice, stage1_section, sweep_section, wording_section,
)
from tts_core.evaluation.lab_report.targets import targets

__all__ = ["IGNORED", "LAB_ATTRIBUTES", "PROBE", "RENDERINGS", "TARGET_ATTRIBUTES", "WITH_REFERENCE",
           "attribute_tables", "caption_comparison", "caption_lines", "held_out_instruction_results", "notes",
           "plot_attributes", "plot_measurements", "plot_stage2", "reference_voice", "stage1_section",
           "sweep_section", "targets", "to_markdown", "wording_section"]
