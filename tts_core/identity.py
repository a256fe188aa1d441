"""Identity of a frozen model: a name plus the sha256 of its weights.

Every cache records the identity of every model that produced it, so that a cache built with
other weights is refused instead of silently mixed (docs/cache.md, "Identity and compatibility").
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # human-readable, honest: says what the model really is
    sha256: str  # of the weights actually loaded
    source: str = ""  # where the weights came from (path or package), informative only

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelIdentity":
        return cls(name=d["name"], sha256=d["sha256"], source=d.get("source", ""))

    def same_model(self, other: "ModelIdentity") -> bool:
        """Source paths may differ between machines; name and weights may not."""
        return self.name == other.name and self.sha256 == other.sha256


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of the tensors as loaded (sorted by key), independent of the file format they came in."""
    items = state.items() if isinstance(state, Mapping) else state
    h = hashlib.sha256()
    for key, t in sorted(items, key=lambda kv: kv[0]):
        h.update(key.encode())
        arr = t.detach().cpu().contiguous()
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        if arr.dtype == torch.bfloat16:
            arr = arr.view(torch.int16)
        h.update(np.ascontiguousarray(arr.numpy()).tobytes())
    return h.hexdigest()


def loaded_frozen(model, state: Mapping[str, torch.Tensor], name: str, source: str):
    """``model.load_checkpoint_state(state, source)``, then stamp its identity (name + sha256 of what was
    actually loaded) and return it in eval mode: the one way a frozen encoder comes to life from weights."""
    model.load_checkpoint_state(state, source)
    model.identity = ModelIdentity(name, sha256_state_dict(model.state_dict()), source)
    return model.eval()
