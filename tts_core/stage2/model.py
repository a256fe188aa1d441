"""The stage-2 model side: T3's training forward (what DDP wraps), T3 resolution, freezing, optimizer
groups and the LR schedule (module doc of `tts_core.stage2.train`, "What is trained" / "t3 resolution")."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tts_core.t3 import (
    IGNORE_INDEX, T3, T3Batch, T3Config, build_layout, is_adapter_key, load_t3_checkpoint, load_turbo, t3_for_config,
)
from tts_core.t3.config import PRESET_SHAPES
from tts_core.t3.families import TURBO, T3Source, announce, detect_t3

PRESETS = tuple(PRESET_SHAPES)
GROUPS = ("backbone", "adapters", "embeddings", "heads", "cond_enc")


# ---- model wrapper: the training forward (what DDP wraps) ------------------------------------------------
class Stage2Model(nn.Module):
    """T3's training forward with per-segment loss statistics.

    Same layout (`build_layout`), embeddings (`T3.embed_layout`), adapter scope and backbone call as
    `T3.forward`, and the same loss definition (`next_token_loss`: mean CE over labelled text
    positions + mean CE over labelled speech positions); the heads are applied only at labelled
    positions (T3.forward projects every column onto the speech head, 8194 rows for Chatterbox's table). A test checks
    equality with `T3.forward`.
    """

    def __init__(self, t3: T3, text_loss_weight: float = 1.0, padding_mask: bool = False):
        super().__init__()
        self.t3 = t3
        self.text_loss_weight = float(text_loss_weight)
        self.padding_mask = bool(padding_mask)

    def forward(self, batch: T3Batch, instruction_only: torch.Tensor, weight: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (weighted loss, stats [12] detached): loss, loss_text, loss_speech, then CE sum / token count for
        each head and loss segment (`row_mix.SEGMENTS`) — (text, instruction-only rows), (text, rows with a
        reference prompt), (speech, instruction-only), (speech, with prompt) — then the number of instruction-only
        rows and of rows. ``instruction_only``: [B] bool, the instruction-only rows (null instruction or not); the
        others are audio-only or prompt + instruction, i.e. every row with a reference prompt."""
        t3 = self.t3
        batch = batch.to(t3.device, t3.dtype)
        layout = build_layout(t3.cfg, batch.text_tokens, batch.text_lens, batch.speech_tokens, batch.speech_lens,
                              append_eos=True, prompt_lens=batch.cond.prompt_lengths())
        embeds = t3.embed_layout(layout, batch.cond)
        with t3.instruction_scope(batch.cond):
            h = t3._backbone(embeds, layout.attention_mask if self.padding_mask else None,
                             layout.position_ids).last_hidden_state
        inst = instruction_only.to(h.device, torch.bool)[:, None]
        parts = []
        means = []
        for head, labels in ((t3.text_head, layout.text_labels), (t3.speech_head, layout.speech_labels)):
            sel = labels != IGNORE_INDEX
            ce = F.cross_entropy(head(h[sel]).float(), labels[sel], reduction="none")
            means.append(ce.sum() / sel.sum().clamp(min=1))
            on_inst = inst.expand_as(labels)[sel]
            cd = ce.detach()
            parts += [(cd * on_inst).sum(), on_inst.sum().float(), (cd * ~on_inst).sum(), (~on_inst).sum().float()]
        loss_text, loss_speech = means
        unweighted = self.text_loss_weight * loss_text + loss_speech
        loss = unweighted * weight
        stats = torch.stack([unweighted.detach(), loss_text.detach(), loss_speech.detach(), *parts,
                             inst.sum().float(), torch.tensor(float(inst.shape[0]), device=h.device)])
        return loss, stats


# ---- T3 / parameters ---------------------------------------------------------------------------------------
def build_t3(spec: str, instruction_dim: int, seed: int = 0, label: str | None = None,
             speech_codes: int | None = None) -> tuple[T3, Any, T3Source | None]:
    """(model, LoadReport or None, resolved `T3Source` or None) — see the module doc, "t3 resolution".
    What was found is printed, prefixed with ``label`` (default ``--t3 SPEC``). ``speech_codes``: a preset's
    speech embedding and head are sized to that many codes (`T3Config.sized_to_speech_codes`: +BOS +EOS); None
    keeps Chatterbox's 8194-row table. A checkpoint (official or ours) always keeps the shape it has."""
    if spec in PRESETS and not Path(spec).exists():
        cfg = T3Config.preset(spec, instruction_dim=instruction_dim).sized_to_speech_codes(speech_codes)
        torch.manual_seed(seed)
        return T3(cfg), None, None
    if not Path(spec).exists():
        raise FileNotFoundError(f"--t3 {spec!r} is neither a Chatterbox checkpoint directory / file nor a preset "
                                f"{PRESETS}")
    source = detect_t3(spec)
    announce(label or f"--t3 {spec}", source)
    if source.family.name == TURBO and not source.own_checkpoint:
        torch.manual_seed(seed)  # the adapters' first layers
        turbo = load_turbo(source.directory, instruction_dim=instruction_dim)
        return turbo.t3, turbo.report, source
    cfg = source.config
    if source.own_checkpoint and cfg.adapters and cfg.instruction_dim != instruction_dim:
        raise ValueError(
            f"{source.t3.path} has adapters over {cfg.instruction_dim}-d instruction embeddings, but the stage-1 "
            f"encoder gives {instruction_dim}-d ones: it was trained with another instruction encoder")
    cfg = cfg.replace(adapters=True, instruction_dim=instruction_dim)
    torch.manual_seed(seed)
    model = t3_for_config(cfg)
    report = load_t3_checkpoint(model, source.t3.path)  # strict; only adapter keys may be missing
    return model, report, source


def _group_of(name: str) -> str:
    if is_adapter_key(name):
        return "adapters"
    if name.startswith("tfmr."):
        return "backbone"
    if name.split(".")[0] in ("text_emb", "speech_emb", "text_pos_emb", "speech_pos_emb"):
        return "embeddings"
    if name.split(".")[0] in ("text_head", "speech_head"):
        return "heads"
    if name.startswith("cond_enc."):
        return "cond_enc"
    raise ValueError(f"T3 parameter {name!r} belongs to no known group")


def parameter_groups(t3: T3) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable T3 parameters by group (after `freeze_for_stage2`)."""
    out: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in t3.named_parameters():
        if p.requires_grad:
            out[_group_of(name)].append((name, p))
    return out


def freeze_for_stage2(t3: T3, encoder: nn.Module, mapper: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Stage 2 trains the whole T3 and its adapters; the instruction encoder, the mapper and the backbone's unused
    input embedding are frozen. → (trainable counts per group, frozen counts)."""
    t3.requires_grad_(True)
    unused = t3.tfmr.get_input_embeddings()  # Llama embed_tokens / GPT-2 wte: never read (inputs_embeds)
    unused.requires_grad_(False)  # no gradient would reach it: DDP-unsafe
    for m in (encoder, mapper):
        m.requires_grad_(False)
        m.eval()
    groups = parameter_groups(t3)
    trainable = {g: sum(p.numel() for _, p in ps) for g, ps in groups.items()}
    unused_name = next(n for n, m in t3.tfmr.named_modules() if m is unused)
    frozen = {f"t3.tfmr.{unused_name} (unused)": unused.weight.numel(),
              "instruction_encoder": sum(p.numel() for p in encoder.parameters()),
              "mapper": sum(p.numel() for p in mapper.parameters())}
    return trainable, frozen


def _no_decay_names(t3: T3) -> set[str]:
    names = set()
    for mname, mod in t3.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p.ndim < 2 or isinstance(mod, nn.Embedding):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


def make_optimizer(t3: T3, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups` (cfg: a `Stage2Config`): adapters at ``adapter_lr``, no decay on
    biases, norms and embeddings; ``base_lr`` per group is what the schedule scales."""
    no_decay = _no_decay_names(t3)
    adapter_lr = cfg.adapter_lr if cfg.adapter_lr is not None else cfg.lr
    buckets: dict[tuple[bool, bool], list] = {}
    for g, ps in parameter_groups(t3).items():
        for name, p in ps:
            buckets.setdefault((g == "adapters", name not in no_decay), []).append(p)
    groups = []
    for (is_adapter, decay) in sorted(buckets):
        base = adapter_lr if is_adapter else cfg.lr
        groups.append({"params": buckets[(is_adapter, decay)], "weight_decay": cfg.weight_decay if decay else 0.0,
                       "base_lr": base, "lr": base})
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

