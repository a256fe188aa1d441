"""Benchmark: stage-2 training throughput of our T3 (adapters on) vs. a plain `transformers` Llama of the
same shape, side by side in one run. Prints non-pad tokens/s, MFU and the ratio.

    uv run python -m bench.t3_throughput --preset 520m --device cuda --bf16 --compile   # on a GPU
    uv run python -m bench.t3_throughput --preset tiny --steps 20                       # smoke run on CPU

Same rows for both: N synthetic rows with Chatterbox-like lengths (text 20–150 tokens, speech 50–600
tokens, + 34 conditioning and 4 special positions). *plain*: `LlamaForCausalLM`, batches in random
order padded to the batch's longest row, attention mask, AdamW. *ours*: `T3` with AdaRMSNorm adapters,
the stage-2 path — length-bucketed batches (`BucketBatchSampler`, token budget), causal-only attention
(no padding mask: exact for real positions, see `T3.forward`), fused AdamW on CUDA, bf16 autocast and
optionally `torch.compile` of the backbone. MFU = 6 · (non-embedding params) · tokens/s / peak FLOP/s
(attention FLOPs left out, as in the usual estimate; ``--peak-tflops`` or the H100/H200 dense bf16 figure).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
COND = 34


def _peak(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for k, v in PEAK_TFLOPS.items():
            if k in name:
                return v
    return None


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 151, n), rng.integers(50, 601, n)


def _non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "emb" not in n and p.requires_grad)


def _step(loss_fn, opt: torch.optim.Optimizer, dev: str, amp: torch.dtype | None) -> None:
    """One optimizer step, identical for both models: autocast forward, backward, step."""
    with torch.autocast(device_type=dev.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
        loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _time(step, batches, warmup: int, device: str) -> float:
    for b in batches[:warmup]:
        step(b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per batch (plain); cap for ours")
    ap.add_argument("--max-tokens", type=int, default=0, help="ours: token budget (default batch-size × mean length)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float)
    a = ap.parse_args()

    from transformers import LlamaForCausalLM

    from tts_core.stage2.data import BucketBatchSampler
    from tts_core.t3 import T3, T3Config
    from tts_core.t3.model import T3Batch, T3Cond

    dev, amp = a.device, (torch.bfloat16 if a.bf16 else None)
    cfg = T3Config.preset(a.preset)
    tl, sl = _rows(a.rows, 0)
    total = COND + tl + 2 + sl + 2
    steps = a.warmup + a.steps
    rng = np.random.default_rng(1)

    # ---- plain Llama -------------------------------------------------------------------------------------
    torch.manual_seed(0)
    lcfg = cfg.to_llama_config()
    lcfg.vocab_size = cfg.speech_vocab_size  # one token table + LM head the size of T3's speech head
    plain = LlamaForCausalLM(lcfg).to(dev)
    vocab = lcfg.vocab_size
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=dev.startswith("cuda") or None)
    order = rng.permutation(a.rows)
    plain_batches = [order[i * a.batch_size:(i + 1) * a.batch_size] for i in range(steps)]

    def plain_step(rows):
        L = int(total[rows].max())
        ids = torch.randint(0, vocab, (len(rows), L), device=dev)
        mask = (torch.arange(L, device=dev)[None] < torch.as_tensor(total[rows], device=dev)[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        _step(lambda: plain(input_ids=ids, attention_mask=mask, labels=labels).loss, opt_p, dev, amp)

    t_plain = _time(plain_step, plain_batches, a.warmup, dev)
    tok_plain = int(sum(total[b].sum() for b in plain_batches[a.warmup:]))
    n_plain = _non_embedding_params(plain)
    del plain, opt_p

    # ---- ours --------------------------------------------------------------------------------------------
    torch.manual_seed(0)
    t3 = T3(cfg.replace(adapters=True)).to(dev)
    if a.compile:
        t3.tfmr.compile(dynamic=True)
    opt_o = torch.optim.AdamW([p for p in t3.parameters() if p.requires_grad], lr=1e-4,
                              fused=dev.startswith("cuda") or None)
    max_tokens = a.max_tokens or int(a.batch_size * total.mean())
    sampler = BucketBatchSampler(total, batch_size=4 * a.batch_size, max_tokens=max_tokens, seed=0)
    ours_batches = sampler.batches(0)[:steps]

    def ours_step(rows):
        B = len(rows)
        text = torch.randint(1, 200, (B, int(tl[rows].max())))
        speech = torch.randint(0, 6561, (B, int(sl[rows].max())))
        cond = T3Cond(speaker_emb=torch.randn(B, cfg.speaker_embed_size), prompt_tokens=torch.zeros(B, 1, dtype=torch.long),
                      prompt_lens=torch.zeros(B, dtype=torch.long), instruction_emb=torch.randn(B, cfg.instruction_dim),
                      instruction_mask=torch.ones(B, dtype=torch.bool))
        batch = T3Batch(text_tokens=text, text_lens=torch.as_tensor(tl[rows]), speech_tokens=speech,
                        speech_lens=torch.as_tensor(sl[rows]), cond=cond)
        _step(lambda: t3(batch, padding_mask=False).loss, opt_o, dev, amp)

    t_ours = _time(ours_step, ours_batches, a.warmup, dev)
    tok_ours = int(sum(total[b].sum() for b in ours_batches[a.warmup:]))
    n_ours = _non_embedding_params(t3)

    peak = _peak(dev, a.peak_tflops)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}  preset: {a.preset}  bf16: {a.bf16}  compile: {a.compile}  rows: {a.rows}")
    for label, tok, t, n in (("plain Llama", tok_plain, t_plain, n_plain), ("T3 + adapters", tok_ours, t_ours, n_ours)):
        tps = tok / t
        mfu = f"{100 * 6 * n * tps / (peak * 1e12):.1f}%" if peak else "n/a (no peak FLOP/s for this device)"
        print(f"{label:14s}: {tps:12,.0f} non-pad tokens/s   MFU {mfu}   ({n / 1e6:.1f}M non-embedding params)")
    print(f"padding: plain {1 - tok_plain / sum(len(b) * total[b].max() for b in plain_batches[a.warmup:]):.1%}, "
          f"ours {1 - tok_ours / sum(len(b) * total[b].max() for b in ours_batches[a.warmup:]):.1%}")
    print(f"ratio ours / plain: {(tok_ours / t_ours) / (tok_plain / t_plain):.2f}x")


if __name__ == "__main__":
    main()
