"""Chatterbox's sampling defaults for T3 generation, per official family, in one import-light place (the
CLI's --help reads them without importing torch). These are each family's user-facing `generate` values:
`ChatterboxTTS.generate` passes top_p=1.0 (T3.inference's own default is 0.95), `ChatterboxMultilingualTTS`
repetition_penalty=2.0, and `ChatterboxTurboTTS.generate` top_k=1000, top_p=0.95 and no min_p / CFG."""
from tts_core.recipe import INSTRUCTION_GUIDANCE  # re-exported: ours, the lab's measured W (tts_core.recipe)

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


def default_instruction_guidance(instruction_dropout: float | bool | None) -> float:
    """W when none is given: `INSTRUCTION_GUIDANCE` for a run that trained the null instruction (a dropout > 0, or
    stage2.json's ``null_instruction`` true), else 0."""
    return INSTRUCTION_GUIDANCE if float(instruction_dropout or 0.0) > 0.0 else 0.0


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
