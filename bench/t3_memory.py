"""Benchmark: stage-2 peak memory against the token budget, with and without activation checkpointing, and
the largest budget that fits (the `bench.gpu` "memory" part).

    uv run python -m bench.t3_memory --device cuda            # 520m, bf16, ladder of budgets until OOM

On CUDA each rung is two real training steps (`Stage2Model` + `make_optimizer`, bf16 autocast, eager) of one
batch of ~``budget`` tokens; peak = `torch.cuda.max_memory_allocated`. A least-squares line peak = a + b·tokens
over the rungs that fit gives the fit for other cards. Without CUDA (or below the measured rungs) the *derived*
model is used, marked as an estimate: fixed = parameters × 16 bytes (fp32 weights, grads, two AdamW moments),
per token = the activations a layer keeps for backward under bf16 autocast (fp32 residual stream and norms, bf16
matmul inputs/outputs: ~30·H + 8·I bytes per layer, every layer without checkpointing, one layer + each layer's
input with it) + the speech head's logits (bf16 out, fp32 copy and softmax: 10 bytes × vocab).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import numpy as np
import torch

CARDS_GB = (24, 48, 80)
HEADROOM = 0.9  # of a card's memory, for the allocator's fragmentation and the CUDA context


@dataclass
class MemoryConfig:
    preset: str = "520m"
    device: str = "cpu"
    budgets: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072, 262144, 524288)  # tokens per batch
    row_tokens: int = 700  # one row ≈ Chatterbox's mean (34 + ~87 text + ~325 speech… rounded up to a long row)
    bf16: bool = True
    checkpointing: tuple[bool, ...] = (False, True)
    steps: int = 2  # per rung: the first allocates AdamW's moments
    cards_gb: tuple[int, ...] = field(default=CARDS_GB)


def derived_model(cfg, checkpointing: bool) -> tuple[float, float]:
    """(fixed bytes, bytes per token) of a stage-2 step (module doc) — an estimate, not a measurement."""
    from tts_core.t3 import t3_for_config

    with torch.device("meta"):
        n = sum(p.numel() for p in t3_for_config(cfg.replace(adapters=True)).parameters())
    H, inter, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    layer = 30 * H + 8 * inter
    acts = (L * 4 * H + layer) if checkpointing else L * layer
    return 16.0 * n, float(acts + 10 * cfg.speech_vocab_size)


def fits(fixed: float, per_token: float, card_gb: float) -> int:
    """Largest token budget whose peak stays under HEADROOM of the card (0: not even the weights)."""
    return max(0, int((HEADROOM * card_gb * 1e9 - fixed) / per_token))


def _rung(model, opt, cfg, budget: int, row_tokens: int, steps: int, amp) -> float:
    from bench.t3_throughput import make_t3_batch, row_tokens as layout_tokens

    extra = int(layout_tokens(cfg, np.array([0]), np.array([0]))[0])  # conditioning + markers
    tl = max(1, (row_tokens - extra) // 5)
    sl = max(1, row_tokens - extra - tl)
    B = max(1, budget // row_tokens)
    batch, inst = make_t3_batch(cfg, np.full(B, tl), np.full(B, sl), seed=0)
    dev = model.t3.device
    torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
    for _ in range(steps):
        with torch.autocast(device_type=dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(batch, inst)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return float("nan")


def measure(c: MemoryConfig) -> dict:
    """→ {"modes": {"off"|"on": {"rungs": [...], "largest_fit", "fixed_gb", "per_token_kb", "source"}}, "cards": ...}"""
    from bench.t3_throughput import ours_model
    from tts_core.t3 import T3Config, enable_activation_checkpointing

    cfg = T3Config.preset(c.preset)
    amp = torch.bfloat16 if c.bf16 else None
    cuda = c.device.startswith("cuda")
    modes = {}
    for ckpt in c.checkpointing:
        t3, model, opt = ours_model(cfg, c.device)
        if ckpt:
            enable_activation_checkpointing(t3)
        rungs, largest = [], 0
        for budget in c.budgets:
            try:
                peak = _rung(model, opt, cfg, budget, c.row_tokens, c.steps, amp)
            except torch.OutOfMemoryError:
                rungs.append({"tokens": budget, "peak_gb": None, "oom": True})
                break
            finally:
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
            rungs.append({"tokens": budget, "peak_gb": peak / 1e9 if cuda else None, "oom": False})
            largest = budget
        fixed, per_token = derived_model(cfg, ckpt)
        source = "derived (estimate)"
        ok = [r for r in rungs if r["peak_gb"] is not None]
        if cuda and len(ok) >= 2:
            b, a = np.polyfit([r["tokens"] for r in ok], [r["peak_gb"] * 1e9 for r in ok], 1)
            fixed, per_token, source = float(a), float(b), "measured (line through the rungs that fit)"
        modes["on" if ckpt else "off"] = {
            "rungs": rungs, "largest_fit": largest, "fixed_gb": fixed / 1e9, "per_token_kb": per_token / 1e3,
            "source": source, "cards": {str(g): fits(fixed, per_token, g) for g in c.cards_gb}}
        del t3, model, opt
        if cuda:
            torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else None
    return {"preset": c.preset, "device_gb": total, "modes": modes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="520m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    c = MemoryConfig(preset=a.preset, device=a.device)
    if not a.device.startswith("cuda"):
        c.budgets = (256, 512)  # a CPU run checks the code path; the figures are the derived model
    print(json.dumps(measure(c), indent=1))


if __name__ == "__main__":
    main()
