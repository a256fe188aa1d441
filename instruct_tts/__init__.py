"""instruct-tts: a Chatterbox TTS that follows voice instructions.

Python API (Chatterbox's style; imported lazily, so ``instruct-tts --help`` stays light)::

    from instruct_tts import InstructTTS
    model = InstructTTS.from_run("runs/t3", device="cpu")
    wav = model.generate("Hello there.", instruction="A deep, slow male voice.")  # float32 [1, N] at model.sr
"""
from __future__ import annotations

__all__ = ["InstructTTS"]


def __getattr__(name: str):
    if name == "InstructTTS":
        from tts_core.synthesis import InstructTTS

        return InstructTTS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
