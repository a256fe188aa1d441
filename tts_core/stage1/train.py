"""Stage-1 training loop: instruction encoder (pooling) + flow-matching mapper, as a library.

    data = Stage1Data.from_reader(CacheReader(url))
    result = train_stage1(data, Stage1TrainConfig(out_dir="runs/stage1"), on_epoch=print)
    encoder, mapper, meta = load_mapper("runs/stage1", text_encoder_identity=text_encoder.identity)

Speed path: the per-clip tables (vectors, instruction ids) are moved to the device once, and so are
the instruction states when their ragged table fits ``states_in_memory_mb``: an epoch is then a
device-side permutation and each batch a handful of index ops on device tensors (no DataLoader, no
per-sample Python). The only host sync per step is one 4-float transfer (loss parts and gradient norm)
used to skip non-finite steps. Bigger state tables are streamed from the store per batch, in a
chunk-aware order with one batch of read-ahead (`tts_core.stage1.batches`); the padded [U, Lmax, H]
table is never built (300k unique flan-t5-large instructions would make it ~17 GB).

Phases: phase 1 trains with the heads reconstructing from ground-truth x1 at
``lr_phase1``; phase 2 (``use_predicted_recon``) starts from phase 1's *best* checkpoint at the lower
``lr_phase2`` with a fresh optimizer and a reset best cosine. Each phase early-stops on held-out AvgCos
= (SpkCos + XVecCos) / 2 after ``patience`` evaluations without an improvement of ``min_delta``. The run
root then publishes the better of the phases' best checkpoints (same held-out rows, same eval noise).

Held-out evaluation uses a fixed noise tensor (``eval_seed``), so two evaluations differ only by the
weights. Baselines, computed once beside it: the train-set mean vector, and nearest neighbour on
instruction text (mean-pooled raw text-encoder states, cosine; predict the mean GT vectors of the nearest
train instruction's clips). The nearest-neighbour search is exact up to ``nn_max_queries`` held-out ×
``nn_max_keys`` train instructions; above that it runs on a seeded uniform sample of each (held-out
clips of the sampled instructions are scored), which keeps it O(queries × keys) instead of quadratic in
the data; the report says when it was sampled.

Output directory::

    mapper.safetensors + mapper.json     selected checkpoint (what `load_mapper(out_dir)` reads)
    phase1/, phase2/                     each phase's best checkpoint
    last/resume.pt (+ resume.json)       model, optimizer, RNG, position; written atomically at every
                                         evaluation (and every ``checkpoint_every`` steps), so a killed run
                                         restarted with the same config resumes at the same epoch/step
                                         and ends bit-equal to an uninterrupted run (CPU); Ctrl-C under
                                         `tts_core.interrupt.stop_after_step` writes it at that step
    metrics.json, report.md              per-evaluation held-out SpkCos / XVecCos / AvgCos and baselines

The loop is `Stage1Recipe` (set-up → resume → phases of steps / evaluate / checkpoint → report); resume
refusal, non-finite steps and the progress bar are `tts_core.training`'s.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tts_core.interrupt import TrainingInterrupted, stop_requested
from tts_core.precision import resolve_amp
from tts_core.mapper.flow import InstructionMapper, MapperConfig
from tts_core.mapper.pooling import InstructionEncoder, check_text_encoder_identity
from tts_core.run_models import frozen_models_record
from tts_core.stage1.artifacts import (
    META_FILE, WEIGHTS_FILE, Stage1Model, atomic_torch_save, atomic_write_json, atomic_write_text,
    copy_checkpoint, dtype_name, load_mapper, load_weights, read_meta, resolve_checkpoint, save_checkpoint,
)
from tts_core.seeds import mix_seed as _mix_seed
from tts_core.stage1.batches import Stage1Batches, Stage1Tables
from tts_core.stage1.data import Stage1Data
from tts_core.training import (
    NonFiniteSteps, config_changes, fmt as _fmt, progress_bar, refuse_other_run, resolve_device, set_lr,
)

__all__ = ["Stage1TrainConfig", "Stage1Result", "NonFiniteLossError", "Stage1Recipe", "train_stage1", "load_mapper",
           "compute_baselines", "evaluate"]

log = logging.getLogger(__name__)

PHASES = {"1": ("1",), "2": ("2",), "both": ("1", "2")}
_POOL_CHUNK = 256  # instructions pooled at once in evaluation: bounds the [n, Lmax, H] fp32 temporaries
RESUME_FILE = "resume.pt"


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive non-finite training steps."""


@dataclass
class Stage1TrainConfig:
    out_dir: str = "runs/stage1"
    phase: str = "both"  # "1" | "2" | "both"
    batch_size: int = 512
    lr_phase1: float = 3e-4
    lr_phase2: float = 5e-5  # lower: phase 2 fine-tunes phase 1's best
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up at the start of each phase, then constant
    grad_clip: float = 1.0  # 0 = no clipping
    epochs: int = 20  # max epochs per phase (but see min_phase_steps)
    min_phase_steps: int = 1000  # a phase runs at least this many steps before `epochs` can end it (small caches)
    patience: int = 3  # evaluations without AvgCos improvement before a phase stops
    min_delta: float = 1e-4
    eval_every: int = 0  # optimizer steps between evaluations; 0 = every max(epoch, 100 steps)
    checkpoint_every: int = 0  # extra resume checkpoints every N steps (0 = only at evaluations)
    max_steps: int | None = None  # stop the whole run after this many steps (both phases counted)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available
    amp_dtype: str = "auto"  # "bf16" | "fp32" | "auto" (bf16 on CUDA, fp32 elsewhere); pooling is always fp32
    max_nonfinite: int = 20  # more consecutive non-finite steps than this → NonFiniteLossError
    held_out_frac: float = 0.05
    split_salt: str = "instruct-tts/stage1"
    split_by: str = "instruction"  # "instruction" | "speaker" (stage1/data.py, "Held-out split rule")
    eval_n_steps: int = 10  # Euler steps in held-out evaluation
    # mapper draws averaged in the early-stopping evaluation (at most the mapper's own `draws`): a checkpoint's
    # ranking needs far fewer than what stage 2 receives (64 in the lab), and each draw is a full flow integration
    # over every held-out row at every evaluation
    eval_draws: int = 8
    eval_seed: int = 1234
    eval_batch_size: int = 8192
    nn_max_queries: int = 2048  # nearest-instruction baseline: held-out instructions searched (sampled above)
    nn_max_keys: int = 50_000  # ... among this many train instructions (sampled above)
    states_in_memory_mb: float = 2048  # ragged state tables up to this size live in memory / on the device
    states_cache_mb: float = 1024  # bigger ones are streamed through a chunk cache of this size
    init_from: str | None = None  # phase "2" alone: a stage-1 checkpoint (run dir) to start from
    resume: bool = True  # continue from out_dir/last when it exists
    progress: bool = False  # tqdm bar over steps

    def to_dict(self) -> dict:
        return asdict(self)


# Fields that must match for a resume to be the same run (the rest may change: epochs, patience, ...).
_RESUME_KEYS = ("phase", "batch_size", "lr_phase1", "lr_phase2", "weight_decay", "warmup_steps", "grad_clip",
                "seed", "held_out_frac", "split_salt", "split_by", "eval_n_steps", "eval_draws", "eval_seed",
                "init_from")
_DEFAULTS = Stage1TrainConfig().to_dict()  # a key an older run's saved config lacks had this value


@dataclass
class Stage1Result:
    run_dir: Path
    checkpoint: Path | None  # run_dir/mapper.safetensors (selected phase), None if nothing was evaluated
    best: dict  # metrics row of the selected checkpoint
    history: list[dict]
    baselines: dict
    phase_best: dict  # phase -> metrics row of its best checkpoint
    global_step: int
    nonfinite_steps: int
    stopped_reason: str  # "done" | "max_steps"
    n_train: int
    n_val: int
    model: Stage1Model  # weights at the last step (not necessarily the best)


@dataclass
class _State:
    """Everything besides tensors that a resume needs (saved in last/resume.pt)."""

    phase_idx: int = 0
    epoch: int = 0  # epochs completed in the current phase
    batch: int = 0  # next batch index in the current epoch
    global_step: int = 0
    phase_step: int = 0
    best_avg: float = -math.inf
    bad_evals: int = 0
    phase_finished: bool = False
    done: bool = False
    consecutive_nonfinite: int = 0
    nonfinite_total: int = 0
    last_eval_step: int = -1
    history: list = field(default_factory=list)
    phase_best: dict = field(default_factory=dict)


# ---- helpers ------------------------------------------------------------------------------------------------
def _lr_at(cfg: Stage1TrainConfig, phase: str, phase_step: int) -> float:
    base = cfg.lr_phase1 if phase == "1" else cfg.lr_phase2
    if cfg.warmup_steps > 0 and phase_step < cfg.warmup_steps:
        return base * (phase_step + 1) / cfg.warmup_steps
    return base


def _epochs_done(cfg: Stage1TrainConfig, st: "_State") -> bool:
    return st.epoch >= cfg.epochs and st.phase_step >= cfg.min_phase_steps


def _eval_interval(cfg: Stage1TrainConfig, n_batches: int) -> int:
    """Steps between evaluations: as configured, else one epoch but never under 100 steps (tiny caches)."""
    return cfg.eval_every if cfg.eval_every > 0 else max(n_batches, 100)


def _cos_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


# ---- evaluation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_baselines(data: Stage1Data, train_rows: np.ndarray, val_rows: np.ndarray,
                      device: torch.device | str = "cpu", chunk: int = 256, max_queries: int = 2048,
                      max_keys: int = 50_000, seed: int = 0) -> dict:
    """Held-out cosines of two references: the train-set mean vector, and nearest neighbour on instruction text.

    The nearest-neighbour search runs on at most ``max_queries`` held-out and ``max_keys`` train
    instructions (seeded uniform samples; exact when both cover everything — module doc)."""
    device = torch.device(device)
    # (clip, caption) pairs: ``train_rows`` / ``val_rows`` index the caption table (= clip rows with one
    # caption per clip); the mean baseline counts each train clip once
    clip, cap_iid = torch.from_numpy(data.captions.clip_of), torch.from_numpy(data.captions.ids)
    tr, va = clip[torch.from_numpy(train_rows)], clip[torch.from_numpy(val_rows)]
    tr_pair_iid, va_pair_iid = cap_iid[torch.from_numpy(train_rows)], cap_iid[torch.from_numpy(val_rows)]
    spk, xv = data.spk, data.xvec
    out = {}
    tr_u = torch.unique(tr)
    m_spk, m_xv = _cos_mean(spk[va], spk[tr_u].mean(0)[None]), _cos_mean(xv[va], xv[tr_u].mean(0)[None])
    out.update(mean_spk_cos=m_spk, mean_xvec_cos=m_xv, mean_avg_cos=(m_spk + m_xv) / 2)

    # Nearest neighbour on mean-pooled raw text states (sorted ids: a streamed source reads front to back).
    rng = np.random.default_rng(_mix_seed(seed, "nn-baseline"))
    all_train_u, all_val_u = np.unique(tr_pair_iid.numpy()), np.unique(va_pair_iid.numpy())
    train_u, val_u = _sample_sorted(all_train_u, max_keys, rng), _sample_sorted(all_val_u, max_queries, rng)
    both = np.union1d(train_u, val_u)
    pooled = F.normalize(data.mean_pooled_states(both, chunk, device), dim=-1)
    key_pos, query_pos = np.searchsorted(both, train_u), np.searchsorted(both, val_u)
    keys = torch.from_numpy(key_pos).to(device)
    tr_iid = tr_pair_iid.to(device)
    slot = torch.full((data.n_instructions,), -1, dtype=torch.long, device=device)  # instruction → key index
    slot[torch.from_numpy(train_u).to(device)] = torch.arange(len(train_u), device=device)
    tr_slot = slot[tr_iid]
    used = tr_slot >= 0
    counts = torch.zeros(len(train_u), device=device).index_add_(0, tr_slot[used], torch.ones(int(used.sum()), device=device))
    sum_spk = torch.zeros(len(train_u), spk.shape[1], device=device).index_add_(0, tr_slot[used], spk[tr].to(device)[used])
    sum_xv = torch.zeros(len(train_u), xv.shape[1], device=device).index_add_(0, tr_slot[used], xv[tr].to(device)[used])
    nn_of_val = torch.empty(len(val_u), dtype=torch.long, device=device)
    for i in range(0, len(val_u), chunk):
        sims = pooled[torch.from_numpy(query_pos[i:i + chunk]).to(device)] @ pooled[keys].T
        nn_of_val[i:i + chunk] = sims.argmax(dim=1)
    va_iid = va_pair_iid.numpy()
    scored = np.isin(va_iid, val_u)
    pred = nn_of_val[torch.from_numpy(np.searchsorted(val_u, va_iid[scored])).to(device)]
    va_s = va[torch.from_numpy(scored)]
    n_spk = _cos_mean(spk[va_s].to(device), sum_spk[pred] / counts[pred, None])
    n_xv = _cos_mean(xv[va_s].to(device), sum_xv[pred] / counts[pred, None])
    out.update(nn_spk_cos=n_spk, nn_xvec_cos=n_xv, nn_avg_cos=(n_spk + n_xv) / 2, nn_queries=int(len(val_u)),
               nn_keys=int(len(train_u)),
               nn_sampled=bool(len(val_u) < len(all_val_u) or len(train_u) < len(all_train_u)))
    return out


def _sample_sorted(ids: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(ids, k, replace=False)) if len(ids) > k else ids


@torch.no_grad()
def evaluate(model: Stage1Model, dd: Stage1Tables, noise: torch.Tensor, n_steps: int, batch_size: int = 8192) -> dict:
    """Held-out SpkCos / XVecCos / AvgCos of inferred vectors vs ground truth (fixed noise [draws, rows, dim]: the
    mean of that many decoded draws; [rows, dim]: one draw)."""
    was_training = model.training
    model.eval()
    rows, inv, vs = dd.val_rows, dd.val_inv, dd.val_states
    pool = min(batch_size, _POOL_CHUNK)
    style_u = torch.cat([model.encoder(*vs.gather(torch.arange(i, min(i + pool, vs.n_instructions))))
                         for i in range(0, vs.n_instructions, pool)])
    spk_sum = xv_sum = 0.0
    for i in range(0, len(rows), batch_size):
        r = rows[i:i + batch_size]
        spk_hat, xv_hat = model.mapper.inference(style_u[inv[i:i + batch_size]], n_steps=n_steps,
                                                 noise=noise[:, i:i + batch_size],
                                                 draws=noise.shape[0] if noise.dim() == 3 else 1)
        spk_sum += float(F.cosine_similarity(spk_hat, dd.spk[r], dim=-1).sum())
        xv_sum += float(F.cosine_similarity(xv_hat, dd.xvec[r], dim=-1).sum())
    model.train(was_training)
    n = max(len(rows), 1)
    s, x = spk_sum / n, xv_sum / n
    return {"spk_cos": s, "xvec_cos": x, "avg_cos": (s + x) / 2}


# ---- report -----------------------------------------------------------------------------------------------------
def _nn_note(b: dict) -> str:
    return f"; sampled: {b['nn_queries']} held-out × {b['nn_keys']} train instructions" if b.get("nn_sampled") else ""


def _write_report(out: Path, summary: dict) -> None:
    atomic_write_json(out / "metrics.json", summary)
    b = summary["baselines"]
    lines = [
        "# Stage 1 — instruction mapper", "",
        f"- data: {summary['data']['n_clips']} clips, {summary['data']['n_instructions']} unique instructions, "
        f"hidden size {summary['data']['hidden_size']}; train {summary['data']['n_train']} / held-out "
        f"{summary['data']['n_val']} clips (split by {summary['config'].get('split_by', 'instruction')} hash, salt "
        f"`{summary['config']['split_salt']}`)",
        f"- text encoder: `{summary['text_encoder'].get('name')}` (sha256 {str(summary['text_encoder'].get('sha256'))[:12]})",
        f"- stopped: {summary['stopped_reason']}; steps {summary['global_step']}; non-finite steps skipped "
        f"{summary['nonfinite_steps']}",
        f"- selected checkpoint: {summary.get('selected_phase') or '—'} "
        f"(held-out AvgCos {_fmt((summary.get('best') or {}).get('avg_cos'))})", "",
        "## Baselines (held-out)", "",
        "| baseline | SpkCos | XVecCos | AvgCos |", "|---|---|---|---|",
        f"| train-set mean vector | {_fmt(b['mean_spk_cos'])} | {_fmt(b['mean_xvec_cos'])} | {_fmt(b['mean_avg_cos'])} |",
        f"| nearest instruction (mean-pooled text states{_nn_note(b)}) | {_fmt(b['nn_spk_cos'])} | "
        f"{_fmt(b['nn_xvec_cos'])} | "
        f"{_fmt(b['nn_avg_cos'])} |", "",
        "## Held-out evaluations", "",
        "| phase | epoch | step | train loss | SpkCos | XVecCos | AvgCos | mean AvgCos | NN AvgCos | best | rows/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in summary["history"]:
        lines.append(
            f"| {h['phase']} | {h['epoch']:.2f} | {h['step']} | {_fmt(h['train_loss'])} | {_fmt(h['spk_cos'])} | "
            f"{_fmt(h['xvec_cos'])} | {_fmt(h['avg_cos'])} | {_fmt(b['mean_avg_cos'])} | {_fmt(b['nn_avg_cos'])} | "
            f"{'*' if h['improved'] else ''} | {h['rows_per_s']:.0f} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# ---- the recipe -------------------------------------------------------------------------------------------------
def train_stage1(data: Stage1Data, cfg: Stage1TrainConfig, mapper_cfg: MapperConfig | None = None,
                 on_epoch: Callable[[dict], None] | None = None) -> Stage1Result:
    """Train (or resume) stage 1 on in-memory data; see the module docstring for outputs and semantics.

    ``on_epoch(metrics)`` is called after every held-out evaluation (end of epoch unless ``eval_every``),
    once the resume checkpoint for that point is on disk.
    """
    return Stage1Recipe(data, cfg, mapper_cfg, on_epoch).train()


def _fresh_acc() -> dict:
    return {"loss": 0.0, "fm": 0.0, "recon": 0.0, "n": 0, "t": time.time(), "rows": 0}


class Stage1Recipe:
    """One stage-1 run (module doc). ``train()`` is the whole story; each step is a method below."""

    def __init__(self, data: Stage1Data, cfg: Stage1TrainConfig, mapper_cfg: MapperConfig | None = None,
                 on_epoch: Callable[[dict], None] | None = None):
        if cfg.phase not in PHASES:
            raise ValueError(f"phase must be '1', '2' or 'both', not {cfg.phase!r}")
        self.data, self.cfg, self.on_epoch = data, cfg, on_epoch
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.amp = resolve_amp(cfg.amp_dtype, self.device)
        self.phases = PHASES[cfg.phase]
        H = data.hidden_size
        self.mapper_cfg = MapperConfig(**asdict(mapper_cfg or MapperConfig()))
        if self.mapper_cfg.cond_dim is None:
            self.mapper_cfg.cond_dim = H
        elif self.mapper_cfg.cond_dim != H:
            raise ValueError(f"MapperConfig.cond_dim {self.mapper_cfg.cond_dim} != text encoder hidden size {H}")
        self.resume_path = self.out / "last" / RESUME_FILE

    def train(self) -> Stage1Result:
        self.setup()
        self.resume()
        self.bar = progress_bar(self.cfg.progress, self.cfg.max_steps, self.st.global_step, "stage1")
        stopped_reason = "done"
        while self.st.phase_idx < len(self.phases) and not self.st.done:
            if self.run_phase():
                stopped_reason = "max_steps"
                break
        self.batches.close()
        if self.bar is not None:
            self.bar.close()
        return self.report(stopped_reason)

    # -- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """The held-out split, model, device tables, baselines and the fixed evaluation noise."""
        cfg, data, device = self.cfg, self.data, self.device
        train_rows, val_rows = data.split(cfg.held_out_frac, cfg.split_salt, cfg.split_by)  # caption indices
        if len(train_rows) == 0 or len(val_rows) == 0:
            raise ValueError(f"split gave {len(train_rows)} train / {len(val_rows)} held-out clips; stage 1 needs "
                             "both (need at least 2 distinct instruction texts and held_out_frac > 0)")
        # train: clips (each one item per epoch, whatever its number of captions); held-out: (clip, caption) pairs
        self.n_train, self.n_val = len(data.train_captions(train_rows)[0]), len(val_rows)
        self.fingerprint = data.fingerprint()

        torch.manual_seed(cfg.seed)
        encoder = InstructionEncoder(data.hidden_size, states_dtype=data.states.dtype)
        self.model = Stage1Model(encoder, InstructionMapper(self.mapper_cfg)).to(device)
        self.tables = Stage1Tables.build(data, train_rows, val_rows, device, eval_in_memory_mb=cfg.states_in_memory_mb)
        self.batches = Stage1Batches(self.tables, cfg.batch_size, cfg.seed)
        t0 = time.time()
        self.baselines = compute_baselines(data, train_rows, val_rows, device, max_queries=cfg.nn_max_queries,
                                           max_keys=cfg.nn_max_keys, seed=cfg.eval_seed)
        log.info("stage1 baselines (%.1fs): %s", time.time() - t0, self.baselines)
        eval_draws = max(1, min(self.mapper_cfg.draws, cfg.eval_draws))
        self.eval_noise = torch.randn((eval_draws, self.n_val, self.mapper_cfg.dim),
                                      generator=torch.Generator().manual_seed(cfg.eval_seed)).to(device)
        self.noise_gen = torch.Generator(device=device).manual_seed(_mix_seed(cfg.seed, "noise"))
        self.n_batches = math.ceil(self.n_train / cfg.batch_size)
        self.eval_interval = _eval_interval(cfg, self.n_batches)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.base_meta = {
            "text_encoder": data.text_encoder_identity,
            "cache": data.cache_identity,
            # the frozen models this mapper was trained over, where they were loaded from (tts_core.run_models)
            "frozen_models": frozen_models_record((data.cache_identity or {}).get("models")),
            "train_config": cfg.to_dict(),
            "data": {"fingerprint": self.fingerprint, "n_clips": data.n_clips, "n_captions": data.n_captions,
                     "n_instructions": data.n_instructions,
                     "hidden_size": data.hidden_size, "n_train": self.n_train, "n_val": self.n_val,
                     "states_dtype": dtype_name(data.states.dtype), "dropped": data.dropped},
            "baselines": self.baselines,
        }

    # -- resume ------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Model, optimizer, RNGs and position from ``last/resume.pt`` (refused when it is another run)."""
        self.st = _State()
        self.opt: torch.optim.Optimizer | None = None
        self.resumed_opt_state = None
        if self.cfg.resume and self.resume_path.exists():
            saved = torch.load(self.resume_path, map_location="cpu", weights_only=True)
            self._check_resume(saved)
            self.model.load_state_dict(saved["model"])
            self.st = _State(**json.loads(saved["state"]))
            self.resumed_opt_state = saved["optimizer"] or None  # {} when saved between phases
            try:
                self.noise_gen.set_state(saved["noise_gen"])
            except (RuntimeError, TypeError):
                log.warning("resume on another device type: noise RNG reseeded (not bit-identical)")
            torch.set_rng_state(saved["rng_cpu"])
            if self.device.type == "cuda" and saved.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(saved["rng_cuda"], self.device)
            st = self.st
            log.info("resumed %s at phase %s epoch %d batch %d (step %d)", self.out,
                     self.phases[min(st.phase_idx, len(self.phases) - 1)], st.epoch, st.batch, st.global_step)
        self.nonfinite = NonFiniteSteps(self.st, self.cfg.max_nonfinite)

    def _check_resume(self, saved: dict) -> None:
        problems = [] if saved.get("fingerprint") == self.fingerprint else [
            "the data differ (clip ids / instructions / text encoder)"]
        problems += config_changes(json.loads(saved["config"]), self.cfg.to_dict(), _RESUME_KEYS, _DEFAULTS)
        old_m = json.loads(saved["mapper_config"])
        if old_m != self.mapper_cfg.to_dict():
            problems.append(f"mapper config: {old_m} then, {self.mapper_cfg.to_dict()} now")
        refuse_other_run(self.resume_path, problems)

    # -- a phase, one step ---------------------------------------------------------------------------------------
    def run_phase(self) -> bool:
        """Train the current phase until it stops early or runs out of epochs, then move to the next.
        → True when ``max_steps`` ended the run (the phase is left to resume)."""
        cfg, st = self.cfg, self.st
        phase = self.phases[st.phase_idx]
        if not st.phase_finished:  # (a run resumed right after a phase ended goes straight to the next)
            self.start_phase(phase)
            self.acc = _fresh_acc()
            while not _epochs_done(cfg, st) and not st.phase_finished:
                for b in range(st.batch, self.n_batches):
                    if cfg.max_steps is not None and st.global_step >= cfg.max_steps:  # resumed at the very end
                        return True
                    self.one_step(phase, b)
                    if self.after_step(phase):
                        return True
                    if st.phase_finished:
                        break
        st.phase_finished = True  # early stopping or epochs exhausted
        _advance_phase(st)
        self.opt = None
        self.resumed_opt_state = None  # a saved optimizer was the finished phase's; the next one starts fresh
        st.done = st.phase_idx >= len(self.phases)
        self.save_checkpoint()
        return False

    def start_phase(self, phase: str) -> None:
        """The phase's optimizer (resumed, or fresh — phase 2 then first loads phase 1's best weights)."""
        if self.opt is not None:
            return
        if self.st.phase_step == 0 and self.resumed_opt_state is None and phase == "2":
            _init_phase2(self.model, self.cfg, self.out, self.phases, self.data)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=_lr_at(self.cfg, phase, 0),
                                     weight_decay=self.cfg.weight_decay,
                                     fused=True if self.device.type == "cuda" else None)  # fused: one kernel/step
        if self.resumed_opt_state:
            self.opt.load_state_dict(self.resumed_opt_state)
        self.resumed_opt_state = None

    def one_step(self, phase: str, b: int) -> None:
        """Batch ``b`` of the epoch: loss, clipped step (skipped and counted when non-finite), position."""
        cfg, st, model, opt, device = self.cfg, self.st, self.model, self.opt, self.device
        batch = self.batches.get(phase, st.epoch, b)
        style = model.encoder(batch.states, batch.lengths)  # fp32, autocast off inside
        with torch.autocast(device_type=device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss, parts = model.mapper.loss(style, batch.spk, batch.xvec, use_predicted_recon=phase == "2",
                                            generator=self.noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        vals = torch.stack([loss.detach().float(), parts["fm"].float(), parts["recon"].float(),
                            gnorm.detach().float()]).tolist()
        if all(math.isfinite(v) for v in vals):
            lr = _lr_at(cfg, phase, st.phase_step)
            set_lr(opt, lambda g: lr)
            opt.step()
            self.nonfinite.ok()
            for k, v in zip(("loss", "fm", "recon"), vals):
                self.acc[k] += v
            self.acc["n"] += 1
        else:
            opt.zero_grad(set_to_none=True)
            self.nonfinite.skipped(
                f"non-finite step skipped (phase {phase} step {st.global_step}): loss {vals[0]} grad-norm {vals[3]}",
                lambda: NonFiniteLossError(
                    f"stage 1: {st.consecutive_nonfinite} consecutive non-finite steps (loss {vals[0]}, "
                    f"grad norm {vals[3]}) at phase {phase}, epoch {st.epoch}, step {st.global_step}; "
                    f"{st.nonfinite_total} skipped in total (max_nonfinite={cfg.max_nonfinite}). Check the "
                    f"data for NaN/inf, lower lr_phase{phase}, or try amp_dtype='fp32'. The last good "
                    f"resume checkpoint is {self.resume_path}."))
        self.acc["rows"] += batch.size
        st.batch = b + 1
        st.global_step += 1
        st.phase_step += 1
        if self.bar is not None:
            self.bar.update(1)

    def after_step(self, phase: str) -> bool:
        """Epoch bookkeeping, evaluation / resume checkpoint when due, Ctrl-C at the step boundary.
        → True when ``max_steps`` is reached."""
        cfg, st = self.cfg, self.st
        epoch_end = st.batch == self.n_batches
        if epoch_end:
            st.epoch += 1
            st.batch = 0
        hit_max = cfg.max_steps is not None and st.global_step >= cfg.max_steps
        if st.phase_step % self.eval_interval == 0 or (epoch_end and _epochs_done(cfg, st)) or hit_max:
            metrics = self.evaluate(phase)
            self.save_checkpoint()
            if self.on_epoch is not None:
                self.on_epoch(metrics)
            self.acc = _fresh_acc()
        elif cfg.checkpoint_every > 0 and st.global_step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if stop_requested():  # Ctrl-C (tts_core.interrupt): state at this step boundary, then stop
            self.save_checkpoint()
            raise TrainingInterrupted(f"stage 1 stopped at step {st.global_step}, state saved in "
                                      f"{self.resume_path}; rerun the same command to resume")
        return hit_max

    # -- evaluate, checkpoint, report ----------------------------------------------------------------------------
    def evaluate(self, phase: str) -> dict:
        """Held-out cosines → a history row; the phase's best checkpoint when they improved; early stopping."""
        cfg, st, acc = self.cfg, self.st, self.acc
        t_train = time.time() - acc["t"]
        m = evaluate(self.model, self.tables, self.eval_noise, cfg.eval_n_steps, cfg.eval_batch_size)
        improved = m["avg_cos"] > st.best_avg + cfg.min_delta
        n = max(acc["n"], 1)
        row = {
            "phase": phase, "epoch": st.epoch + st.batch / self.n_batches, "step": st.global_step,
            "phase_step": st.phase_step, "train_loss": acc["loss"] / n if acc["n"] else None,
            "train_fm": acc["fm"] / n if acc["n"] else None, "train_recon": acc["recon"] / n if acc["n"] else None,
            **m, "improved": bool(improved), "lr": self.opt.param_groups[0]["lr"],
            "rows_per_s": acc["rows"] / max(t_train, 1e-9), "train_seconds": t_train,
            "nonfinite_total": st.nonfinite_total, **self.baselines,
        }
        if improved:
            st.best_avg = m["avg_cos"]
            st.bad_evals = 0
        else:
            st.bad_evals += 1
        row["best_avg_cos"] = st.best_avg
        st.history.append(row)
        st.last_eval_step = st.global_step
        if improved:
            st.phase_best[phase] = row
            save_checkpoint(self.model, self.out / f"phase{phase}", {
                **self.base_meta, "phase": phase, "epoch": row["epoch"], "step": st.global_step,
                "best_avg_cos": st.best_avg, "metrics": row, "history": st.history,
            })
        if st.bad_evals >= cfg.patience or (_epochs_done(cfg, st) and st.batch == 0):
            st.phase_finished = True
        b = self.baselines
        log.info("stage1 phase %s epoch %.2f step %d: SpkCos %.4f XVecCos %.4f AvgCos %.4f%s (mean %.4f, NN %.4f)",
                 phase, row["epoch"], st.global_step, m["spk_cos"], m["xvec_cos"], m["avg_cos"],
                 " *" if improved else "", b["mean_avg_cos"], b["nn_avg_cos"])
        return row

    def save_checkpoint(self) -> None:
        """``last/resume.pt`` (+ ``resume.json``), atomically: a killed run resumes from here bit for bit."""
        st, device = self.st, self.device
        atomic_torch_save({
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict() if self.opt is not None else {},
            "state": json.dumps(asdict(st)),
            "config": json.dumps(self.cfg.to_dict()),
            "mapper_config": json.dumps(self.mapper_cfg.to_dict()),
            "fingerprint": self.fingerprint,
            "noise_gen": self.noise_gen.get_state(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }, self.resume_path)
        atomic_write_json(self.out / "last" / "resume.json",
                          {"state": {k: v for k, v in asdict(st).items() if k != "history"},
                           "config": self.cfg.to_dict()})

    def report(self, stopped_reason: str) -> Stage1Result:
        """Publish the better phase's best checkpoint at the run root; ``metrics.json`` + ``report.md``."""
        out, st = self.out, self.st
        selected = None
        if st.phase_best:
            selected = max(st.phase_best, key=lambda p: st.phase_best[p]["avg_cos"])
            if (out / f"phase{selected}" / META_FILE).exists():
                copy_checkpoint(out / f"phase{selected}", out, {"selected_phase": selected,
                                                                 "phase_best": st.phase_best, "history": st.history})
        bm = self.base_meta
        summary = {
            "config": self.cfg.to_dict(), "mapper_config": self.mapper_cfg.to_dict(), "text_encoder": bm["text_encoder"],
            "cache": bm["cache"], "data": bm["data"], "baselines": self.baselines, "history": st.history,
            "phase_best": st.phase_best, "selected_phase": selected,
            "best": st.phase_best.get(selected) if selected else None, "global_step": st.global_step,
            "nonfinite_steps": st.nonfinite_total, "stopped_reason": stopped_reason,
        }
        _write_report(out, summary)
        return Stage1Result(
            run_dir=out, checkpoint=(out / WEIGHTS_FILE) if selected else None, best=summary.get("best") or {},
            history=st.history, baselines=self.baselines, phase_best=st.phase_best, global_step=st.global_step,
            nonfinite_steps=st.nonfinite_total, stopped_reason=stopped_reason, n_train=self.n_train,
            n_val=self.n_val, model=self.model)


def _advance_phase(st: _State) -> _State:
    st.phase_idx += 1
    st.epoch = st.batch = st.phase_step = st.bad_evals = 0
    st.best_avg = -math.inf  # phase 2 resets best cosine
    st.phase_finished = False
    return st


def _init_phase2(model: Stage1Model, cfg: Stage1TrainConfig, out: Path, phases: tuple, data: Stage1Data) -> None:
    src = out / "phase1" if "1" in phases else (Path(cfg.init_from) if cfg.init_from else out / "phase1")
    try:
        resolve_checkpoint(src)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"phase 2 starts from phase 1's best checkpoint, but {e}. Run phase '1' (or 'both') "
                                "first, or set init_from to a stage-1 checkpoint.") from None
    meta = read_meta(src)
    check_text_encoder_identity(meta.get("text_encoder"), data.text_encoder_identity,
                                what=f"the phase-1 checkpoint {src}")
    load_weights(model, resolve_checkpoint(src)[0], strict=True)
    log.info("phase 2 starts from %s (AvgCos %s)", src, meta.get("best_avg_cos"))




# Fields accepted by Stage1TrainConfig (for CLI layers that build it from dicts).
CONFIG_FIELDS = tuple(f.name for f in fields(Stage1TrainConfig))
