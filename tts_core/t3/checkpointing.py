"""Activation checkpointing of T3's backbone that keeps the adapters exact (`train-stage2 --activation-checkpointing`).

The backbone's own HF checkpointing (`activation_checkpointing_enable`, formerly `gradient_checkpointing_enable`)
recomputes each decoder layer in backward. The adapters read their modulation (γ, β) from module state that
`T3.instruction_scope` sets before the backbone call and clears after it (`tts_core.t3.adapters`), so a plain
recompute would run the norms *without* the instruction: other activations, wrong gradients. Here each
checkpointed call snapshots every adapter's modulation when it runs forward (non-reentrant checkpoint's
``context_fn``) and puts that snapshot back for its recompute. The recompute then sees the very γ, β tensors of the
forward, and their gradients flow to the adapter MLPs through the original graph (non-reentrant checkpointing
keeps the forward graph and only regenerates the saved activations). `T3.instruction_scope` refuses checkpointing
switched on any other way.

Caching: a checkpointed layer cannot write a KV cache; the backbone's ``config.use_cache`` is set False (training
calls pass ``use_cache=False`` anyway) and HF switches checkpointing off outside train mode, so generation
(eval mode, KV cache) is unaffected.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from tts_core.t3.adapters import AdaptiveNorm, find_adaptive_norms

ADAPTER_AWARE = "_adapter_aware_checkpointing"  # set on the T3 by `enable_activation_checkpointing`


@contextlib.contextmanager
def _restored(snapshot: list[tuple[AdaptiveNorm, object]]) -> Iterator[None]:
    """Put the forward-time modulations back for one recompute, then restore whatever was set before."""
    before = [(a, a._modulation) for a, _ in snapshot]
    try:
        for a, mod in snapshot:
            a._modulation = mod
        yield
    finally:
        for a, mod in before:
            a._modulation = mod


def enable_activation_checkpointing(t3: nn.Module) -> None:
    """Checkpoint every backbone layer of ``t3`` (Llama or Turbo's GPT-2), adapters included (module doc)."""
    adapters = find_adaptive_norms(t3.tfmr)

    def context_fn():
        snapshot = [(a, a._modulation) for a in adapters]
        return contextlib.nullcontext(), _restored(snapshot)

    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    enable = getattr(t3.tfmr, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        t3.tfmr.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    t3.tfmr.config.use_cache = False
    setattr(t3, ADAPTER_AWARE, True)


def activation_checkpointing_on(t3: nn.Module) -> bool:
    """True when any backbone module checkpoints (however it was switched on)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in t3.tfmr.modules())
