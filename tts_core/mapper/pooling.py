"""Instruction encoder: trainable attention pooling over a frozen text encoder's last hidden states.

    states [B, L, H] (frozen T5 / MiniLM output, padded) + lengths [B]
      → one learned query attends over the tokens (8-head attention, key-padding mask)
      → style_emb [B, H]            H = the text encoder's hidden size (1024 flan-t5-large, 384 MiniLM)

Two entry points give the same result for the same instruction:

* ``forward(states, lengths)`` — from cached states (training: no text encoder in memory);
* ``encode_text(texts, text_encoder)`` — from raw text (inference). The text encoder's fp32 states
  are rounded to the cache's storage dtype (float16) before pooling, exactly as training saw them,
  so inference never feeds the pooling something it was not trained on.

Precision (docs/architecture.md "Known failure modes" 1): the pooling always runs in fp32 with autocast disabled,
whatever the caller's autocast context; its parameters must stay fp32 (a bf16/fp16 copy is refused).
Device (failure mode 4): inputs are moved to the module's device, so a CPU tensor, a numpy array or a
list is accepted.

All-padding rows (length 0, e.g. an empty instruction): the softmax over no keys is undefined, so
such rows return an all-zero ``style_emb`` (finite, and with zero gradient). Documented contract.

Implementation note. Parameters live in a standard ``nn.MultiheadAttention`` (checkpoint keys
``attn.in_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj.*``), but the forward computes the
single-query attention in factored form, which is mathematically the same thing:

    score_h(j) = (W_q,h q + b_q,h) · (W_k,h s_j + b_k,h) / sqrt(d)
               = s_j · (W_k,hᵀ q_h) / sqrt(d) + const_h         (const cancels in the softmax)
    out_h      = Σ_j a_h(j) (W_v,h s_j + b_v,h) = W_v,h (Σ_j a_h(j) s_j) + b_v,h

so the keys and values of every token are never projected (cost O(B·L·H·heads) instead of
O(B·L·H²)) — this is what lets a 300k-row epoch fit the stage-1 speed budget. ``reference_forward``
calls ``nn.MultiheadAttention`` itself; a test proves both agree.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tts_core.identity import ModelIdentity


class TextEncoderMismatchError(ValueError):
    """The text encoder offered is not the one the instruction encoder was trained on."""


def _identity_of(x: Any) -> ModelIdentity | None:
    if x is None or isinstance(x, ModelIdentity):
        return x
    if isinstance(x, dict):
        return ModelIdentity.from_dict(x)
    ident = getattr(x, "identity", None)  # a TextEncoder
    return _identity_of(ident) if ident is not None else None


def check_text_encoder_identity(expected: Any, offered: Any, what: str = "this instruction encoder") -> None:
    """Raise `TextEncoderMismatchError` unless both identities name the same weights (name + sha256)."""
    exp, off = _identity_of(expected), _identity_of(offered)
    if exp is None or off is None:
        return
    if not exp.same_model(off):
        raise TextEncoderMismatchError(
            f"{what} was trained on text encoder {exp.name!r} (sha256 {exp.sha256[:12]}), but the text encoder "
            f"offered is {off.name!r} (sha256 {off.sha256[:12]}). Pooling weights only make sense over the hidden "
            "states they were trained on: use the same text-encoder weights (the ones the stage-1 cache was built "
            "with), or retrain stage 1 on a cache built with this encoder.")


def pad_states(arrays: Sequence[np.ndarray], hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    """List of [L_i, H] arrays → (float32 [B, Lmax, H] zero-padded, int64 lengths [B])."""
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), int(lengths.max(initial=0)), hidden_size), dtype=np.float32)
    for i, a in enumerate(arrays):
        a = np.asarray(a, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != hidden_size:
            raise ValueError(f"text encoder returned states of shape {a.shape}; expected [L, {hidden_size}]")
        out[i, : len(a)] = a
    return out, lengths


class InstructionEncoder(nn.Module):
    """One learned query, ``n_heads``-head attention over frozen text states → ``style_emb [B, H]``."""

    def __init__(self, hidden_size: int, n_heads: int = 8, states_dtype: torch.dtype | None = torch.float16):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by n_heads {n_heads}")
        self.hidden_size = int(hidden_size)
        self.n_heads = int(n_heads)
        self.head_dim = self.hidden_size // self.n_heads
        # Storage dtype of cached states; encode_text rounds to it so inference == training.
        self.states_dtype = states_dtype
        # Set by load_mapper: the identity of the text encoder the pooling was trained over.
        self.expected_text_encoder: ModelIdentity | None = None
        self.query = nn.Parameter(torch.randn(1, 1, self.hidden_size) * 0.02)
        self.attn = nn.MultiheadAttention(self.hidden_size, self.n_heads, batch_first=True)

    @property
    def out_dim(self) -> int:
        return self.hidden_size

    @property
    def device(self) -> torch.device:
        return self.query.device

    def _check_fp32(self) -> None:
        if self.query.dtype != torch.float32 or self.attn.in_proj_weight.dtype != torch.float32:
            raise TypeError(
                f"InstructionEncoder parameters are {self.query.dtype}; they must stay float32 (failure mode 1: "
                "fp16/bf16 NaNs in T5 + attention). Convert the rest of the model, not this module, to low precision.")

    def _inputs(self, states, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        states = torch.as_tensor(states).to(device=dev, dtype=torch.float32)
        lengths = torch.as_tensor(lengths).to(device=dev, dtype=torch.long)
        if states.ndim != 3 or states.shape[-1] != self.hidden_size:
            raise ValueError(f"states must be [B, L, {self.hidden_size}], got {tuple(states.shape)}")
        if lengths.shape != states.shape[:1]:
            raise ValueError(f"lengths must be [B={states.shape[0]}], got {tuple(lengths.shape)}")
        return states, lengths

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """states [B, L, H] (any float dtype, any device), lengths [B] → float32 [B, H].

        Positions ``>= lengths[b]`` are padding and get exactly zero attention. Rows with length 0 → zeros.
        """
        self._check_fp32()
        states, lengths = self._inputs(states, lengths)
        B, L, H = states.shape
        nh, d = self.n_heads, self.head_dim
        with torch.autocast(device_type=states.device.type, enabled=False):
            w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3, dim=0)  # each [H, H]
            b_q, _, b_v = self.attn.in_proj_bias.chunk(3, dim=0)
            q = F.linear(self.query.reshape(1, H), w_q, b_q).reshape(nh, d)  # projected query per head
            # u_h = W_k,hᵀ q_h / sqrt(d): the key projection folded into the query.
            u = torch.einsum("hd,hdi->hi", q, w_k.reshape(nh, d, H)) / math.sqrt(d)  # [nh, H]
            scores = torch.einsum("bli,hi->bhl", states, u)  # [B, nh, L]
            pad = torch.arange(L, device=states.device)[None, :] >= lengths[:, None]  # [B, L] True = padding
            empty = lengths <= 0
            scores = scores.masked_fill(pad[:, None, :], float("-inf"))
            scores = scores.masked_fill(empty[:, None, None], 0.0)  # keeps the softmax finite; row zeroed below
            attn = torch.softmax(scores, dim=-1)
            pooled = torch.einsum("bhl,bli->bhi", attn, states)  # [B, nh, H]
            heads = torch.einsum("bhi,hdi->bhd", pooled, w_v.reshape(nh, d, H)) + b_v.reshape(nh, d)
            out = self.attn.out_proj(heads.reshape(B, H))
            return torch.where(empty[:, None], torch.zeros_like(out), out)

    def reference_forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The same pooling through ``nn.MultiheadAttention`` itself (slow path; tests and audits only)."""
        self._check_fp32()
        states, lengths = self._inputs(states, lengths)
        B, L, _ = states.shape
        with torch.autocast(device_type=states.device.type, enabled=False):
            pad = torch.arange(L, device=states.device)[None, :] >= lengths[:, None]
            empty = lengths <= 0
            pad = pad & ~empty[:, None]
            if L == 0:
                states = states.new_zeros(B, 1, self.hidden_size)
                pad = torch.zeros(B, 1, dtype=torch.bool, device=states.device)
            out, _ = self.attn(self.query.expand(B, 1, -1), states, states, key_padding_mask=pad, need_weights=False)
            out = out[:, 0]
            return torch.where(empty[:, None], torch.zeros_like(out), out)

    def encode_text(self, texts: Sequence[str], text_encoder, states_dtype: torch.dtype | None | str = "cache",
                    batch_size: int = 256) -> torch.Tensor:
        """Raw instruction texts → float32 [B, H] style embeddings (inference path).

        ``text_encoder`` meets `tts_core.encoders.base.TextEncoder` (``encode(texts) -> list[[L, H]]``,
        ``hidden_size``, ``identity``). Its identity is checked against the one this encoder was trained
        over (when known). ``states_dtype="cache"`` rounds the states to ``self.states_dtype`` (the cache's
        storage dtype) so the result equals ``forward`` on cached states; ``None`` skips the rounding.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        hs = getattr(text_encoder, "hidden_size", self.hidden_size)
        if hs != self.hidden_size:
            raise TextEncoderMismatchError(
                f"text encoder hidden size {hs} != instruction encoder hidden size {self.hidden_size}")
        check_text_encoder_identity(self.expected_text_encoder, text_encoder)
        dtype = self.states_dtype if states_dtype == "cache" else states_dtype
        outs = []
        for i in range(0, len(texts), batch_size):
            arrays = text_encoder.encode(texts[i:i + batch_size])
            padded, lengths = pad_states(arrays, self.hidden_size)
            states = torch.from_numpy(padded)
            if dtype is not None:
                states = states.to(dtype)
            outs.append(self(states, lengths))
        if not outs:
            return torch.zeros(0, self.hidden_size, device=self.device)
        return torch.cat(outs)
