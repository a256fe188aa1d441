"""Benchmark: the mean of K mapper draws (what stage 2's instruction tables and synthesis receive), one run.

    uv run python -m bench.mapper_draws [--rows 512] [--draws 64] [--threads 1] [--device cpu]

*stacked* (`InstructionMapper.inference`): the K draws integrate as one [K, B, dim] batch, so the conditioning
(time + instruction → AdaLN modulations, most of the mapper's FLOPs) is computed once per row and Euler step.
*per draw* (how it was done before): K separate integrations of [B, dim], each recomputing the conditioning.
Prints both times, their ratio and the largest difference between the vectors (the two are the same arithmetic).
The lab's default mapper (hidden 256, 4 blocks, 384-d MiniLM instructions) at random weights.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_draw(mapper, style: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    decoded = [mapper.decode(mapper.sample(style, noise=noise[i])) for i in range(noise.shape[0])]
    return tuple(F.normalize(torch.stack([d[v] for d in decoded]).mean(0), dim=-1) for v in range(2))


def main(argv: list[str] | None = None) -> dict:
    from tts_core.mapper.flow import InstructionMapper, MapperConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = InstructionMapper(MapperConfig(cond_dim=384, hidden_dim=256, n_blocks=4)).to(a.device).eval()
    for p in m.parameters():  # adaLN-zero init would make the velocity net a no-op
        p.data.normal_(0, 0.05)
    style = torch.randn(a.rows, 384, device=a.device)
    noise = torch.randn(a.draws, a.rows, m.config.dim)
    t = time.perf_counter()
    stacked = m.inference(style, noise=noise, draws=a.draws)
    t_stacked = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        old = per_draw(m, style, noise)
    t_old = time.perf_counter() - t
    diff = max(float((x - y).abs().max()) for x, y in zip(stacked, old))
    out = {"rows": a.rows, "draws": a.draws, "stacked_s": t_stacked, "per_draw_s": t_old,
           "speedup": t_old / t_stacked, "max_abs_diff": diff}
    print(f"{a.rows} rows x {a.draws} draws ({a.threads} thread(s), {a.device}): stacked {t_stacked:.2f} s, "
          f"per draw {t_old:.2f} s, {t_old / t_stacked:.2f}x; largest vector difference {diff:.1e}")
    return out


if __name__ == "__main__":
    main()
