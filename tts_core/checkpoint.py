"""Safetensors save/load of a module's state dict that survives tied weights and crashes.

`safetensors` refuses tensors that share memory (failure mode 2 in docs/architecture.md: T5 ties `shared.weight`
and `encoder.embed_tokens.weight`). We store each tied group once and record the other names as aliases
in the file's metadata, so loading restores every key and `strict=True` still means something.
Writes go to a temporary file in the target directory and are renamed into place, so a killed save
never leaves a truncated checkpoint under the final name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tts_core.atomic_files import atomic_write

ALIASES_KEY = "tied_aliases"  # metadata entry: JSON {dropped_name: kept_name}


def _storage_key(t: torch.Tensor) -> tuple:
    """Two state-dict entries are the same tensor when they view the same memory the same way."""
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def dedupe_tied(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the first name of every tied group (state-dict order, i.e. the owning module) and alias the rest.

    Tensors that merely overlap (different views of one storage) are copied so the file stays valid.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_view: dict[tuple, str] = {}
    storages_seen: set[tuple] = set()
    for name, tensor in state.items():
        t = tensor.detach()
        if t.numel() == 0:  # empty tensors own no memory to share
            kept[name] = t.contiguous().cpu()
            continue
        view = _storage_key(t)
        if view in first_by_view:
            aliases[name] = first_by_view[view]
            continue
        storage = (t.device.type, t.untyped_storage().data_ptr())
        if storage in storages_seen:
            t = t.clone()  # a different view of shared memory: store an independent copy
        storages_seen.add(storage)
        first_by_view[view] = name
        kept[name] = t.contiguous().cpu()
    return kept, aliases


def save_state_dict_safetensors(module: torch.nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                                metadata: Mapping[str, str] | None = None) -> Path:
    """Save `module.state_dict()` (or a state dict) to `path`, ties deduplicated, atomically."""
    path = Path(path)
    state = module.state_dict() if isinstance(module, torch.nn.Module) else dict(module)
    tensors, aliases = dedupe_tied(state)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if ALIASES_KEY in meta:
        raise ValueError(f"metadata key {ALIASES_KEY!r} is reserved")
    meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def read_state_dict_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a file written by `save_state_dict_safetensors` (aliases restored) and its metadata."""
    with safe_open(str(path), framework="pt", device=device) as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    aliases = json.loads(meta.pop(ALIASES_KEY, "{}"))
    for name, target in aliases.items():
        state[name] = state[target]
    return state, meta


def load_state_dict_safetensors(module: torch.nn.Module, path: str | Path, strict: bool = True):
    """Load a file written by `save_state_dict_safetensors` into `module`; returns load_state_dict's result.

    Aliased names get the kept tensor, so a tied module is filled consistently and strict loading
    still reports genuinely missing or unexpected keys.
    """
    state, _ = read_state_dict_safetensors(path)
    return module.load_state_dict(state, strict=strict)


class ResumeMismatchError(ValueError):
    """The run directory holds a resume checkpoint of another run (other data or config)."""


PT_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save files (Chatterbox's multilingual ve.pt / s3gen.pt)


def weights_format(path: str | Path) -> str:
    """"safetensors" or "pt", from the file name (the official checkpoints use both)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PT_SUFFIXES:
        return "pt"
    raise ValueError(f"{path}: unknown weights format {suffix!r} (expected .safetensors or {', '.join(PT_SUFFIXES)})")


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state dict, read with ``weights_only=True`` (no code runs) onto the CPU."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path} is not a plain state dict of tensors (torch.save(model.state_dict()))")
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` or ``.pt`` weights file, on the CPU (format from the suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if weights_format(path) == "pt":
        return _torch_state(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_prefixed_state(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix*`` tensors of a (large) weights file, prefix stripped; from a safetensors file nothing
    else is read. Used for the sub-modules of Chatterbox's ``s3gen.safetensors`` / ``s3gen.pt`` (speaker
    encoder, tokenizer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: put Chatterbox's s3gen weights there (s3gen.safetensors, or the multilingual s3gen.pt)")
    if weights_format(path) == "pt":
        keys = {k[len(prefix):]: v for k, v in _torch_state(path).items() if k.startswith(prefix)}
    else:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not keys:
        raise ValueError(f"{path} has no '{prefix}*' tensors: is it Chatterbox's s3gen weights file?")
    return keys
