"""Instruction mapper: conditional flow matching from ``style_emb`` to a voice.

Target (fixed, never learned — a trainable target projector collapses):

    x1 = [ spk_emb (256) | x_vector (192) | zeros (64) ]      both vectors L2-normalised first

(raw CAM++ norms are ~14 vs 1 for the VoiceEncoder, so without normalisation the MSE ignores the
speaker embedding). ``make_target`` is the one function that builds it.

The flow runs on ``target_scale · x1`` (a fixed constant, default 16 = √(512/2), so ‖x1‖ ≈ ‖x0‖ ≈ √512
with x0 ~ N(0, I)). With unit-norm x1 against 512-d unit-variance noise, the voice is ~1/16 of the
signal the velocity MSE sees, and learning crawls: on the structured synthetic test (8 voices, 400
steps of 128) held-out AvgCos was 0.06 at scale 1 (0.60 after 1200 steps) vs 0.79 at scale 16. The
scale is not learned (no collapse risk), the heads' outputs are L2-normalised and the metrics are
cosines, so it changes nothing downstream. ``target_scale=1.0`` reproduces the unscaled recipe.

Network (read top to bottom):

    t ∈ [0,1] ── sinusoidal(256) ─ Linear ─ SiLU ─ Linear ──┐
    style_emb [B, H] ──────────── Linear(H → 512) ──────────┴─(+)→ c [B, 512]
    x_t [B, 512] ─ Linear ─ 6 × AdaLN residual MLP block(c) ─ AdaLN final ─ Linear → v [B, 512]
    heads: Linear(512 → 256) → spk_emb, Linear(512 → 192) → x_vector   (outputs L2-normalised)

AdaLN blocks are adaLN-Zero (DiT): LayerNorm without affine, shift/scale/gate from c, gate and the
final projection zero-initialised, so an untrained network predicts v = 0. The heads start as the
exact slices of x1 (identity on the spk / x-vector parts), so an untrained head decodes a perfect x1
perfectly.

Training (linear path, x0 ~ N(0, I), t ~ U(0, 1)):

    x_t = (1 − t)·x0 + t·x1,   v* = x1 − x0,       (x1 here already multiplied by target_scale)   L_fm = MSE(v_pred, v*)
    L   = L_fm + recon_weight · L_recon,   L_recon = mean of (1 − cos) for spk and x-vector heads

* phase 1 (``use_predicted_recon=False``): the heads reconstruct from the ground-truth x1 — they learn
  to read the target layout; the velocity field gets gradient only from L_fm.
* phase 2 (``use_predicted_recon=True``): the heads reconstruct from the one-step estimate
  ``x1_pred = x_t + v_pred·(1 − t)``, so L_recon also trains the velocity field and the heads see the
  kind of (imperfect) vector they will decode at inference. Run with a lower LR, from phase 1's best.

Inference: ``n_steps`` Euler steps of dx/dt = v(x, t, c) from x0 = temperature · ε, ε ~ N(0, I) (seeded),
heads, L2-norm. A sampling temperature below 1 (as in Glow-TTS / Matcha-TTS) trades diversity for
fidelity while the flow is still broad: on the embedded corpus (300 clips, 600 steps) held-out AvgCos was
0.745 at temperature 1.0, 0.815 at 0.3, 0.80 at 0.6 (one draw). Exactly 0 is *not* safe: training never shows the
network x_t ≈ 0 at t = 0, and an early checkpoint once decoded AvgCos −0.03 from it. The configured temperature is
used everywhere the mapper is sampled (held-out evaluation, stage-2 instruction rows,
synthesis), so what stage 1 reports is what stage 2 and synthesis get.

``draws`` averages K decoded draws per vector (then L2-normalises): the mean of K samples estimates the
conditional mean, which a cosine rewards, at the price of voice variety (one draw keeps it; ``draws=1`` and a
given seed give exactly the K = 1 vectors, and draw 0 of K is that same vector). The lab measures the curve
(docs/lab.md "Stage 1 with the real CAM++ x-vector") and the run records the choice in ``mapper.json``. The defaults
are that measurement's choice, 64 draws at T 0.8 (`tts_core.recipe`): the mean of 64 draws beat one draw at any
temperature on held-out cosines (pass ``draws=1`` for the most voice variety across seeds).
Always fp32 with autocast disabled, so the vectors stage 2 consumes do not depend on its AMP context.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tts_core.recipe import MAPPER_DRAWS, MAPPER_TEMPERATURE

SPK_DIM = 256
XVEC_DIM = 192
TARGET_DIM = 512  # 256 + 192 + 64 zero pad


def make_target(spk: torch.Tensor, xvec: torch.Tensor, dim: int = TARGET_DIM) -> torch.Tensor:
    """Fixed flow target: ``[normalize(spk) | normalize(xvec) | zeros]`` → float32 [B, dim]. Pure function."""
    spk = F.normalize(spk.float(), dim=-1)
    xvec = F.normalize(xvec.float(), dim=-1)
    pad = dim - spk.shape[-1] - xvec.shape[-1]
    if pad < 0:
        raise ValueError(f"target dim {dim} < spk {spk.shape[-1]} + xvec {xvec.shape[-1]}")
    return torch.cat([spk, xvec, spk.new_zeros(*spk.shape[:-1], pad)], dim=-1)


@dataclass
class MapperConfig:
    cond_dim: int | None = None  # = the text encoder's hidden size; read from the data, never hard-coded
    dim: int = TARGET_DIM  # flow space: spk 256 | xvec 192 | pad 64
    hidden_dim: int = 1024  # inner width of each residual MLP
    n_blocks: int = 6
    time_dim: int = 256  # sinusoidal features
    spk_dim: int = SPK_DIM
    xvec_dim: int = XVEC_DIM
    n_steps: int = 10  # Euler steps at inference
    # inference starts from temperature · N(0, I), ``draws`` decoded draws averaged per inferred vector (module doc,
    # "Inference"); defaults: the lab's measured recipe (tts_core.recipe: the mean of 64 draws at T 0.8)
    temperature: float = MAPPER_TEMPERATURE
    draws: int = MAPPER_DRAWS
    recon_weight: float = 1.0
    target_scale: float = 16.0  # x1 = target_scale · make_target(...): fixed, ≈ noise scale (module doc)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MapperConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> torch.Tensor:
    """t [B] in [0, 1] → [B, dim] (cos | sin), t scaled by 1000 as in diffusion models."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class AdaLNBlock(nn.Module):
    """x + gate(c) · MLP(LN(x)·(1 + scale(c)) + shift(c)), adaLN-Zero init."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 3 * dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.fc2(F.silu(self.fc1(h)))


class InstructionMapper(nn.Module):
    def __init__(self, config: MapperConfig):
        super().__init__()
        if config.cond_dim is None:
            raise ValueError("MapperConfig.cond_dim must be set to the text encoder's hidden size")
        if config.spk_dim + config.xvec_dim > config.dim:
            raise ValueError("dim must hold spk_dim + xvec_dim")
        self.config = config
        D = config.dim
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.cond_proj = nn.Linear(config.cond_dim, D)
        self.in_proj = nn.Linear(D, D)
        self.blocks = nn.ModuleList([AdaLNBlock(D, config.hidden_dim) for _ in range(config.n_blocks)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D)
        for lin in (self.final_ada, self.out_proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.spk_head = nn.Linear(D, config.spk_dim)
        self.xvec_head = nn.Linear(D, config.xvec_dim)
        with torch.no_grad():  # start as the exact slices of x1
            self.spk_head.weight.zero_()
            self.spk_head.weight[:, : config.spk_dim] = torch.eye(config.spk_dim)
            self.spk_head.bias.zero_()
            self.xvec_head.weight.zero_()
            self.xvec_head.weight[:, config.spk_dim: config.spk_dim + config.xvec_dim] = torch.eye(config.xvec_dim)
            self.xvec_head.bias.zero_()

    # ---- the network -----------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, style_emb: torch.Tensor) -> torch.Tensor:
        """x_t [B, dim] or [K, B, dim] (K draws of the same rows), t [B] in [0, 1], style_emb [B, cond_dim] →
        v shaped as x_t. The conditioning (time + style → AdaLN modulations, most of the FLOPs) is computed once
        per row and broadcast over the K draws."""
        c = self.time_mlp(sinusoidal_embedding(t, self.config.time_dim)) + self.cond_proj(style_emb)
        h = self.in_proj(x_t)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.out_proj(self.final_norm(h) * (1 + scale) + shift)

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A 512-d flow vector → (spk_emb [B, 256], x_vector [B, 192]), both L2-normalised."""
        return F.normalize(self.spk_head(x).float(), dim=-1), F.normalize(self.xvec_head(x).float(), dim=-1)

    # ---- training ----------------------------------------------------------------------------------
    def loss(self, style_emb: torch.Tensor, spk: torch.Tensor, xvec: torch.Tensor,
             use_predicted_recon: bool = False, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching + reconstruction loss. Returns (total, {"fm", "recon"}) — all float32 scalars.

        ``use_predicted_recon=False`` is phase 1 (heads read GT x1), ``True`` is phase 2 (heads read
        ``x1_pred = x_t + v_pred·(1 − t)``). Noise and t come from ``generator`` (on the batch's device)
        when given, so a resumed run draws the same noise.
        """
        x1 = self.config.target_scale * make_target(spk, xvec, self.config.dim).to(style_emb.device)
        B = x1.shape[0]
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        t = torch.rand((B,), generator=generator, device=x1.device, dtype=x1.dtype)
        tt = t[:, None]
        x_t = (1 - tt) * x0 + tt * x1
        v_pred = self.velocity(x_t, t, style_emb).float()
        fm = F.mse_loss(v_pred, x1 - x0)
        src = x_t + v_pred * (1 - tt) if use_predicted_recon else x1
        spk_hat, xvec_hat = self.spk_head(src).float(), self.xvec_head(src).float()
        recon = 0.5 * ((1 - F.cosine_similarity(spk_hat, spk.float(), dim=-1)).mean()
                       + (1 - F.cosine_similarity(xvec_hat, xvec.float(), dim=-1)).mean())
        total = fm + self.config.recon_weight * recon
        return total, {"fm": fm.detach(), "recon": recon.detach()}

    # ---- inference ---------------------------------------------------------------------------------
    def initial_noise(self, batch: int, seed: int | None = None, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
        """x0 ~ N(0, I) [batch, dim] on this module's device. A seed draws on the CPU (same on any device)."""
        dev = self.out_proj.weight.device
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        gdev = generator.device if generator is not None else dev
        return torch.randn((batch, self.config.dim), generator=generator, device=gdev).to(dev)

    @torch.no_grad()
    def sample(self, style_emb: torch.Tensor, n_steps: int | None = None, seed: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               temperature: float | None = None) -> torch.Tensor:
        """Euler integration of the flow from x0 = temperature · noise → float32 [B, dim] (fp32, no autocast);
        ``noise`` [K, B, dim] integrates K draws at once → [K, B, dim].

        ``noise`` (or the seeded / generated draw) is standard normal; the temperature is applied here so
        every caller samples the same distribution."""
        dev = self.out_proj.weight.device
        style_emb = torch.as_tensor(style_emb).to(device=dev, dtype=torch.float32)
        n = int(n_steps or self.config.n_steps)
        B = style_emb.shape[0]
        x = (noise.to(device=dev, dtype=torch.float32) if noise is not None
             else self.initial_noise(B, seed=seed, generator=generator))
        x = x * float(self.config.temperature if temperature is None else temperature)
        with torch.autocast(device_type=dev.type, enabled=False):
            for i in range(n):
                t = torch.full((B,), i / n, device=dev)
                x = x + self.velocity(x, t, style_emb) * (1.0 / n)
        return x

    @torch.no_grad()
    def inference(self, style_emb: torch.Tensor, n_steps: int | None = None, seed: int | None = None,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                  temperature: float | None = None, draws: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """style_emb [B, H] → (spk_emb [B, 256], x_vector [B, 192]), L2-normalised, float32.

        ``draws`` (default ``config.draws``) decoded samples are averaged and re-normalised. Deterministic for a
        given ``seed`` (drawn on the CPU, so the same on any device), ``generator`` or explicit ``noise``
        ([B, dim] for one draw, [K, B, dim] for K); draw k comes after draw k − 1 from the same generator, so draw
        0 is the one-draw vector. With none of them, the device's default RNG is used.
        """
        k = int(draws or self.config.draws)
        if noise is not None:
            noise = noise[None] if noise.dim() == 2 else noise
            if noise.shape[0] != k:
                raise ValueError(f"noise holds {noise.shape[0]} draws, inference asked for {k}")
        elif k > 1:
            if generator is None and seed is not None:
                generator = torch.Generator(device="cpu").manual_seed(int(seed))
            noise = torch.stack([self.initial_noise(style_emb.shape[0], generator=generator) for _ in range(k)])
        x = self.sample(style_emb, n_steps=n_steps, seed=seed, generator=generator,
                        noise=None if noise is None else noise if k > 1 else noise[0], temperature=temperature)
        with torch.autocast(device_type=x.device.type, enabled=False):
            spk, xvec = self.decode(x)
        if k == 1:
            return spk, xvec
        return F.normalize(spk.mean(0), dim=-1), F.normalize(xvec.mean(0), dim=-1)
