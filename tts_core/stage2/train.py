"""Stage-2 training loop: T3 + AdaRMSNorm adapters on instruction-only / audio-only rows, as a library.

    result = train_stage2(Stage2Config(store="runs/cache.zarr", mapper_dir="runs/stage1", t3="ckpt/chatterbox",
                                       out_dir="runs/stage2"), on_log=print)

or, for DDP, the same call in a script launched with ``torchrun --nproc-per-node N script.py``.

What is trained (DESIGN "Stage 2")
----------------------------------
Frozen, never in the optimizer: the stage-1 instruction encoder and mapper (loaded with
`load_mapper`, ``requires_grad=False``, eval mode; their outputs are precomputed once — see
`tts_core.stage2.data`), and the VoiceEncoder / S3 tokenizer / S3Gen (their outputs come from the
cache). Trainable: every T3 parameter — backbone (``tfmr``), adapters (``*.adapter.*``), embeddings
(text/speech token and position tables), heads, ``cond_enc`` — except ``tfmr.embed_tokens``: T3
feeds ``inputs_embeds``, so that 8-row table is never read, gets no gradient, and is frozen (DDP
refuses parameters that never receive a gradient). `Stage2Result.trainable` / ``frozen`` give the
parameter counts per group; the run's report lists them.

``t3`` resolution
-----------------
* a directory holding one official Chatterbox T3 file, or that file itself (`tts_core.t3.families`:
  English ``t3_cfg.safetensors``, multilingual ``t3_mtl23ls_v2.safetensors``, Turbo
  ``t3_turbo_v1.safetensors``), or a stage-2 checkpoint (our ``t3_cfg.safetensors``). Which family was
  found is printed. Its `T3Config` comes from the file's metadata (our checkpoints) or from the official
  file's tensor shapes (text vocab 704 / 2454, depth, width…); the adapters get ``instruction_dim`` = the
  stage-1 encoder's hidden size. Loaded strictly with `load_t3_checkpoint` (``.safetensors`` or ``.pt``):
  the only keys allowed to be absent are the adapters (``LoadReport.summary``: "extra: N adapter params").
  The family's tokenizer file beside it (``tokenizer.json`` / ``grapheme_mtl_merged_expanded_v1.json``)
  is the run's text tokenizer unless ``text_tokenizer`` says otherwise. Multilingual rows are tokenized
  with their language (metadata's 5th column, else ``language``).
* Turbo (official directory): `load_turbo` — the GPT-2 T3 at the file's shape, strictly, adapters on its
  LayerNorms; its GPT-2 BPE tokenizer files are the run's text tokenizer (docs/production-weights.md
  "Turbo"). A run trained from it saves ``t3_cfg.safetensors`` whose T3Config says ``backbone="gpt2"``,
  so it is a ``t3`` source like any stage-2 checkpoint.
* a preset name (``"tiny"``, ``"520m"``): fresh weights (seeded), the byte tokenizer by default.

Identity: the stage-1 mapper must have been trained over the text encoder that built the store
(name + weights sha256), else `TextEncoderMismatchError` before anything is computed.

Checkpoints (rank 0 writes; all ranks wait)
-------------------------------------------
``out_dir/checkpoints/step_XXXXXXXX/`` = ``t3_cfg.safetensors`` (`save_t3`: atomic, tie-safe, T3Config
in its metadata — a checkpoint directory is itself a valid ``t3`` source), the text tokenizer
(``tokenizer.json`` or ``text_tokenizer.json``), ``stage2.json`` (what inference needs: tokenizer, mapper
and text-encoder identities, prompt length, emotion) and ``train_state.pt`` (optimizer state, step,
epoch, position in the epoch, counters, LR-schedule length, config, data fingerprint). The directory
is written under a temporary name and renamed, then ``out_dir/latest.json`` is atomically pointed at
it, so a kill -9 at any moment leaves the previous checkpoint intact. Every ``save_every`` steps and
at the end; the newest ``keep_checkpoints`` are kept. At the end the final weights + tokenizer +
``stage2.json`` are also published at ``out_dir`` itself.

Resume (``resume=True`` and ``latest.json`` present): weights, optimizer, step, epoch and position are
restored. Randomness needs no saved state: the data order is a function of (seed, epoch), each
batch's choices of (seed, epoch, global batch) and the torch RNG (perceiver dropout) is reseeded
every step from (seed, global step, rank). A resumed run with the same world size is therefore
bit-identical to an uninterrupted one, wherever the kill came (mid-step, mid-checkpoint-write; tested on
CPU); under `tts_core.interrupt.stop_after_step` Ctrl-C checkpoints at the step it arrived in. Another world size is allowed: the position
is counted in *global* batches, so the epoch continues where it stopped, each row still once; the
global step is kept, but a step now covers a different number of batches, and the LR-schedule
length is recomputed for the remaining steps (documented, not bit-identical). Changing anything
that defines the run (data, tokenizer, seeds, batch/LR settings...) is refused.

Non-finite steps: a step whose loss or gradient norm is non-finite (on any rank: the check uses
all-reduced values, so every rank skips the same steps) is skipped and counted; more than
``max_nonfinite`` in a row raise `Stage2NonFiniteError`.

Outputs: ``metrics.jsonl`` (one JSON row every ``log_every`` steps: loss, text/speech loss of
instruction rows vs audio rows, LR, grad norm, tokens/s, padding) and ``report.md`` (+
``loss_curves.png``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tts_core.atomic_files import atomic_copy, atomic_torch_save, atomic_write_json, atomic_write_text, json_default
from tts_core.checkpoint import ResumeMismatchError
from tts_core.interrupt import TrainingInterrupted, stop_requested
from tts_core.precision import resolve_amp
from tts_core.mapper.pooling import TextEncoderMismatchError, check_text_encoder_identity
from tts_core.stage2.data import (
    BucketBatchSampler, batch_rng, mix_seed, prepare_stage2_data,
)
from tts_core.stage2.text_tokenizer import TextTokenizer, check_language, load_text_tokenizer
from tts_core.t3 import (
    IGNORE_INDEX, T3, T3Batch, T3Config, build_layout, cond_lens, is_adapter_key, load_t3_checkpoint, load_turbo,
    save_t3, t3_for_config,
)
from tts_core.t3.families import TURBO, T3FamilyError, T3Source, announce, detect_t3

__all__ = ["Stage2Config", "Stage2Result", "Stage2Model", "Stage2NonFiniteError", "train_stage2", "build_t3",
           "parameter_groups", "T3_WEIGHTS", "STAGE2_META", "TRAIN_STATE"]

log = logging.getLogger(__name__)

T3_WEIGHTS = "t3_cfg.safetensors"
STAGE2_META = "stage2.json"
TRAIN_STATE = "train_state.pt"
LATEST = "latest.json"
SPEECH_CODEBOOK = "mel_vq.safetensors"  # embedded tokenizer codebook beside a run (absent for S3 runs)
PREPARED = "prepared.safetensors"
FORMAT = "instruct-tts/stage2"
PRESETS = ("tiny", "520m")
GROUPS = ("backbone", "adapters", "embeddings", "heads", "cond_enc")


class Stage2NonFiniteError(FloatingPointError):
    """Too many consecutive non-finite training steps."""


@dataclass
class Stage2Config:
    store: str = ""  # cache store URL (CacheReader)
    mapper_dir: str = ""  # stage-1 run dir (load_mapper)
    out_dir: str = "runs/stage2"
    t3: str = "520m"  # preset name, or a directory / file with t3_cfg.safetensors
    text_tokenizer: str | None = None  # None: the t3 family's tokenizer file, else bytes; "bytes"; a tokenizer file
    language: str | None = None  # multilingual T3: language of rows whose metadata has no 5th column
    instruction_prob: float = 0.5  # per-row probability of an instruction-only row
    batch_size: int = 32  # rows per batch (per rank); the cap when max_tokens is set
    max_tokens: int = 0  # token budget per batch (rows × longest row); 0 = fixed batch_size
    grad_accum: int = 1  # batches per rank per optimizer step (N ranks × A = A·N global batches per step)
    pool_batches: int = 64  # batches per length-sorting pool
    lr: float = 5e-5
    adapter_lr: float | None = None  # None = lr (fresh adapters may want more)
    min_lr_ratio: float = 0.1  # cosine decay to lr × this
    weight_decay: float = 0.01  # on ≥2-D non-embedding weights only
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 200
    epochs: int = 1
    max_steps: int | None = None
    text_loss_weight: float = 1.0  # loss = w·text + speech (Chatterbox: 1)
    grad_clip: float = 1.0  # 0 = none
    amp_dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False  # torch.compile the Llama backbone (in place: checkpoint keys unchanged)
    padding_mask: bool = False  # False: causal-only attention (exact for real positions; fused kernels)
    seed: int = 0
    device: str = "auto"
    save_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    max_nonfinite: int = 20
    mapper_seed: int = 0  # noise of the precomputed mapper samples
    mapper_samples: int = 1  # K flow samples per instruction (a row uses one at random)
    mapper_n_steps: int | None = None  # None: the mapper config's n_steps
    prompt_len: int | None = None  # None: T3Config.speech_cond_prompt_len (150)
    emotion_adv: float = 0.5
    resume: bool = True
    progress: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Stage2Config":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# Fields that define the run: a resume with other values is refused (epochs / max_steps / logging may change).
_RUN_KEYS = ("t3", "instruction_prob", "batch_size", "max_tokens", "pool_batches", "lr", "adapter_lr",
             "min_lr_ratio", "weight_decay", "betas", "warmup_steps", "text_loss_weight", "grad_clip", "seed",
             "mapper_seed", "mapper_samples", "mapper_n_steps", "prompt_len", "emotion_adv", "padding_mask",
             "amp_dtype", "language")


@dataclass
class Stage2Result:
    run_dir: Path
    checkpoint: Path | None  # the published final checkpoint (run_dir) or None when not rank 0
    global_step: int
    epoch: int
    stopped_reason: str  # "done" | "max_steps"
    history: list[dict]  # metrics.jsonl rows
    trainable: dict[str, int]  # parameter count per trainable group
    frozen: dict[str, int]
    nonfinite_steps: int
    world_size: int
    t3: T3
    encoder: nn.Module
    mapper: nn.Module
    tokenizer: TextTokenizer
    load_report: str | None
    data_stats: dict = field(default_factory=dict)


@dataclass
class _State:
    epoch: int = 0
    position: int = 0  # global batches consumed in this epoch
    global_step: int = 0
    nonfinite_total: int = 0
    consecutive_nonfinite: int = 0
    total_steps: int = 0  # LR-schedule length
    world_size: int = 1
    tokens_seen: int = 0


# ---- model wrapper: the training forward (what DDP wraps) ------------------------------------------------
class Stage2Model(nn.Module):
    """T3's training forward with per-segment loss statistics.

    Same layout (`build_layout`), embeddings (`T3.embed_layout`), adapter scope and backbone call as
    `T3.forward`, and the same loss definition (`next_token_loss`: mean CE over labelled text
    positions + mean CE over labelled speech positions); the heads are applied only at labelled
    positions (T3.forward projects every column onto the 8194-way speech head). A test checks
    equality with `T3.forward`.
    """

    def __init__(self, t3: T3, text_loss_weight: float = 1.0, padding_mask: bool = False):
        super().__init__()
        self.t3 = t3
        self.text_loss_weight = float(text_loss_weight)
        self.padding_mask = bool(padding_mask)

    def forward(self, batch: T3Batch, is_instruction: torch.Tensor, weight: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (weighted loss, stats [12] detached): loss, loss_text, loss_speech, then CE sum / token count
        for (text, instruction rows), (text, audio rows), (speech, instruction rows), (speech, audio rows),
        then the number of instruction rows and of rows."""
        t3 = self.t3
        batch = batch.to(t3.device, t3.dtype)
        layout = build_layout(t3.cfg, batch.text_tokens, batch.text_lens, batch.speech_tokens, batch.speech_lens,
                              append_eos=True, prompt_lens=batch.cond.prompt_lengths())
        embeds = t3.embed_layout(layout, batch.cond)
        with t3.instruction_scope(batch.cond):
            h = t3._backbone(embeds, layout.attention_mask if self.padding_mask else None,
                             layout.position_ids).last_hidden_state
        inst = is_instruction.to(h.device, torch.bool)[:, None]
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
def build_t3(spec: str, instruction_dim: int, seed: int = 0, label: str | None = None
             ) -> tuple[T3, Any, T3Source | None]:
    """(model, LoadReport or None, resolved `T3Source` or None) — see the module doc, "t3 resolution".
    What was found is printed, prefixed with ``label`` (default ``--t3 SPEC``)."""
    if spec in PRESETS and not Path(spec).exists():
        cfg = T3Config.preset(spec, instruction_dim=instruction_dim)
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
    """Apply DESIGN's freezing; → (trainable counts per group, frozen counts)."""
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


def _make_optimizer(t3: T3, cfg: Stage2Config, device: torch.device) -> torch.optim.Optimizer:
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


# ---- environment ---------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _init_distributed(device_pref: str) -> tuple[_Dist, torch.device]:
    env_ws = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and env_ws > 1
    if device_pref == "auto":
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = torch.device(device_pref).type
    if not launched:
        return _Dist(), torch.device(device_pref if device_pref != "auto" else dev_type)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev_type == "cuda" else "gloo")
        owns = True
    d = _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, enabled=True, owns_group=owns)
    if dev_type == "cuda":
        torch.cuda.set_device(local)
        return d, torch.device("cuda", local)
    return d, torch.device("cpu")


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _save_checkpoint(out: Path, t3: T3, tokenizer: TextTokenizer, opt, st: _State, cfg: Stage2Config,
                     meta: dict, fingerprint: str, keep: int) -> Path:
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{st.global_step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_t3(t3, tmp / T3_WEIGHTS, config=t3.cfg)
    tokenizer.save(tmp)
    atomic_torch_save({"optimizer": opt.state_dict(), "state": json.dumps(asdict(st)),
                        "config": json.dumps(cfg.to_dict()), "fingerprint": fingerprint}, tmp / TRAIN_STATE)
    atomic_write_json(tmp / STAGE2_META, {**meta, "step": st.global_step, "epoch": st.epoch,
                                           "position": st.position})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_json(out / LATEST, {"checkpoint": f"checkpoints/{name}", "step": st.global_step})
    # prune: older checkpoints beyond `keep`, and temporary dirs of killed writers
    done = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    for p in done[:-max(keep, 1)]:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(".tmp-") and p != tmp:
            shutil.rmtree(p, ignore_errors=True)
    return final


_RUN_FILES = (LATEST, "metrics.jsonl", "report.md", "loss_curves.png", T3_WEIGHTS, STAGE2_META, "tokenizer.json",
              "text_tokenizer.json", "chatterbox_tokenizer.json")


def _clear_run(out: Path) -> None:
    """Remove what a previous run left in ``out`` (the fingerprinted prepared tables are kept)."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _absolute(url: str) -> str:
    """Local paths recorded absolute (a run is used from other working directories); URLs as given."""
    return url if "://" in url else str(Path(url).resolve())


def _save_speech_codebook(store: str, out: Path) -> None:
    """The embedded tokenizer's codebook beside the run (``mel_vq.safetensors``): the run directory then
    decodes its own tokens wherever it is moved, without the cache store."""
    from cache.build import saved_codebook
    from tts_core.encoders.embedded import restore

    codebook = saved_codebook(store)
    if codebook is not None:
        restore(codebook).to_safetensors(out / SPEECH_CODEBOOK)


def _latest_checkpoint(out: Path) -> Path | None:
    f = out / LATEST
    if not f.is_file():
        return None
    d = out / json.loads(f.read_text())["checkpoint"]
    return d if (d / TRAIN_STATE).is_file() and (d / T3_WEIGHTS).is_file() else None


def _check_resume(saved_cfg: dict, cfg: Stage2Config, saved_fp: str, fingerprint: str, path: Path) -> None:
    problems = []
    if saved_fp != fingerprint:
        problems.append("the data differ (store rows, text tokenizer, mapper weights or mapper seeds)")
    now = cfg.to_dict()
    for k in _RUN_KEYS:
        if saved_cfg.get(k) != now.get(k):
            problems.append(f"{k}: {saved_cfg.get(k)!r} then, {now.get(k)!r} now")
    if problems:
        raise ResumeMismatchError(f"cannot resume {path}: it is another run — " + "; ".join(problems)
                         + ". Use a new out_dir, or resume=False to start over in this one.")


def _publish(out: Path, ckpt: Path) -> None:
    """Copy the final checkpoint's inference files to the run root (weights first, stage2.json last)."""

    for f in sorted(ckpt.iterdir()):
        if f.is_file() and f.name not in (TRAIN_STATE, STAGE2_META):
            atomic_copy(f, out / f.name)
    atomic_copy(ckpt / STAGE2_META, out / STAGE2_META)


# ---- metrics / report -------------------------------------------------------------------------------------------
_STAT_NAMES = ("loss", "loss_text", "loss_speech", "ce_text_inst", "n_text_inst", "ce_text_audio", "n_text_audio",
               "ce_speech_inst", "n_speech_inst", "ce_speech_audio", "n_speech_audio", "n_inst_rows", "n_rows")


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                pass
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    rows = [r for r in _read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _fmt(x) -> str:
    return "—" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _write_report(out: Path, summary: dict, history: list[dict], plot: bool) -> None:
    png = None
    if plot and history:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            steps = [r["step"] for r in history]
            for ax, key, title in ((axes[0], "text", "text loss"), (axes[1], "speech", "speech loss")):
                for seg, style in (("inst", "-"), ("audio", "--")):
                    ax.plot(steps, [r.get(f"{key}_{seg}") for r in history], style,
                            label="instruction rows" if seg == "inst" else "audio rows")
                ax.set_title(title)
                ax.set_xlabel("step")
                ax.legend()
            axes[2].plot(steps, [r["loss"] for r in history])
            axes[2].set_title("total loss")
            axes[2].set_xlabel("step")
            fig.tight_layout()
            fig.savefig(out / "loss_curves.png", dpi=80)
            plt.close(fig)
            png = "loss_curves.png"
        except Exception as e:  # a report never fails a run
            log.warning("loss plot skipped: %s", e)
    s = summary
    lines = [
        "# Stage 2 — T3 with instruction adapters", "",
        f"- T3: `{s['t3_source']}`" + (f" — {s['t3_found']}" if s.get("t3_found") else "")
        + (f" — {s['load_report']}" if s.get("load_report") else " (fresh weights)"),
        f"- text tokenizer: `{s['tokenizer']['identity']['name']}` (vocab {s['tokenizer']['vocab_size']})",
        f"- stage-1 mapper: `{s['mapper_dir']}`; text encoder `{s['text_encoder'].get('name')}`",
        f"- data: {s['data']['rows']} rows used of {s['data']['n_ok']} OK clips (dropped: {s['data']['dropped']}); "
        f"{s['data']['n_instructions']} instructions; rows without a same-speaker prompt clip: "
        f"{s['data']['own_prompt_frac']:.1%}; padding {s['data']['pad_frac']:.1%} of batch tokens",
        f"- instruction_prob {s['config']['instruction_prob']}; world size {s['world_size']}; device {s['device']}; "
        f"amp {s['amp']}; compile {s['config']['compile']}",
        f"- steps {s['global_step']} (epoch {s['epoch']}); stopped: {s['stopped_reason']}; non-finite steps skipped "
        f"{s['nonfinite_steps']}", "",
        "## Parameters", "", "| group | trainable |", "|---|---|",
        *[f"| {g} | {n:,} |" for g, n in s["trainable"].items()],
        f"| **total** | **{sum(s['trainable'].values()):,}** |", "", "| frozen | params |", "|---|---|",
        *[f"| {g} | {n:,} |" for g, n in s["frozen"].items()], "",
        "## Loss per segment", "",
    ]
    if png:
        lines += [f"![loss curves]({png})", ""]
    lines += ["| step | epoch | lr | loss | text (instr.) | text (audio) | speech (instr.) | speech (audio) | "
              "instr. frac | tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    stride = max(1, math.ceil(len(history) / 40))
    shown = history[::stride] + ([history[-1]] if history and (len(history) - 1) % stride else [])
    for r in shown:
        lines.append(f"| {r['step']} | {r['epoch']:.3f} | {r['lr']:.2e} | {_fmt(r['loss'])} "
                     f"| {_fmt(r.get('text_inst'))} | {_fmt(r.get('text_audio'))} | {_fmt(r.get('speech_inst'))} | {_fmt(r.get('speech_audio'))} "
                     f"| {_fmt(r.get('inst_frac'))} | {r.get('tokens_per_s', 0):.0f} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# ---- the loop ---------------------------------------------------------------------------------------------------
def train_stage2(cfg: Stage2Config, on_log: Callable[[dict], None] | None = None) -> Stage2Result:
    """Train (or resume) stage 2; see the module docstring. ``on_log(row)`` runs on rank 0 after each
    metrics row is written (raising from it stops the run like a kill, after the last checkpoint)."""
    from cache.reader import CacheReader
    from tts_core.stage1.artifacts import load_mapper

    if not 0.0 <= cfg.instruction_prob <= 1.0:
        raise ValueError("instruction_prob must lie in [0, 1]")
    if not cfg.store or not cfg.mapper_dir:
        raise ValueError("Stage2Config needs store (a cache store URL) and mapper_dir (a stage-1 run directory)")
    dd, device = _init_distributed(cfg.device)
    try:
        return _train(cfg, on_log, dd, device, CacheReader, load_mapper)
    finally:
        if dd.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, on_log, dd: _Dist, device: torch.device, CacheReader, load_mapper) -> Stage2Result:
    out = Path(cfg.out_dir)
    if dd.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dd.barrier()
    amp = resolve_amp(cfg.amp_dtype, device)

    # -- store, frozen stage-1 models, identity ----------------------------------------------------------
    reader = CacheReader(cfg.store)
    store_te = reader.identities.get("text_encoder")
    encoder, mapper, mapper_meta = load_mapper(cfg.mapper_dir, device="cpu")
    mapper_te = mapper_meta.get("text_encoder") or {}
    try:
        check_text_encoder_identity(mapper_te or None, store_te, what=f"the stage-1 mapper {cfg.mapper_dir}")
    except TextEncoderMismatchError as e:
        raise TextEncoderMismatchError(
            f"stage 2 refuses this combination: the store {cfg.store} was built with text encoder "
            f"{getattr(store_te, 'name', store_te)!r} (sha256 {getattr(store_te, 'sha256', '?')[:12]}) but the "
            f"stage-1 mapper {cfg.mapper_dir} was trained on {mapper_te.get('name')!r} (sha256 "
            f"{str(mapper_te.get('sha256'))[:12]}); names and weight hashes must match. Train stage 1 on this "
            f"store's cache, or use the store that mapper was trained on. ({e})") from None
    if mapper_meta.get("text_encoder") is None:
        log.warning("stage-1 checkpoint %s records no text-encoder identity: cannot verify it matches the store",
                    cfg.mapper_dir)
    if encoder.hidden_size != reader.text_hidden_size:
        raise TextEncoderMismatchError(
            f"stage-1 encoder pools {encoder.hidden_size}-d states, the store holds {reader.text_hidden_size}-d ones")
    encoder.to(device)
    mapper.to(device)

    # -- T3, tokenizer --------------------------------------------------------------------------------------
    t3, report, source = build_t3(cfg.t3, instruction_dim=encoder.hidden_size, seed=cfg.seed)
    t3_dir = source.directory if source is not None else None
    tok_spec = cfg.text_tokenizer
    if tok_spec is None and source is not None and not source.own_checkpoint:
        # the family's own file(s) — Turbo's GPT-2 BPE files are its directory — never another family's
        tok_spec = source.directory if source.family.name == TURBO else (source.text_tokenizer or "bytes")
    tokenizer = load_text_tokenizer(tok_spec, t3_dir=t3_dir)
    tokenizer.check_fits(t3.cfg.text_vocab_size, t3.cfg.start_text_token, t3.cfg.stop_text_token)
    if source is not None and not source.own_checkpoint and getattr(tokenizer, "name", "") == "bytes":
        log.warning("training an official Chatterbox T3 with the byte tokenizer: its pretrained text embeddings "
                    "are indexed by its own tokenizer file, not by bytes")
    language = check_language(cfg.language) if cfg.language else None
    if tokenizer.requires_language is False and cfg.language:
        log.warning("--language %s is ignored: the %s T3's tokenizer takes no language", cfg.language,
                    t3.cfg.family)
    if report is not None:
        log.info("T3 from %s: %s", cfg.t3, report.summary)
    if t3_dir is not None and t3_dir.resolve() == out.resolve() and (not cfg.resume or _latest_checkpoint(out) is None):
        raise ValueError(f"out_dir {out} is the --t3 source directory and holds no stage-2 checkpoint to resume; "
                         "a fresh run would overwrite its weights: choose another out_dir")
    t3_cfg = t3.cfg
    prompt_len = int(cfg.prompt_len if cfg.prompt_len is not None else t3_cfg.speech_cond_prompt_len)
    if not 0 <= prompt_len <= t3_cfg.speech_cond_prompt_len:
        raise ValueError(f"prompt_len must lie in [0, {t3_cfg.speech_cond_prompt_len}] (this Chatterbox T3 feeds "
                         f"≤ {t3_cfg.speech_cond_prompt_len} prompt tokens)")

    # -- data (rank 0 prepares the shared tables; the others load them) ---------------------------------
    n_steps = int(cfg.mapper_n_steps or mapper.config.n_steps)
    kw = dict(mapper_meta=mapper_meta, mapper_seed=cfg.mapper_seed, mapper_samples=cfg.mapper_samples,
              n_steps=n_steps, max_text_tokens=t3_cfg.max_text_tokens, max_speech_tokens=t3_cfg.max_speech_tokens,
              prepared_path=out / PREPARED, language=language)
    t0 = time.time()
    if dd.rank == 0:
        data = prepare_stage2_data(reader, tokenizer, encoder, mapper, **kw)
    dd.barrier()
    if dd.rank != 0:
        data = prepare_stage2_data(reader, tokenizer, encoder, mapper, write_prepared=False, **kw)
    encoder.cpu()
    mapper.cpu()
    if len(data) == 0:
        raise ValueError(f"no usable rows in {cfg.store} (dropped: {data.dropped})")
    data.to(device)
    log.info("stage2 data ready in %.1fs: %d rows", time.time() - t0, len(data))
    fingerprint = data.meta["fingerprint"]

    # conditioning positions per row, at most (Turbo: 1 + prompt tokens; a perceiver T3: always 34)
    cond_bound = int(cond_lens(t3_cfg, torch.tensor([prompt_len]), 1)[0])
    sampler = BucketBatchSampler(data.seq_lens(cond_bound), batch_size=cfg.batch_size,
                                 max_tokens=cfg.max_tokens, pool_batches=cfg.pool_batches, seed=cfg.seed)
    n_inst = int((data.instruction_id >= 0).sum())
    data_stats = {"rows": len(data), "n_ok": data.meta["n_ok"], "dropped": data.dropped,
                  "n_instructions": data.n_instructions, "rows_with_instruction": n_inst,
                  "own_prompt_frac": len(data.own_prompt_rows) / len(data),
                  "batches_per_epoch": len(sampler.batches(0)), **sampler.padding_stats(0)}

    # -- freezing, optimizer, model wrapper ----------------------------------------------------------------
    t3.to(device)
    trainable, frozen = freeze_for_stage2(t3, encoder, mapper)
    log.info("stage2 trainable params %s (total %d); frozen %s", trainable, sum(trainable.values()), frozen)

    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum must be ≥ 1, not {cfg.grad_accum}")
    # A step covers V = ranks × grad_accum global batches; batch k of a step goes to "virtual rank"
    # v = micro·N + rank, so N ranks × A micro-batches and 1 rank × N·A micro-batches see the same
    # batches with the same seeds, and average the same gradients (tests/test_ddp_equivalence.py).
    V = dd.world_size * cfg.grad_accum
    st = _State(world_size=V)
    latest = _latest_checkpoint(out) if cfg.resume else None
    saved_opt = None
    if latest is not None:
        saved = torch.load(latest / TRAIN_STATE, map_location="cpu", weights_only=True)
        _check_resume(json.loads(saved["config"]), cfg, saved["fingerprint"], fingerprint, latest)
        load_t3_checkpoint(t3, latest / T3_WEIGHTS, allow_missing_adapters=False)
        st = _State(**json.loads(saved["state"]))
        saved_opt = saved["optimizer"]
        log.info("resumed %s at step %d (epoch %d, batch %d)", latest, st.global_step, st.epoch, st.position)
        if dd.rank == 0:
            _truncate_metrics(out / "metrics.jsonl", st.global_step)
    elif dd.rank == 0:
        _clear_run(out)  # a fresh start in an existing out_dir: no stale checkpoints, metrics or published files
    if dd.rank == 0:
        _save_speech_codebook(cfg.store, out)

    # LR-schedule length: fixed at the start of a run and kept by a resume with the same world size and
    # length settings (so the resumed LR curve is the uninterrupted one); recomputed otherwise.
    saved_len = (json.loads(saved["config"]) if latest is not None else {})
    if (latest is None or st.world_size != V or not st.total_steps
            or saved_len.get("epochs") != cfg.epochs or saved_len.get("max_steps") != cfg.max_steps):
        spe = sampler.steps_in_epoch(0, V)
        remaining = 0 if st.epoch >= cfg.epochs else (
            sampler.steps_in_epoch(st.epoch, V, st.position) + (cfg.epochs - st.epoch - 1) * spe)
        st.total_steps = st.global_step + remaining
        if cfg.max_steps is not None:
            st.total_steps = min(st.total_steps, cfg.max_steps)
    if latest is not None and st.world_size != V:
        log.warning("resuming a run saved with %d global batches per step with %d: global step %d kept, epoch %d "
                    "continues at global batch %d; LR schedule length now %d steps", st.world_size, V,
                    st.global_step, st.epoch, st.position, st.total_steps)
    st.world_size = V

    if cfg.compile:
        t3.tfmr.compile(dynamic=True)
    model = Stage2Model(t3, text_loss_weight=cfg.text_loss_weight, padding_mask=cfg.padding_mask)
    model.train()
    encoder.eval()
    mapper.eval()
    wrapped: nn.Module = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # no running-stat buffers in T3 (only rotary tables): nothing to broadcast each step
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    opt = _make_optimizer(t3, cfg, device)
    if saved_opt is not None:
        opt.load_state_dict(saved_opt)
    params = [p for g in opt.param_groups for p in g["params"]]

    meta = {
        "format": FORMAT, "t3_source": cfg.t3, "t3_config": t3_cfg.to_dict(), "tokenizer": tokenizer.to_dict(),
        "text_encoder": store_te.to_dict() if store_te is not None else None,
        "mapper": {"dir": _absolute(str(cfg.mapper_dir)), "weights_sha256": mapper_meta.get("weights_sha256"),
                   "n_steps": n_steps, "mapper_config": mapper_meta.get("mapper_config"),
                   "encoder": mapper_meta.get("encoder")},
        "instruction_dim": encoder.hidden_size, "prompt_len": prompt_len, "emotion_adv": cfg.emotion_adv,
        "language": language, "family": t3_cfg.family,
        "store": {"url": _absolute(cfg.store), "lines_digest": reader.info.lines_digest},
        "train_config": cfg.to_dict(), "load_report": report.summary if report is not None else None,
        "t3_found": source.describe() if source is not None else None,
    }

    # -- training -----------------------------------------------------------------------------------------
    metrics_path = out / "metrics.jsonl"
    acc = torch.zeros(len(_STAT_NAMES) + 1, dtype=torch.float64)  # + steps
    acc_t, acc_tokens, acc_padded, acc_gnorm = time.time(), 0, 0, 0.0
    bar = None
    if cfg.progress and dd.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=st.total_steps, initial=st.global_step, unit="step", desc="stage2")
    last_saved = st.global_step if latest is not None else -1

    def save() -> None:
        nonlocal last_saved
        if dd.rank == 0:
            _save_checkpoint(out, t3, tokenizer, opt, st, cfg, meta, fingerprint, cfg.keep_checkpoints)
        last_saved = st.global_step
        dd.barrier()

    while st.epoch < cfg.epochs and (cfg.max_steps is None or st.global_step < cfg.max_steps):
        nb = len(sampler.batches(st.epoch))
        opt.zero_grad(set_to_none=True)
        red = None
        for micro in range(cfg.grad_accum):
            vr = micro * dd.world_size + dd.rank
            gidx, rows, weight = sampler.rank_batch(st.epoch, st.position, vr, V)
            b = data.build_batch(rows, instruction_prob=cfg.instruction_prob, rng=batch_rng(cfg.seed, st.epoch, gidx),
                                 prompt_len=prompt_len, cond_len=cond_bound, emotion_adv=cfg.emotion_adv)
            torch.manual_seed(mix_seed(cfg.seed, "step", st.global_step, vr))  # dropout: a function of the step
            sync = contextlib.nullcontext() if (not dd.enabled or micro == cfg.grad_accum - 1) else wrapped.no_sync()
            with sync:
                with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss, stats = wrapped(b.batch, b.is_instruction, weight / cfg.grad_accum)
                loss.backward()
            part = torch.cat([stats.float() * weight, torch.tensor([weight, b.n_real_tokens * weight,
                                                                    b.n_padded_tokens * weight], device=stats.device)])
            red = part if red is None else red + part
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if dd.enabled:
            dist.all_reduce(red)
        vals = torch.cat([red, gnorm.detach().float().reshape(1).to(red.device)]).cpu().double()
        finite = bool(torch.isfinite(vals).all())
        lr_f = lr_factor(st.global_step, cfg.warmup_steps, st.total_steps, cfg.min_lr_ratio)
        if finite:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_f
            opt.step()
            st.consecutive_nonfinite = 0
            w_sum = float(vals[len(_STAT_NAMES)])
            acc[:3] += vals[:3] / max(w_sum, 1e-12) if w_sum else 0
            acc[3:len(_STAT_NAMES)] += vals[3:len(_STAT_NAMES)]
            acc[-1] += 1
            acc_gnorm += float(vals[-1])
        else:
            opt.zero_grad(set_to_none=True)
            st.consecutive_nonfinite += 1
            st.nonfinite_total += 1
            log.warning("stage2: non-finite step skipped at step %d (loss %s, grad norm %s)", st.global_step,
                        float(vals[0]), float(vals[-1]))
            if st.consecutive_nonfinite > cfg.max_nonfinite:
                raise Stage2NonFiniteError(
                    f"stage 2: {st.consecutive_nonfinite} consecutive non-finite steps at step {st.global_step} "
                    f"(epoch {st.epoch}); {st.nonfinite_total} skipped in total (max_nonfinite={cfg.max_nonfinite}). "
                    f"Lower lr, check the cache for NaN/inf vectors, or try amp_dtype='fp32'. Last good checkpoint: "
                    f"{_latest_checkpoint(out)}")
        n_tok, n_pad = float(vals[len(_STAT_NAMES) + 1]), float(vals[len(_STAT_NAMES) + 2])
        acc_tokens += n_tok
        acc_padded += n_pad
        st.tokens_seen += int(n_tok)
        st.global_step += 1
        st.position += V
        if st.position >= nb:
            st.epoch += 1
            st.position = 0
        if bar is not None:
            bar.update(1)

        if cfg.log_every > 0 and st.global_step % cfg.log_every == 0:
            row = _log_row(acc, acc_t, acc_tokens, acc_padded, acc_gnorm, st, nb, lr_f * cfg.lr)
            acc.zero_()
            acc_t, acc_tokens, acc_padded, acc_gnorm = time.time(), 0, 0, 0.0
            if dd.rank == 0:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                if on_log is not None:
                    on_log(row)
        if cfg.save_every > 0 and st.global_step % cfg.save_every == 0:
            save()
        if stop_requested():  # Ctrl-C (tts_core.interrupt; never set under torchrun): checkpoint here, then stop
            if last_saved != st.global_step:
                save()
            raise TrainingInterrupted(f"stage 2 stopped at step {st.global_step}, checkpoint "
                                      f"{_latest_checkpoint(out)}; rerun the same command to resume")
    stopped = "done" if st.epoch >= cfg.epochs else "max_steps"
    if bar is not None:
        bar.close()

    if last_saved != st.global_step:
        save()
    history = _read_metrics(metrics_path)
    ckpt = None
    if dd.rank == 0:
        ckpt_dir = _latest_checkpoint(out)
        _publish(out, ckpt_dir)
        ckpt = out
        summary = {"t3_source": cfg.t3, "t3_found": meta["t3_found"], "load_report": meta["load_report"],
                   "tokenizer": tokenizer.to_dict(),
                   "mapper_dir": str(cfg.mapper_dir), "text_encoder": meta["text_encoder"] or {},
                   "data": data_stats, "config": cfg.to_dict(), "world_size": dd.world_size, "device": str(device),
                   "amp": str(amp).removeprefix("torch.") if amp else "fp32", "global_step": st.global_step,
                   "epoch": st.epoch, "stopped_reason": stopped, "nonfinite_steps": st.nonfinite_total,
                   "trainable": trainable, "frozen": frozen}
        _write_report(out, summary, history, plot=True)
    dd.barrier()
    return Stage2Result(run_dir=out, checkpoint=ckpt, global_step=st.global_step, epoch=st.epoch,
                        stopped_reason=stopped, history=history, trainable=trainable, frozen=frozen,
                        nonfinite_steps=st.nonfinite_total, world_size=dd.world_size, t3=t3, encoder=encoder,
                        mapper=mapper, tokenizer=tokenizer, load_report=meta["load_report"], data_stats=data_stats)


def _log_row(acc: torch.Tensor, t_start: float, tokens: float, padded: float, gnorm_sum: float, st: _State,
             nb: int, lr: float) -> dict:
    a = dict(zip(_STAT_NAMES, acc[:len(_STAT_NAMES)].tolist()))
    n = max(float(acc[-1]), 1.0)
    dt = max(time.time() - t_start, 1e-9)

    def ratio(x, y):
        return a[x] / a[y] if a[y] > 0 else None

    return {
        "step": st.global_step, "total_steps": st.total_steps, "epoch": st.epoch + st.position / max(nb, 1), "lr": lr,
        "loss": a["loss"] / n, "loss_text": a["loss_text"] / n, "loss_speech": a["loss_speech"] / n,
        "text_inst": ratio("ce_text_inst", "n_text_inst"), "text_audio": ratio("ce_text_audio", "n_text_audio"),
        "speech_inst": ratio("ce_speech_inst", "n_speech_inst"),
        "speech_audio": ratio("ce_speech_audio", "n_speech_audio"),
        "inst_frac": ratio("n_inst_rows", "n_rows"), "grad_norm": gnorm_sum / n,
        "tokens_per_s": tokens / dt, "pad_frac": 1 - tokens / padded if padded else 0.0,
        "nonfinite_total": st.nonfinite_total, "steps_in_row": int(acc[-1]), "time": time.time(),
    }
