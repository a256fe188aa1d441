"""Adaptive norms: instruction-conditioned modulation of the backbone's norms.

    out = norm(x) · (1 + γ) + β,      [γ, β] = fc2(SiLU(fc1(instruction_emb)))

One wrapper (`AdaptiveNorm`) for any norm module: `AdaRMSNorm` around the Llama RMSNorms (EN and
multilingual T3), `AdaLayerNorm` around GPT-2's LayerNorms `ln_1` / `ln_2` / `ln_f` (Turbo T3).
`fc2` starts at zero, so a fresh adapter is exactly the identity and a pretrained Chatterbox T3 is
reproduced bit for bit. Rows without an instruction (no context set, or mask 0) get exactly
`norm(x)`.

Checkpoint compatibility: `attach_adaptive_norms` / `attach_adaptive_layernorms` swap each norm for
a wrapper that *owns the very same Parameters* (`weight`, and `bias` for a LayerNorm) under the same
attribute names, so `tfmr.layers.0.input_layernorm.weight` / `tfmr.h.0.ln_1.bias` are still the
norm's own tensors. The adapter's parameters live under `<norm path>.adapter.fc1/fc2` — the only
keys an official checkpoint lacks (`is_adapter_key`). The norm math is not rewritten: the wrapped
norm class's own `forward` runs on this module (it reads only the parameters and the plain
attributes — `variance_epsilon`, or `normalized_shape` / `eps` — copied here).

How the instruction reaches the norms: the decoder layer calls `norm(x)` with nothing else, so T3
sets the instruction on every adapter right before the backbone runs and clears it right after
(`instruction_context`). The modulation (γ, β) is computed once at set time — in fp32 with
autocast disabled (failure mode 1, docs/architecture.md) — and held on the module, so a generation loop computes
it once, not per token. The state is a per-module attribute of this model instance: DDP replicas
(one process each) never share it. Activation checkpointing recomputes the norms in backward, after
the context is cleared: `tts_core.t3.checkpointing` puts each call's modulation back for its
recompute, and `T3` refuses checkpointing switched on any other way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn
import torch.nn.functional as F

ADAPTER_ATTR = "adapter"


def is_adapter_key(key: str) -> bool:
    """True for state-dict keys that belong to an adapter MLP (absent from official checkpoints)."""
    return f".{ADAPTER_ATTR}." in f".{key}"


class AdaptiveModulation(nn.Module):
    """instruction_emb [B, D] → (γ, β), each [B, hidden]. Last layer zero-initialised."""

    def __init__(self, instruction_dim: int, adapter_hidden: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(instruction_dim, adapter_hidden)
        self.fc2 = nn.Linear(adapter_hidden, 2 * hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, instruction_emb: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 whatever the parameter dtype or the surrounding autocast (failure mode 1).
        with torch.autocast(device_type=instruction_emb.device.type, enabled=False):
            e = instruction_emb.float()
            h = F.silu(F.linear(e, self.fc1.weight.float(), self.fc1.bias.float()))
            out = F.linear(h, self.fc2.weight.float(), self.fc2.bias.float())
        gamma, beta = out.chunk(2, dim=-1)
        return gamma, beta


class AdaptiveNorm(nn.Module):
    """Wraps one norm module, keeping its Parameters (same objects, same names) and plain attributes."""

    param_names: tuple[str, ...] = ()  # exactly the wrapped norm's own parameters

    def __init__(self, norm: nn.Module, instruction_dim: int, adapter_hidden: int):
        super().__init__()
        own = dict(norm.named_parameters(recurse=False))
        if set(own) != set(self.param_names) or list(norm.children()) or list(norm.buffers()):
            raise TypeError(f"{type(self).__name__} wraps a norm with parameters {self.param_names}, got {norm!r}")
        for name, param in own.items():
            setattr(self, name, param)  # the same Parameter object: official key path unchanged
        for name, value in vars(norm).items():  # eps / normalized_shape / variance_epsilon ...
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self._norm_forward = type(norm).forward  # the wrapped class's own norm code
        hidden = norm.weight.shape[0]
        self.adapter = AdaptiveModulation(instruction_dim, adapter_hidden, hidden)
        self._modulation: tuple[Tensor, Tensor] | None = None

    # -- instruction context -------------------------------------------------------
    def set_instruction(self, instruction_emb: Tensor | None, mask: Tensor | None = None) -> None:
        """instruction_emb [B, D] (None: plain norm). mask [B] bool/0-1: rows with 0 get norm(x)."""
        if instruction_emb is None:
            self._modulation = None
            return
        gamma, beta = self.adapter(instruction_emb)
        if mask is not None:
            keep = mask.to(device=gamma.device, dtype=torch.bool).reshape(-1, 1)
            gamma = torch.where(keep, gamma, torch.zeros_like(gamma))
            beta = torch.where(keep, beta, torch.zeros_like(beta))
        self._modulation = (gamma[:, None, :], beta[:, None, :])  # [B, 1, hidden]

    def clear_instruction(self) -> None:
        self._modulation = None

    @property
    def has_instruction(self) -> bool:
        return self._modulation is not None

    # -- forward -------------------------------------------------------------------
    def forward(self, hidden_states: Tensor) -> Tensor:
        normed = self._norm_forward(self, hidden_states)
        if self._modulation is None:
            return normed
        gamma, beta = self._modulation
        if gamma.shape[0] != normed.shape[0]:
            raise RuntimeError(
                f"instruction batch {gamma.shape[0]} != hidden-state batch {normed.shape[0]}"
            )
        # normed·(1+γ)+β written so that γ=β=0 returns `normed` exactly in any dtype.
        return normed + normed * gamma.to(normed.dtype) + beta.to(normed.dtype)

    def extra_repr(self) -> str:
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
        return f"{tuple(self.weight.shape)}, eps={eps}"


class AdaRMSNorm(AdaptiveNorm):
    """Around a `LlamaRMSNorm` (`weight`, `variance_epsilon`)."""

    param_names = ("weight",)


class AdaLayerNorm(AdaptiveNorm):
    """Around an `nn.LayerNorm` (`weight`, `bias`, `normalized_shape`, `eps`): GPT-2's ln_1 / ln_2 / ln_f."""

    param_names = ("weight", "bias")


def _wrap_norms(targets: Iterable[tuple[nn.Module, str]], kind: type[AdaptiveNorm], instruction_dim: int,
                adapter_hidden: int) -> list[AdaptiveNorm]:
    """Replace `getattr(parent, attr)` by a `kind` wrapper for each target, in order. Idempotent."""
    adapters: list[AdaptiveNorm] = []
    for parent, attr in targets:
        current = getattr(parent, attr)
        if not isinstance(current, kind):
            current = kind(current, instruction_dim, adapter_hidden).to(device=current.weight.device)
            setattr(parent, attr, current)
        adapters.append(current)
    return adapters


def attach_adaptive_norms(
    llama_model: nn.Module,
    instruction_dim: int,
    adapter_hidden: int,
    *,
    include_final_norm: bool = False,
) -> list[AdaptiveNorm]:
    """Replace every decoder layer's `input_layernorm` / `post_attention_layernorm` (and, if
    asked, the final `norm`) of a transformers `LlamaModel` in place. Returns the adapters in
    module order. Idempotent: already-wrapped norms are left as they are."""
    targets = [(layer, attr) for layer in llama_model.layers for attr in ("input_layernorm", "post_attention_layernorm")]
    if include_final_norm:
        targets.append((llama_model, "norm"))
    return _wrap_norms(targets, AdaRMSNorm, instruction_dim, adapter_hidden)


def attach_adaptive_layernorms(
    gpt2_model: nn.Module,
    instruction_dim: int,
    adapter_hidden: int,
    *,
    include_final_norm: bool = True,
) -> list[AdaptiveNorm]:
    """The same for a transformers `GPT2Model` (Turbo): every block's `ln_1` / `ln_2`, then `ln_f`."""
    targets = [(block, attr) for block in gpt2_model.h for attr in ("ln_1", "ln_2")]
    if include_final_norm:
        targets.append((gpt2_model, "ln_f"))
    return _wrap_norms(targets, AdaLayerNorm, instruction_dim, adapter_hidden)


def find_adaptive_norms(module: nn.Module) -> list[AdaptiveNorm]:
    return [m for m in module.modules() if isinstance(m, AdaptiveNorm)]


@contextmanager
def instruction_context(
    adapters: Iterable[AdaptiveNorm], instruction_emb: Tensor | None, mask: Tensor | None = None
) -> Iterator[None]:
    """Set the instruction on every adapter for the duration of one backbone call (or one
    generation loop), then clear it even if the call raises."""
    adapters = list(adapters)
    try:
        for a in adapters:
            a.set_instruction(instruction_emb, mask)
        yield
    finally:
        for a in adapters:
            a.clear_instruction()
