"""Chatterbox's sampling defaults for T3 generation, in one import-light place (the CLI's --help reads
them without importing torch). These are ChatterboxTTS.generate's user-facing values: T3.inference's own
top_p default is 0.95, but ChatterboxTTS.generate passes 1.0."""

DEFAULT_SAMPLING = dict(temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, cfg_weight=0.5)
DEFAULT_EXAGGERATION = 0.5  # emotion_adv

# What each official family's `generate` passes instead (chatterbox/mtl_tts.py: repetition_penalty=2.0).
FAMILY_SAMPLING = {"multilingual": {"repetition_penalty": 2.0}}


def sampling_defaults(family: str = "english") -> dict:
    """The official `generate` defaults of a T3 family."""
    return {**DEFAULT_SAMPLING, **FAMILY_SAMPLING.get(family, {})}
