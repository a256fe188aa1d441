"""A tiny ctypes driver for the libespeak-ng that the `espeakng_loader` wheel ships (no system package needed).

Why ctypes and not a subprocess: one library load, then each clip is a function call (hundreds of clips a
second), and every parameter is set explicitly so a corpus is reproducible from its recorded values.

Not thread-safe: libespeak-ng keeps its voice, parameters and callback in process-global state, so use one
`EspeakSynth` per process and call it from one thread at a time. Noise (e.g. the `breath` of some variants)
comes from espeak-ng's own generator and libc's `rand()`; `synth(..., noise_seed=...)` seeds both. Other state
(e.g. the pitch-flutter phase) carries over between utterances and cannot be reset, so identical output needs
an identical sequence of calls in a fresh process (`demo.py` does exactly that).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# speak_lib.h (espeak-ng, API revision 12)
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
EE_OK = 0
ESPEAK_RATE, ESPEAK_VOLUME, ESPEAK_PITCH, ESPEAK_RANGE = 1, 2, 3, 4
RATE_MIN, RATE_MAX = 80, 450  # espeakRATE_MINIMUM / espeakRATE_MAXIMUM, words per minute

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class EspeakParams:
    """Absolute espeak-ng parameters: pitch and range 0-100 (50 = the voice's own), rate in wpm, volume 0-200."""

    pitch: int = 50
    range: int = 50
    rate: int = 175
    volume: int = 100


def data_path() -> Path:
    import espeakng_loader

    return Path(espeakng_loader.get_data_path())


def variant_gender(variant: str) -> str:
    """`male`/`female` from the `gender` line of a voice variant file (`voices/!v/<variant>`)."""
    path = data_path() / "voices" / "!v" / variant
    if not path.is_file():
        raise ValueError(f"unknown espeak-ng voice variant {variant!r} (no {path})")
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "gender":
            return parts[1].lower()  # some variant files write "Male"
    raise ValueError(f"voice variant {variant!r} declares no gender")


class EspeakSynth:
    """Synthesise text with libespeak-ng in synchronous retrieval mode; returns float32 mono at `sample_rate`."""

    _lib: ctypes.CDLL | None = None
    _sample_rate: int = 0

    def __init__(self) -> None:
        cls = type(self)
        if cls._lib is None:  # initialise once per process: the library state is global anyway
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
            lib.espeak_SetSynthCallback.restype = None
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
            sr = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
            if sr <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({sr})")
            cls._lib, cls._sample_rate = lib, sr
        self._lib = cls._lib
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: libespeak-ng holds a raw pointer
        self._libc = ctypes.CDLL(None)

    @property
    def sample_rate(self) -> int:
        return type(self)._sample_rate

    @property
    def version(self) -> str:
        return self._lib.espeak_Info(None).decode()

    def _on_audio(self, samples, n: int, _events) -> int:
        if samples and n > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
        return 0  # 0 = continue

    def synth(self, text: str, voice: str, params: EspeakParams = EspeakParams(), noise_seed: int = 0) -> np.ndarray:
        """Speak `text` with `voice` (e.g. "en+m3", "en-us+f2") and explicit parameters; float32 in [-1, 1]."""
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for key, value in ((ESPEAK_RATE, params.rate), (ESPEAK_PITCH, params.pitch),
                           (ESPEAK_RANGE, params.range), (ESPEAK_VOLUME, params.volume)):
            if lib.espeak_SetParameter(key, int(value), 0) != EE_OK:
                raise RuntimeError(f"espeak_SetParameter({key}, {value}) failed")
        lib.espeak_SetSynthCallback(self._callback)
        self._chunks.clear()
        lib.espeak_ng_SetRandSeed(noise_seed)
        self._libc.srand(ctypes.c_uint(noise_seed & 0xFFFFFFFF))
        data = text.encode("utf-8")
        err = lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        if err != EE_OK:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
        lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return (np.concatenate(self._chunks).astype(np.float32) / 32768.0)
