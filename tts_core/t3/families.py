"""Which official Chatterbox checkpoint a ``--t3`` path holds: recognised by official file names, checked
against tensor shapes, described by one typed `T3Source`.

| family | T3 weights | text tokenizer | VoiceEncoder | S3Gen |
|---|---|---|---|---|
| english | ``t3_cfg.safetensors`` (text vocab 704) | ``tokenizer.json`` | ``ve.safetensors`` | ``s3gen.safetensors`` |
| multilingual | ``t3_mtl23ls_v2.safetensors`` (text vocab 2454) | ``grapheme_mtl_merged_expanded_v1.json`` | ``ve.pt`` | ``s3gen.pt`` |
| turbo | ``t3_turbo_v1.safetensors`` (GPT-2 backbone) | GPT-2 tokenizer files | ``ve.safetensors`` | ``s3gen_meanflow.safetensors`` |

``--t3`` may be a directory or the T3 file itself. A directory must hold exactly one family's T3 file
(the official Hugging Face snapshot holds several: then name the file). A stage-2 checkpoint (our own
``t3_cfg.safetensors`` with its `T3Config` in the metadata) is recognised by that metadata and keeps
the family it was trained from. VoiceEncoder / S3Gen files are looked up beside the T3 file under
every official name (``.safetensors`` or ``.pt``) and reported with their format.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tts_core.checkpoint import weights_format
from tts_core.reference import PROMPT_SECONDS, TURBO_PROMPT_SECONDS

from .alignment import LLAMA_ALIGNED_HEADS
from .config import T3Config
from .loading import CONFIG_META_KEY, config_from_official_shapes, read_checkpoint_metadata

log = logging.getLogger(__name__)

ENGLISH, MULTILINGUAL, TURBO = "english", "multilingual", "turbo"


class T3FamilyError(ValueError):
    """A --t3 file whose name and tensors disagree, or a family this version cannot load."""


@dataclass(frozen=True)
class FamilySpec:
    """What an official family's directory holds and how its T3 behaves."""

    name: str
    t3_files: tuple[str, ...]
    tokenizer_file: str | None  # None: not a single file (Turbo: GPT-2 tokenizer files)
    ve_files: tuple[str, ...]
    s3gen_files: tuple[str, ...]
    text_vocab: int | None  # the official text vocabulary (shape check); None: not checked here
    alignment_heads: tuple[tuple[int, int], ...] = ()  # AlignmentStreamAnalyzer (multilingual only)
    prompt_seconds: float = PROMPT_SECONDS  # the reference's first N s are tokenized for T3's prompt (ENC_COND_LEN)
    s3gen_ref_seconds: float = 10.0  # S3Gen's reference is cut to N s at 24 kHz (DEC_COND_LEN)


FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (
    FamilySpec(ENGLISH, ("t3_cfg.safetensors",), "tokenizer.json", ("ve.safetensors", "ve.pt"),
               ("s3gen.safetensors", "s3gen.pt"), 704),
    FamilySpec(MULTILINGUAL, ("t3_mtl23ls_v2.safetensors",), "grapheme_mtl_merged_expanded_v1.json",
               ("ve.pt", "ve.safetensors"), ("s3gen.pt", "s3gen.safetensors"), 2454, LLAMA_ALIGNED_HEADS),
    FamilySpec(TURBO, ("t3_turbo_v1.safetensors",), None, ("ve.safetensors", "ve.pt"),
               ("s3gen_meanflow.safetensors",), None, prompt_seconds=TURBO_PROMPT_SECONDS),
)}


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    format: str  # "safetensors" | "pt"

    @classmethod
    def at(cls, path: Path) -> "WeightsFile":
        return cls(Path(path), weights_format(path))


@dataclass(frozen=True)
class T3Source:
    """A resolved ``--t3``: the family, its files (with formats) and the T3Config its shapes give."""

    family: FamilySpec
    directory: Path
    t3: WeightsFile
    text_tokenizer: Path | None
    voice_encoder: WeightsFile | None
    s3gen: WeightsFile | None
    config: T3Config | None  # None for Turbo (its loader builds its own)
    own_checkpoint: bool = False  # a stage-2 checkpoint (config from its metadata), not an official file
    shapes: dict = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        kind = "stage-2 checkpoint of the" if self.own_checkpoint else "official Chatterbox"
        vocab = f", text vocab {self.config.text_vocab_size}" if self.config is not None else ""
        parts = [f"{kind} {self.family.name} T3 ({self.t3.path.name}{vocab})"]
        if self.text_tokenizer is not None:
            parts.append(f"tokenizer {self.text_tokenizer.name}")
        for w in (self.voice_encoder, self.s3gen):
            if w is not None:
                parts.append(f"{w.path.name} ({w.format})")
        return "; ".join(parts)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weights file without reading the tensors (safetensors) / memory-mapped (.pt)."""
    if weights_format(path) == "pt":
        from tts_core.checkpoint import read_weights

        return {k: tuple(v.shape) for k, v in read_weights(path).items()}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def family_from_shapes(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The family a T3 state dict's shapes say, or None when they match no official family."""
    if any(k.startswith(("tfmr.h.", "tfmr.wte.")) for k in shapes):
        return TURBO
    vocab = shapes.get("text_emb.weight", (None,))[0]
    for spec in FAMILIES.values():
        if spec.text_vocab is not None and spec.text_vocab == vocab:
            return spec.name
    return None


def _first(directory: Path, names) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _official_names() -> str:
    return "; ".join(f"{s.name}: {' or '.join(s.t3_files)}" for s in FAMILIES.values())


def detect_t3(path: str | Path) -> T3Source:
    """Resolve a ``--t3`` directory or file (module doc). Errors name the path and what belongs there."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for s in FAMILIES.values() for n in s.t3_files if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"--t3 {p}: no Chatterbox T3 file there (expected {_official_names()})")
        if len(found) > 1:
            raise FileNotFoundError(
                f"--t3 {p} holds several T3 checkpoints ({', '.join(f.name for f in found)}): pass the file itself, "
                f"e.g. --t3 {found[-1]}")
        t3_file = found[0]
    elif p.is_file():
        t3_file = p
    else:
        raise FileNotFoundError(f"--t3 {p}: no such directory or file")

    shapes = read_shapes(t3_file)
    meta = read_checkpoint_metadata(t3_file)
    by_name = next((s.name for s in FAMILIES.values() if t3_file.name in s.t3_files), None)
    if CONFIG_META_KEY in meta:  # our own stage-2 checkpoint: the config it was saved with is authoritative
        from .loading import config_from_checkpoint

        config = config_from_checkpoint(t3_file)
        family, own = FAMILIES[config.family], True
    else:
        by_shape = family_from_shapes(shapes)
        name = by_name or by_shape
        if name is None:
            raise FileNotFoundError(
                f"--t3 {t3_file}: neither an official T3 file name ({_official_names()}) nor an official shape "
                f"(text vocab {shapes.get('text_emb.weight', ('?',))[0]})")
        if by_name is not None and by_shape != by_name:
            spec = FAMILIES[by_name]
            raise T3FamilyError(
                f"--t3 {t3_file}: named like the {by_name} T3 but its tensors are not ({_shape_summary(shapes)}; "
                f"expected text vocab {spec.text_vocab})")
        family, own = FAMILIES[name], False
        config = None
        if family.name != TURBO:
            config = config_from_official_shapes(shapes, family=family.name, alignment_heads=family.alignment_heads)
    d = t3_file.parent
    tok = _first(d, [family.tokenizer_file] if family.tokenizer_file else [])
    ve, s3 = _first(d, family.ve_files), _first(d, family.s3gen_files)
    return T3Source(family=family, directory=d, t3=WeightsFile.at(t3_file), text_tokenizer=tok,
                    voice_encoder=WeightsFile.at(ve) if ve else None, s3gen=WeightsFile.at(s3) if s3 else None,
                    config=config, own_checkpoint=own, shapes=shapes)


def _shape_summary(shapes: dict) -> str:
    if any(k.startswith("tfmr.h.") for k in shapes):
        return "a GPT-2 backbone"
    return f"text vocab {shapes.get('text_emb.weight', ('?',))[0]}"


def announce(label: str, source: T3Source) -> None:
    """Say which family a T3 path resolved to (stderr and the log): a user sees what will be trained/used."""
    line = f"{label}: {source.describe()}"
    log.info(line)
    print(line, file=sys.stderr, flush=True)


__all__ = ["FAMILIES", "FamilySpec", "T3FamilyError", "T3Source", "WeightsFile", "detect_t3", "family_from_shapes", "announce",
           "read_shapes", "ENGLISH", "MULTILINGUAL", "TURBO"]
