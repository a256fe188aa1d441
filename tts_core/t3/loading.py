"""Loading Chatterbox's T3 files (strict) and saving T3 checkpoints (atomic).

`load_t3_checkpoint` is strict for every official key: an unknown key, a missing non-adapter key
or a shape mismatch is an error naming the file. The only keys allowed to be missing are
adapter parameters (`<norm>.adapter.*`), reported as "extra: N adapter params" — they keep
their zero-initialised identity until trained.

`save_t3` writes `<path>.tmp` then `os.replace`s it, so a reader never sees a half-written file.
Tensors that share storage (tied weights) are written once; the aliases are recorded in the
file's metadata and restored on load (safetensors refuses shared tensors — failure mode 2, docs/architecture.md).
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tts_core.checkpoint import read_weights, weights_format

from .adapters import is_adapter_key
from .config import T3Config

log = logging.getLogger(__name__)

TIED_META_KEY = "tied_weights"  # json {alias: canonical}
CONFIG_META_KEY = "t3_config"  # json T3Config (our own checkpoints only)


class CheckpointMismatchError(RuntimeError):
    pass


@dataclass
class LoadReport:
    path: str
    loaded: list[str]
    missing_adapter: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        n_adapter = len(self.missing_adapter)
        return f"{self.path}: loaded {len(self.loaded)} tensors; extra: {n_adapter} adapter params"


def _tied_groups(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for state-dict entries that share storage with an earlier entry."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    if weights_format(path) == "pt":
        return {}  # torch.save files carry no metadata (official files only)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def config_from_checkpoint(path: str | os.PathLike) -> T3Config | None:
    """The T3Config saved by `save_t3`, or None for an official Chatterbox file."""
    meta = read_checkpoint_metadata(path)
    return T3Config.from_dict(json.loads(meta[CONFIG_META_KEY])) if CONFIG_META_KEY in meta else None


CHATTERBOX_HEADS = 16  # Llama_520M's head count: the one backbone setting weight shapes cannot tell


def config_from_official_shapes(shapes: dict[str, tuple[int, ...]], **overrides) -> T3Config:
    """The T3Config of an official Llama T3 file, read off its tensor shapes: width, depth, MLP size,
    text / speech vocabularies (704 English, 2454 multilingual), position tables, perceiver queries,
    emotion input. Everything else (token ids, rope, 16 heads) is Chatterbox's Llama_520M."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointMismatchError(f"not a Chatterbox Llama T3 checkpoint: no {key!r}")
        return tuple(shapes[key])

    vocab_text, hidden = shape("text_emb.weight")
    head_dim = hidden // CHATTERBOX_HEADS
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("tfmr.layers.")}
    return T3Config(
        text_vocab_size=vocab_text,
        speech_vocab_size=shape("speech_emb.weight")[0],
        max_text_tokens=shape("text_pos_emb.emb.weight")[0] - 2,
        max_speech_tokens=shape("speech_pos_emb.emb.weight")[0] - 4,
        speaker_embed_size=shape("cond_enc.spkr_enc.weight")[1],
        perceiver_queries=shape("cond_enc.perceiver.pre_attention_query")[1],
        emotion_adv="cond_enc.emotion_adv_fc.weight" in shapes,
        hidden_size=hidden,
        num_layers=max(layers) + 1 if layers else 0,
        num_heads=CHATTERBOX_HEADS,
        num_kv_heads=shape("tfmr.layers.0.self_attn.k_proj.weight")[0] // head_dim,
        head_dim=head_dim,
        intermediate_size=shape("tfmr.layers.0.mlp.gate_proj.weight")[0],
        llama_vocab_size=shape("tfmr.embed_tokens.weight")[0],
        **overrides,
    )


def load_t3_checkpoint(model: nn.Module, path: str | os.PathLike, *, allow_missing_adapters: bool = True) -> LoadReport:
    """Load `path` (an official Chatterbox T3 file, `.safetensors` or `.pt`, or a `save_t3` file) into
    `model` in place."""
    path = str(Path(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"T3 checkpoint not found: {path}")
    state = read_weights(path)
    meta = read_checkpoint_metadata(path)
    file_aliases = json.loads(meta.get(TIED_META_KEY, "{}"))
    for alias, canonical in file_aliases.items():
        if canonical in state and alias not in state:
            state[alias] = state[canonical]

    expected = model.state_dict()
    model_aliases = _tied_groups(model)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        hints = []
        for k in unexpected[:10]:
            close = difflib.get_close_matches(k, list(expected), n=1)
            hints.append(f"  {k}" + (f"  (did you mean {close[0]}?)" if close else ""))
        raise CheckpointMismatchError(
            f"{path}: {len(unexpected)} key(s) the T3 model does not have:\n" + "\n".join(hints)
        )
    missing = sorted(k for k in set(expected) - set(state) if model_aliases.get(k) not in state)
    missing_adapter = [k for k in missing if is_adapter_key(k)]
    missing_official = [k for k in missing if not is_adapter_key(k)]
    if missing_official or (missing_adapter and not allow_missing_adapters):
        bad = missing_official or missing_adapter
        raise CheckpointMismatchError(
            f"{path}: {len(bad)} required key(s) missing, e.g. {bad[:10]}"
        )
    shape_errors = [
        f"  {k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if shape_errors:
        raise CheckpointMismatchError(f"{path}: shape mismatch:\n" + "\n".join(shape_errors[:20]))

    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report = LoadReport(path=path, loaded=sorted(state), missing_adapter=missing_adapter)
    log.info(report.summary)
    return report


def save_t3(model: nn.Module, path: str | os.PathLike, *, config: T3Config | None = None) -> Path:
    """Atomically write the model's state dict as safetensors (ties deduplicated, recorded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aliases = _tied_groups(model)
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous()  # own storage: no accidental sharing
        for k, v in model.state_dict().items()
        if k not in aliases
    }
    meta = {"format": "pt", TIED_META_KEY: json.dumps(aliases, sort_keys=True)}
    config = config if config is not None else getattr(model, "cfg", None)
    if isinstance(config, T3Config):
        meta[CONFIG_META_KEY] = config.to_json()
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
