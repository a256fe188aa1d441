"""Benchmark: stage-2 training throughput of our T3 (adapters on) vs. a plain `transformers` model of the
same shape, side by side in one run — Llama T3 vs `LlamaForCausalLM`, or Turbo's GPT-2 T3 vs `GPT2LMHeadModel`.
Non-pad tokens/s, MFU, peak memory, eager and (``--compile``) compiled, and the ratios.

    uv run python -m bench.t3_throughput --preset 520m --device cuda --bf16 --compile   # on a GPU
    uv run python -m bench.t3_throughput --family turbo --preset 520m --device cuda --bf16 --compile
    uv run python -m bench.t3_throughput --preset tiny --steps 20                       # smoke run on CPU

Same rows for both: N synthetic rows with Chatterbox-like lengths (text 20–150 tokens, speech 50–600
tokens, + the conditioning and marker positions of the family's layout). *plain*: batches in random order
padded to the batch's longest row, attention mask, AdamW. *ours*: the stage-2 training forward
(`Stage2Model`: layout, adapters, loss) and optimizer (`make_optimizer`: fused AdamW on CUDA) over
length-bucketed batches (`BucketBatchSampler`, token budget), causal-only attention (no padding mask: exact
for real positions, see `T3.forward`), bf16 autocast, compiled as training compiles it (`t3.tfmr.compile`).
MFU = 6 · (non-embedding params) · tokens/s / peak FLOP/s (attention FLOPs left out, as in the usual
estimate; ``--peak-tflops`` or the H100/H200 dense bf16 figure). `measure` is what `bench.gpu` calls.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
GOAL_RATIO = 1.05  # ours compiled / plain compiled
GOAL_TOKENS_S = 130_000  # ours compiled, non-pad tokens/s on one H100-class GPU (Llama 520m)
TINY_TURBO = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=128,
                  instruction_dim=32, adapter_hidden=32, max_position_embeddings=2048)


@dataclass
class ThroughputConfig:
    preset: str = "tiny"  # "tiny" | "small" | "520m" (Turbo: "520m" = the official GPT-2 medium shape)
    family: str = "llama"  # "llama" | "turbo"
    device: str = "cpu"
    rows: int = 4096
    batch_size: int = 16  # rows per batch (plain); the cap for ours
    max_tokens: int = 0  # ours: token budget (0: batch_size × mean row length)
    steps: int = 30  # timed steps per model and mode (fewer when time_budget_s runs out)
    warmup: int = 5  # untimed steps first (compilation happens here)
    bf16: bool = False
    compile: bool = False  # also time each model compiled (the same instance, after its eager rows)
    compile_backend: str = "inductor"  # "eager": dynamo capture only (the CPU dry run)
    peak_tflops: float | None = None
    time_budget_s: float | None = None  # per model and mode: stop timing steps past it (≥ 2 timed steps)
    length_scale: float = 1.0  # row lengths × this (a dry run's short rows)
    seed: int = 0


def t3_config(family: str, preset: str):
    from tts_core.t3 import T3Config, turbo_config

    if family == "turbo":
        return turbo_config(**TINY_TURBO) if preset == "tiny" else turbo_config()
    return T3Config.preset(preset)


def _peak(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for k, v in PEAK_TFLOPS.items():
            if k in name:
                return v
    return None


def _rows(n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Text 20–150 and speech 50–600 tokens (× ``scale``: a dry run's short rows)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(int(20 * scale), int(150 * scale) + 1, n),
            rng.integers(int(50 * scale), int(600 * scale) + 1, n))


def prompt_len(cfg) -> int:
    """Prompt tokens per row: Llama's perceiver sees 150 (34 positions whatever); Turbo feeds its prompt raw,
    so instruction rows (no prompt: speaker position only) are used, the stage-2 case the adapters serve."""
    return cfg.speech_cond_prompt_len if cfg.perceiver else 0


def row_tokens(cfg, tl: np.ndarray, sl: np.ndarray) -> np.ndarray:
    """Non-pad positions of each row in the stage-2 layout: conditioning, [SOT] text [EOT], BOS speech EOS."""
    from tts_core.t3 import cond_lens

    cond = int(cond_lens(cfg, torch.tensor([prompt_len(cfg)]), 1)[0])
    return cond + tl + (2 if cfg.text_markers else 0) + sl + 2


def backbone_params(backbone: torch.nn.Module) -> int:
    """Non-embedding parameters of the transformer stack: the same count for both models, so MFU compares
    like with like (heads and embeddings, which differ between them, are left out, and so are the adapter MLPs:
    they run once per row, not per token)."""
    return sum(p.numel() for n, p in backbone.named_parameters()
               if not any(k in n.split(".")[0] for k in ("embed", "wte", "wpe")) and ".adapter." not in n)


def _step(loss_fn, opt: torch.optim.Optimizer, dev: str, amp: torch.dtype | None) -> None:
    """One optimizer step, identical for both models: autocast forward, backward, step."""
    with torch.autocast(device_type=dev.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
        loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, batches, warmup: int, device: str, budget_s: float | None = None) -> tuple[float, int, float]:
    """→ (timed seconds, timed batches, warm-up seconds). Timing stops once ``budget_s`` is spent (≥ 2 steps)."""
    t0 = time.perf_counter()
    for b in batches[:warmup]:
        step(b)
    _sync(device)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for b in batches[warmup:]:
        step(b)
        n += 1
        if budget_s is not None and n >= 2:
            _sync(device)
            if time.perf_counter() - t0 > budget_s:
                break
    _sync(device)
    return time.perf_counter() - t0, n, t_warm


def _peak_mem_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None


def _reset_mem(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def plain_model(cfg, device: str) -> torch.nn.Module:
    """The plain `transformers` LM of T3's backbone shape, one token table + head the size of T3's speech head."""
    if cfg.backbone == "gpt2":
        from transformers import GPT2LMHeadModel

        from tts_core.t3.turbo import gpt2_config

        gcfg = gpt2_config(cfg)
        gcfg.vocab_size = cfg.speech_vocab_size
        return GPT2LMHeadModel(gcfg).to(device)
    from transformers import LlamaForCausalLM

    lcfg = cfg.to_llama_config()
    lcfg.vocab_size = cfg.speech_vocab_size
    return LlamaForCausalLM(lcfg).to(device)


def ours_model(cfg, device: str):
    """T3 + adapters, trainable as stage 2 trains it (→ model, Stage2Model, optimizer)."""
    from tts_core.stage2.model import Stage2Model, make_optimizer
    from tts_core.stage2.config import Stage2Config
    from tts_core.t3 import t3_for_config

    t3 = t3_for_config(cfg.replace(adapters=True)).to(device)
    t3.tfmr.get_input_embeddings().requires_grad_(False)  # never read (inputs_embeds): frozen in stage 2 too
    t3.train()
    return t3, Stage2Model(t3), make_optimizer(t3, Stage2Config(), torch.device(device))


def make_t3_batch(cfg, tl: np.ndarray, sl: np.ndarray, seed: int):
    """A stage-2 batch of these rows: half instruction rows (adapters on), prompt tokens per `prompt_len`."""
    from tts_core.t3.model import T3Batch, T3Cond

    g = torch.Generator().manual_seed(seed)
    B, P = len(tl), prompt_len(cfg)
    text = torch.randint(1, 200, (B, int(tl.max())), generator=g)
    speech = torch.randint(0, 6561, (B, int(sl.max())), generator=g)
    inst = torch.arange(B) % 2 == 0
    cond = T3Cond(speaker_emb=torch.randn(B, cfg.speaker_embed_size, generator=g),
                  prompt_tokens=torch.randint(0, 6561, (B, max(P, 1)), generator=g),
                  prompt_lens=torch.full((B,), P, dtype=torch.long), emotion_adv=torch.full((B,), 0.5),
                  instruction_emb=torch.randn(B, cfg.instruction_dim, generator=g), instruction_mask=inst)
    return T3Batch(text_tokens=text, text_lens=torch.as_tensor(tl), speech_tokens=speech,
                   speech_lens=torch.as_tensor(sl), cond=cond), inst


def measure(c: ThroughputConfig) -> dict:
    """Both models, eager then compiled; → {"rows": [...], "ratio_eager", "ratio_compiled", "goals", ...}."""
    from tts_core.stage2.sampler import BucketBatchSampler

    dev, amp = c.device, (torch.bfloat16 if c.bf16 else None)
    cfg = t3_config(c.family, c.preset)
    tl, sl = _rows(c.rows, c.seed, c.length_scale)
    total = row_tokens(cfg, tl, sl)
    n_batches = c.warmup + c.steps
    rng = np.random.default_rng(c.seed + 1)
    peak = _peak(dev, c.peak_tflops)
    modes = ("eager", "compiled") if c.compile else ("eager",)
    out: list[dict] = []

    def record(model_name: str, mode: str, batches, timed: tuple[float, int, float], n_params: int) -> None:
        t, n, warm = timed
        used = batches[c.warmup:c.warmup + n]
        tok = int(sum(total[b].sum() for b in used))
        padded = int(sum(len(b) * total[b].max() for b in used))
        tps = tok / t
        out.append({"model": model_name, "mode": mode, "tokens_s": tps, "steps": n, "warmup_s": warm,
                     "mfu": 6 * n_params * tps / (peak * 1e12) if peak else None,
                     "peak_mem_gib": _peak_mem_gib(dev), "padding": 1 - tok / padded,
                     "backbone_params_m": n_params / 1e6})

    # ---- plain ---------------------------------------------------------------------------------------------
    torch.manual_seed(c.seed)
    plain = plain_model(cfg, dev)
    vocab = cfg.speech_vocab_size
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=dev.startswith("cuda") or None)
    order = rng.permutation(c.rows)
    plain_batches = list(np.resize(order, (n_batches, c.batch_size)))  # tiled when rows < batches × batch size

    def plain_step(rows):
        L = int(total[rows].max())
        ids = torch.randint(0, vocab, (len(rows), L), device=dev)
        mask = (torch.arange(L, device=dev)[None] < torch.as_tensor(total[rows], device=dev)[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        _step(lambda: plain(input_ids=ids, attention_mask=mask, labels=labels).loss, opt_p, dev, amp)

    n_plain = backbone_params(plain.base_model)
    for mode in modes:
        if mode == "compiled":
            plain.compile(dynamic=True, backend=c.compile_backend)
        _reset_mem(dev)
        record("plain", mode, plain_batches, time_steps(plain_step, plain_batches, c.warmup, dev, c.time_budget_s),
               n_plain)
    del plain, opt_p
    _reset_mem(dev)

    # ---- ours ----------------------------------------------------------------------------------------------
    torch.manual_seed(c.seed)
    t3, model, opt_o = ours_model(cfg, dev)
    max_tokens = c.max_tokens or int(c.batch_size * total.mean())
    sampler = BucketBatchSampler(total, batch_size=4 * c.batch_size, max_tokens=max_tokens, seed=c.seed)
    ours_batches = sampler.batches(0)
    ours_batches = (ours_batches * (-(-n_batches // len(ours_batches))))[:n_batches]
    prepared = {id(b): make_t3_batch(cfg, tl[b], sl[b], seed=i) for i, b in enumerate(ours_batches)}

    def ours_step(rows):
        batch, inst = prepared[id(rows)]
        _step(lambda: model(batch, inst)[0], opt_o, dev, amp)

    n_ours = backbone_params(t3.tfmr)
    for mode in modes:
        if mode == "compiled":
            t3.tfmr.compile(dynamic=True, backend=c.compile_backend)  # what Stage2Config(compile=True) does
        _reset_mem(dev)
        record("ours", mode, ours_batches, time_steps(ours_step, ours_batches, c.warmup, dev, c.time_budget_s),
               n_ours)
    del t3, model, opt_o
    _reset_mem(dev)

    by = {(r["model"], r["mode"]): r["tokens_s"] for r in out}
    res = {"family": c.family, "preset": c.preset, "bf16": c.bf16, "rows": out,
           "ratio_eager": by[("ours", "eager")] / by[("plain", "eager")]}
    if c.compile:
        res["ratio_compiled"] = by[("ours", "compiled")] / by[("plain", "compiled")]
        best = by[("ours", "compiled")]
        res["goals"] = {f"ours compiled ≥ {GOAL_RATIO}× plain compiled": res["ratio_compiled"] >= GOAL_RATIO}
        if c.family == "llama":
            res["goals"][f"ours compiled ≥ {GOAL_TOKENS_S:,} non-pad tokens/s"] = best >= GOAL_TOKENS_S
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--family", default="llama", choices=("llama", "turbo"))
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
    res = measure(ThroughputConfig(preset=a.preset, family=a.family, device=a.device, rows=a.rows,
                                   batch_size=a.batch_size, max_tokens=a.max_tokens, steps=a.steps, warmup=a.warmup,
                                   bf16=a.bf16, compile=a.compile, peak_tflops=a.peak_tflops))
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}  family: {a.family}  preset: {a.preset}  bf16: {a.bf16}  compile: {a.compile}")
    for r in res["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{r['model']:6s} {r['mode']:9s}: {r['tokens_s']:12,.0f} non-pad tokens/s   MFU {mfu}   peak {mem}   "
              f"padding {r['padding']:.1%}   ({r['backbone_params_m']:.1f}M backbone params)")
    print(f"ratio ours / plain: eager {res['ratio_eager']:.2f}x"
          + (f", compiled {res['ratio_compiled']:.2f}x" if "ratio_compiled" in res else ""))
    for goal, met in res.get("goals", {}).items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
