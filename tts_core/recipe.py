"""The training and sampling recipe the lab measured, defined once (issue #31: production gets what the lab proved).

Import-light (no torch): `MapperConfig`, `Stage2Config`, the lab's `LabConfig` and the CLI's help read their defaults
here, so a default changes in one place, beside the measurement that chose it. The lab's presets override sizes and
steps only (its CI preset ``tiny`` also keeps one mapper draw at T 0.3, for speed).
"""
from __future__ import annotations

# ---- stage 1: what stage 2 and synthesis get from the mapper ----------------------------------------------------
# The mean of 64 decoded draws closes 76% / 66% of the mean → oracle gap (SpkCos / XVecCos); one draw, at any
# temperature, scores below the mean vector (docs/lab.md "Stage 1 with the real CAM++ x-vector", the draws table;
# docs/benchmarks.md "Mapper draws" has its cost).
MAPPER_DRAWS = 64
# T 0.8 with 64 draws beat T 0.3 with 64 draws on every cosine; T 1.0 adds nothing (same table).
MAPPER_TEMPERATURE = 0.8

# ---- stage 2: the row mix -----------------------------------------------------------------------------------------
# The design card's 50/50 instruction-only / audio-only split of the rows that are not prompt + instruction (docs/lab.md
# "Running it": the rows other than the prompt + instruction fifth keep the cards' 50/50).
INSTRUCTION_PROB = 0.5
# A fifth of the rows are reference clip + instruction, so "clone this voice, but slower" is a trained path
# (docs/lab.md "Reading the report", held-out voices; docs/benchmarks.md "The default lab").
PROMPT_INSTRUCTION_PROB = 0.2
# A tenth of the instruction rows get the null instruction: what instruction guidance guides against
# (docs/benchmarks.md "The default lab": 10% null-instruction dropout, the run W = 3 was chosen on).
INSTRUCTION_DROPOUT = 0.1
# A run recorded before the two refinements existed trained neither: its saved train_config lacks these keys, and a
# missing key means 0 (a resume's comparison, and whether the run trained the null instruction), never the default.
ROW_MIX_BEFORE_RECORDED = {"prompt_instruction_prob": 0.0, "instruction_dropout": 0.0}

# ---- synthesis ------------------------------------------------------------------------------------------------------
# Instruction guidance W for runs that trained the null instruction: W 3 beat W 0 on pitch, rate and loudness of both
# held-out splits by 0.08 – 0.20 (docs/benchmarks.md "The default lab", the W 0 / 1.5 / 3 sweep; docs/lab.md
# "Reading the report", Sampling). A run without a null instruction has nothing to guide against: W 0 there.
INSTRUCTION_GUIDANCE = 3.0
# W when a reference clip is given as well ("this voice, but slower"): guidance pulls toward the instruction and away
# from the reference (the unconditional branch is the reference alone). On the 8000-clip lab's curve (held-out voices,
# W 0 / 1 / 2 / 3) the voice cosine to the reference fell 0.633 / 0.625 / 0.612 / 0.603 while rate read 0.824 / 0.994
# / 0.994 / 1.000: W 1 is the least guidance that keeps rate and loudness ≥ 0.85 (docs/benchmarks.md "The default lab
# at 8000 clips").
REFERENCE_INSTRUCTION_GUIDANCE = 1.0

RECIPE = {"mapper_draws": MAPPER_DRAWS, "mapper_temperature": MAPPER_TEMPERATURE, "instruction_prob": INSTRUCTION_PROB,
          "prompt_instruction_prob": PROMPT_INSTRUCTION_PROB, "instruction_dropout": INSTRUCTION_DROPOUT,
          "instruction_guidance": INSTRUCTION_GUIDANCE, "reference_instruction_guidance": REFERENCE_INSTRUCTION_GUIDANCE}
