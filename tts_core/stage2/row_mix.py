"""Stage 2's row mix: the kinds of training row, how often each is drawn, and the name each is logged under.

Every row of a stage-2 batch is one kind (`tts_core.stage2.mixing`):

* **audio-only** (`AUDIO_ONLY`): the ground-truth speaker embedding and another clip's prompt, no instruction;
* **instruction-only** (`INSTRUCTION_ONLY`): the mapper's speaker embedding, no prompt, the instruction on;
* **prompt + instruction** (`PROMPT_INSTRUCTION`): a reference clip's prompt and speaker embedding, the
  instruction on ("clone this voice, but slower").

A row whose instruction is on (instruction-only, prompt + instruction) may also get the **null instruction**:
not a kind of its own, the same row with the adapters off — what instruction guidance guides against. Rows
without an instruction are always audio-only.

Three probabilities set the mix: one validated `RowMix` in code. Their flat names (``instruction_prob``,
``prompt_instruction_prob``, ``instruction_dropout``) are the user contract — ``stage2.json``'s ``train_config``,
the CLI flags, the deployments' parameters — so `RowMix.to_dict` / `from_dict` speak them.

The loss is logged in two segments (`SEGMENTS`): the instruction-only rows, and the rows with a reference
prompt (audio-only and prompt + instruction); a metrics row names them ``text_instruction_only``,
``speech_with_prompt``, ... (`segment_key`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tts_core.recipe import INSTRUCTION_DROPOUT, INSTRUCTION_PROB, PROMPT_INSTRUCTION_PROB

# ---- row kinds (`Stage2Batch.kind`) ----------------------------------------------------------------------
AUDIO_ONLY, INSTRUCTION_ONLY, PROMPT_INSTRUCTION = 0, 1, 2
KIND_NAMES = {AUDIO_ONLY: "audio-only", INSTRUCTION_ONLY: "instruction-only",
              PROMPT_INSTRUCTION: "prompt + instruction"}
NULL_INSTRUCTION = "null instruction"


def row_name(kind: int, null_instruction: bool = False) -> str:
    """What a row is called in logs and reports: its kind, and whether its instruction was nulled."""
    return f"{KIND_NAMES[int(kind)]} ({NULL_INSTRUCTION})" if null_instruction else KIND_NAMES[int(kind)]


# ---- loss segments (`Stage2Model`'s statistics, the metrics rows, the report) ----------------------------
# A row's segment is whether it has a reference prompt: the instruction-only rows have none; the audio-only and
# prompt + instruction rows both condition on one.
SEGMENTS = {"instruction_only": (INSTRUCTION_ONLY,), "with_prompt": (AUDIO_ONLY, PROMPT_INSTRUCTION)}
SEGMENT_LABELS = {"instruction_only": "instruction-only rows",
                  "with_prompt": "rows with a reference prompt (audio-only, prompt + instruction)"}
SEGMENT_SHORT = {"instruction_only": "instruction-only", "with_prompt": "with prompt"}  # table columns
INSTRUCTION_ONLY_FRAC = "instruction_only_frac"  # metrics row: share of instruction-only rows


def segment_of(kind: int) -> str:
    return next(s for s, kinds in SEGMENTS.items() if int(kind) in kinds)


def segment_key(head: str, segment: str) -> str:
    """A metrics row's key of one head's mean CE over one segment: ``text_instruction_only``, ``speech_with_prompt``."""
    return f"{head}_{segment}"


# ---- the mix ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowMix:
    """The three draws of the mix, each a probability in [0, 1] (refused otherwise). Defaults: the lab's measured
    recipe (`tts_core.recipe`, where each value's reason is)."""

    # per-row probability of an instruction-only row (of the rows not drawn prompt + instruction)
    instruction_prob: float = INSTRUCTION_PROB
    # share of the rows with an instruction conditioned on a reference prompt *and* the instruction
    prompt_instruction_prob: float = PROMPT_INSTRUCTION_PROB
    # share of instruction-on rows given the null instruction: what instruction guidance's unconditional branch is
    instruction_dropout: float = INSTRUCTION_DROPOUT

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} must lie in [0, 1]")

    @classmethod
    def core(cls, instruction_prob: float) -> "RowMix":
        """Instruction-only / audio-only rows only: no prompt + instruction, no null instruction. ``core(1.0)`` is
        `SCORED_AS_INSTRUCTION_ONLY`."""
        return cls(instruction_prob=instruction_prob, prompt_instruction_prob=0.0, instruction_dropout=0.0)

    KEYS = ("instruction_prob", "prompt_instruction_prob", "instruction_dropout")  # the flat names (module doc)

    @classmethod
    def from_dict(cls, d: dict) -> "RowMix":
        """From flat keys (``train_config``, CLI options); a key not given takes its default."""
        return cls(**{k: d[k] for k in cls.KEYS if k in d})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def null_instruction(self) -> bool:
        """Whether a run with this mix trains the null instruction (``stage2.json`` ``null_instruction``)."""
        return self.instruction_dropout > 0

    def shares(self) -> dict[str, float]:
        """Expected share of each row kind among the rows that have an instruction (module doc; rows without one
        are always audio-only), and of the null instruction among instruction-on rows and among those rows."""
        both = self.prompt_instruction_prob
        inst = (1 - both) * self.instruction_prob
        return {KIND_NAMES[INSTRUCTION_ONLY]: inst, KIND_NAMES[AUDIO_ONLY]: (1 - both) * (1 - self.instruction_prob),
                KIND_NAMES[PROMPT_INSTRUCTION]: both,
                f"{NULL_INSTRUCTION} (of instruction-on rows)": self.instruction_dropout,
                f"{NULL_INSTRUCTION} (of rows with an instruction)": (inst + both) * self.instruction_dropout}


# Held-out losses are scored on instruction-only rows, each with its own instruction (never nulled).
SCORED_AS_INSTRUCTION_ONLY = RowMix.core(1.0)
