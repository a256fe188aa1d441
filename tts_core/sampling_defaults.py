"""Chatterbox's sampling defaults for T3 generation, per official family, in one import-light place (the
CLI's --help reads them without importing torch). These are each family's user-facing `generate` values:
`ChatterboxTTS.generate` passes top_p=1.0 (T3.inference's own default is 0.95), `ChatterboxMultilingualTTS`
repetition_penalty=2.0, and `ChatterboxTurboTTS.generate` top_k=1000, top_p=0.95 and no min_p / CFG."""
from collections.abc import Mapping

from tts_core.recipe import INSTRUCTION_GUIDANCE  # re-exported: ours, the lab's measured W (tts_core.recipe)
from tts_core.recipe import REFERENCE_INSTRUCTION_GUIDANCE
from tts_core.recipe import ROW_MIX_BEFORE_RECORDED

DEFAULT_SAMPLING = dict(temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, cfg_weight=0.5)
DEFAULT_EXAGGERATION = 0.5  # emotion_adv
TURBO_SAMPLING = dict(temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2)

# What each official family's `generate` takes, with its defaults (keys not listed are not that family's).
FAMILY_SAMPLING = {
    "english": DEFAULT_SAMPLING,
    "multilingual": {**DEFAULT_SAMPLING, "repetition_penalty": 2.0},  # chatterbox/mtl_tts.py
    "turbo": TURBO_SAMPLING,  # chatterbox/tts_turbo.py (it warns and ignores cfg_weight / min_p)
}
# Instruction guidance W (ours, not Chatterbox's) for runs whose stage 2 trained the null instruction: defined with the
# rest of the lab's measured recipe in `tts_core.recipe` (why there), re-exported here (imported above). A run without a null
# instruction has nothing to guide against: its default is 0, the unguided path.


def trained_null_instruction(record: Mapping) -> bool:
    """Whether a stage-2 run trained the null instruction, from its record (``stage2.json``, or the record a run about
    to train will write: `Stage2Config.run_record`): its ``null_instruction``, else its recorded dropout."""
    recorded = record.get("null_instruction")
    if recorded is not None:
        return bool(recorded)
    # A run written before stage2.json said so outright: its recorded train_config.instruction_dropout decides. A
    # train_config without that key predates dropout itself, so the run trained none: 0.0 (ROW_MIX_BEFORE_RECORDED) —
    # never Stage2Config's default, which is today's recipe, not what that run did.
    dropout = (record.get("train_config") or {}).get("instruction_dropout",
                                                     ROW_MIX_BEFORE_RECORDED["instruction_dropout"])
    return float(dropout or 0.0) > 0.0


def default_instruction_guidance(record: Mapping, family: str, reference: bool = False) -> float:
    """The instruction guidance W a run samples with when none is given — the one place that decides it, from the
    run's record (`trained_null_instruction`), its T3 ``family`` and whether a ``reference`` clip conditions the
    utterance too: `INSTRUCTION_GUIDANCE` (`REFERENCE_INSTRUCTION_GUIDANCE` with a reference clip) where stage 2
    trained the null instruction, else 0; always 0 for Turbo (its generate runs one row: no guidance)."""
    if family == "turbo" or not trained_null_instruction(record):
        return 0.0
    return REFERENCE_INSTRUCTION_GUIDANCE if reference else INSTRUCTION_GUIDANCE


# Options a family accepts without using them (passed through so its generate warns, as the official does).
FAMILY_IGNORED = {"turbo": ("min_p", "cfg_weight")}


def sampling_defaults(family: str = "english") -> dict:
    """The official `generate` defaults of a T3 family."""
    if family not in FAMILY_SAMPLING:
        raise ValueError(f"unknown T3 family {family!r}: one of {sorted(FAMILY_SAMPLING)}")
    return dict(FAMILY_SAMPLING[family])


def family_defaults_help(option: str) -> str:
    """'0.95 (turbo), 1.0 (english, multilingual)' — the CLI's help for one sampling option."""
    by_value: dict = {}
    for family, values in FAMILY_SAMPLING.items():
        if option in values:
            by_value.setdefault(values[option], []).append(family)
    used = ", ".join(f"{v} ({', '.join(f)})" for v, f in by_value.items())
    missing = [f for f, values in FAMILY_SAMPLING.items() if option not in values]
    return f"default: the T3 family's official value: {used}" + (f"; not used by {', '.join(missing)}" if missing else "")
