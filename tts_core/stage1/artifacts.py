"""Stage-1 checkpoints on disk: one safetensors file + a JSON beside it, and `load_mapper` for stage 2.

A checkpoint directory (``run_dir``, ``run_dir/phase1``, ``run_dir/phase2``) holds

    mapper.safetensors   state dict of `Stage1Model`: ``encoder.*`` (pooling) and ``mapper.*`` (flow)
    mapper.json          format, encoder + mapper config (the effective sampling: draws, temperature),
                         text-encoder identity, cache identity, the frozen models and their paths
                         (``frozen_models``, `tts_core.run_models`),
                         phase/epoch/step, best AvgCos, metrics history, sha256 of the weights file

Both are written atomically (temporary file + rename); the JSON is written last and records the
weights' sha256, so a crash between the two writes is detected by `load_mapper` instead of silently
pairing new weights with old metadata.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tts_core.atomic_files import (  # noqa: F401  (re-exported: stage-1 callers import them from here)
    atomic_copy, atomic_torch_save, atomic_write_json, atomic_write_text, json_default,
)
from tts_core.checkpoint import load_state_dict_safetensors, save_state_dict_safetensors
from tts_core.identity import ModelIdentity, sha256_file
from tts_core.mapper.flow import InstructionMapper, MapperConfig
from tts_core.mapper.pooling import InstructionEncoder, check_text_encoder_identity

FORMAT = "instruct-tts/stage1-mapper"
FORMAT_VERSION = 1
WEIGHTS_FILE = "mapper.safetensors"
META_FILE = "mapper.json"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "none": None}


def dtype_name(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


class Stage1Model(nn.Module):
    """The two trainable parts, under the checkpoint prefixes ``encoder.`` and ``mapper.``."""

    def __init__(self, encoder: InstructionEncoder, mapper: InstructionMapper):
        super().__init__()
        self.encoder = encoder
        self.mapper = mapper


# ---- weights ----------------------------------------------------------------------------------------------
def save_weights(module: nn.Module, path: str | Path) -> None:
    """Atomic, tie-safe safetensors save (tts_core.checkpoint)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_state_dict_safetensors(module, path)


def load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> None:
    load_state_dict_safetensors(module, path, strict=strict)


# ---- checkpoints --------------------------------------------------------------------------------------------
def save_checkpoint(model: Stage1Model, ckpt_dir: str | Path, meta: dict) -> Path:
    """Write ``ckpt_dir/mapper.safetensors`` then ``ckpt_dir/mapper.json`` (format, configs and sha added)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    weights = ckpt_dir / WEIGHTS_FILE
    save_weights(model, weights)
    enc = model.encoder
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights),
        "encoder": {"hidden_size": enc.hidden_size, "n_heads": enc.n_heads,
                    "states_dtype": dtype_name(enc.states_dtype)},
        "mapper_config": model.mapper.config.to_dict(),
        **meta,
    }
    atomic_write_json(ckpt_dir / META_FILE, full)
    return weights


def copy_checkpoint(src_dir: str | Path, dst_dir: str | Path, extra: dict | None = None) -> None:
    """Copy a checkpoint (weights first, JSON last) — used to publish the selected phase at the run root."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    meta = json.loads((src_dir / META_FILE).read_text())
    atomic_copy(src_dir / WEIGHTS_FILE, dst_dir / WEIGHTS_FILE)
    meta.update(extra or {})
    atomic_write_json(dst_dir / META_FILE, meta)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run dir, a phase dir, a mapper.safetensors or a mapper.json → (weights, meta) paths."""
    p = Path(path)
    if p.is_dir():
        weights, meta = p / WEIGHTS_FILE, p / META_FILE
    elif p.suffix == ".json":
        weights, meta = p.with_suffix(".safetensors"), p
    else:
        weights, meta = p, p.with_suffix(".json")
    if not weights.is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"no stage-1 checkpoint at {p}: expected {weights.name} and {meta.name} there (a finished "
            "`train_stage1` run directory, or its phase1/ or phase2/ subdirectory)")
    return weights, meta


def read_meta(path: str | Path) -> dict:
    _, meta_path = resolve_checkpoint(path)
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a stage-1 mapper checkpoint (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format version {meta['format_version']}; this code reads {FORMAT_VERSION}")
    return meta


def build_model(meta: dict) -> Stage1Model:
    enc_cfg = meta["encoder"]
    encoder = InstructionEncoder(int(enc_cfg["hidden_size"]), int(enc_cfg["n_heads"]),
                                 states_dtype=_DTYPES[enc_cfg.get("states_dtype", "float16")])
    mapper = InstructionMapper(MapperConfig.from_dict(meta["mapper_config"]))
    return Stage1Model(encoder, mapper)


def load_stage1_model(path: str | Path, text_encoder_identity: Any = None, verify: bool = True
                      ) -> tuple[Stage1Model, dict]:
    weights, _ = resolve_checkpoint(path)
    meta = read_meta(path)
    expected = meta.get("text_encoder")
    if text_encoder_identity is not None:
        check_text_encoder_identity(expected, text_encoder_identity, what=f"the stage-1 checkpoint {weights}")
    if verify and meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise RuntimeError(
            f"{weights} does not match the sha256 recorded in {weights.with_suffix('.json').name}: the checkpoint "
            "was half-written (killed between the two files?). Resume the run to rewrite it, or use phase1/.")
    model = build_model(meta)
    load_weights(model, weights, strict=True)
    if expected:
        model.encoder.expected_text_encoder = ModelIdentity.from_dict(expected)
    return model, meta


def load_mapper(run_dir: str | Path, text_encoder_identity: Any = None, device: str | torch.device = "cpu",
                trainable: bool = False) -> tuple[InstructionEncoder, InstructionMapper, dict]:
    """Load a trained stage-1 mapper for stage 2 / inference → (encoder, mapper, meta).

    ``run_dir``: a `train_stage1` output directory (its root holds the selected checkpoint), a phase
    subdirectory or the weights file itself. ``text_encoder_identity`` (a `ModelIdentity`, its dict, or
    a text encoder with ``.identity``): refused with `TextEncoderMismatchError` unless it names the
    weights the mapper was trained on. The returned encoder also remembers that identity and refuses
    a different text encoder in ``encode_text``. Modules are in eval mode and frozen unless
    ``trainable``.
    """
    model, meta = load_stage1_model(run_dir, text_encoder_identity)
    model.to(device)
    model.eval()
    model.requires_grad_(trainable)
    return model.encoder, model.mapper, meta
