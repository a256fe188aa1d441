"""The stage-2 loop, `Stage2Recipe` (module doc of `tts_core.stage2.train`): set-up → resume → one step / evaluate /
checkpoint → report; run directory, checkpoint directories, metrics rows, non-finite steps and the DDP helper are
`tts_core.training`'s."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tts_core.atomic_files import atomic_torch_save, atomic_write_json
from tts_core.interrupt import TrainingInterrupted, stop_requested
from tts_core.precision import resolve_amp
from tts_core.run_models import frozen_models_record
from tts_core.seeds import mix_seed
from tts_core.stage2.artifacts import (
    FORMAT, LATEST, METRICS, PREPARED, RUN_FILES, STAGE2_META, T3_WEIGHTS, TRAIN_STATE, absolute, publish,
    save_speech_codebook, speech_vocab_record, store_speech_tokenizer,
)
from tts_core.stage2.config import RECORDED_DEFAULTS, RUN_KEYS, Stage2Config
from tts_core.stage2.hold_out import mapper_split
from tts_core.stage2.metrics import STAT_NAMES, MetricsWindow
from tts_core.stage2.mixing import batch_rng
from tts_core.stage2.model import Stage2Model, build_t3, freeze_for_stage2, lr_factor, make_optimizer
from tts_core.stage2.prepare import prepare_stage2_data
from tts_core.stage2.report import write_report
from tts_core.stage2.row_mix import SCORED_AS_INSTRUCTION_ONLY
from tts_core.stage2.sampler import BucketBatchSampler
from tts_core.stage2.setup import check_stage1_for_store, run_text_tokenizer
from tts_core.stage2.text_tokenizer import TextTokenizer, check_language
from tts_core.t3 import T3, cond_lens, enable_activation_checkpointing, load_t3_checkpoint, save_t3
from tts_core.t3.families import FAMILIES
from tts_core.t3.loading import config_from_checkpoint
from tts_core.training import (
    CheckpointDir, DistEnv, NonFiniteSteps, config_changes, progress_bar, read_metrics, refuse_other_run, set_lr,
    truncate_metrics, write_metrics_row,
)

log = logging.getLogger(__name__)


class Stage2NonFiniteError(FloatingPointError):
    """Too many consecutive non-finite training steps."""


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
    val: dict = field(default_factory=dict)  # held-out losses at the end (hold_out="mapper"), else empty


@dataclass
class RunState:
    """Where a run stands (saved in ``train_state.pt``; a resume restores it)."""

    epoch: int = 0
    position: int = 0  # global batches consumed in this epoch
    global_step: int = 0
    nonfinite_total: int = 0
    consecutive_nonfinite: int = 0
    total_steps: int = 0  # LR-schedule length
    world_size: int = 1
    tokens_seen: int = 0


class Stage2Recipe:
    """One stage-2 run (module doc). ``train()`` is the whole story; each step is a method below."""

    def __init__(self, cfg: Stage2Config, on_log: Callable[[dict], None] | None, dd: DistEnv, device: torch.device):
        self.cfg, self.on_log, self.dd, self.device = cfg, on_log, dd, device
        self.out = Path(cfg.out_dir)
        self.ckpts = CheckpointDir(self.out, LATEST, complete=(TRAIN_STATE, T3_WEIGHTS))
        self.metrics_path = self.out / METRICS
        self._val: tuple[int | None, dict] = (None, {})  # (step, held-out losses) of the last evaluation

    def train(self) -> Stage2Result:
        self.setup()
        self.resume()
        self.build_training()
        cfg, st = self.cfg, self.st
        self.window = MetricsWindow()
        bar = progress_bar(cfg.progress and self.dd.rank == 0, st.total_steps, st.global_step, "stage2")
        while st.epoch < cfg.epochs and (cfg.max_steps is None or st.global_step < cfg.max_steps):
            nb = len(self.sampler.batches(st.epoch))
            lr_f = self.one_step()
            st.global_step += 1
            st.position += self.V
            if st.position >= nb:
                st.epoch += 1
                st.position = 0
            if bar is not None:
                bar.update(1)
            self.after_step(nb, lr_f)
        stopped = "done" if st.epoch >= cfg.epochs else "max_steps"
        if bar is not None:
            bar.close()
        if self.last_saved != st.global_step:
            self.save_checkpoint()
        return self.report(stopped, self.evaluate())

    # -- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Frozen stage-1 models, T3 + tokenizer, data, freezing (everything but the resume state)."""
        if self.dd.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dd.barrier()
        self.amp = resolve_amp(self.cfg.amp_dtype, self.device)
        self.load_frozen()
        self.load_t3()
        self.prepare_data()
        self.t3.to(self.device)
        self.trainable, self.frozen = freeze_for_stage2(self.t3, self.encoder, self.mapper)
        log.info("stage2 trainable params %s (total %d); frozen %s", self.trainable, sum(self.trainable.values()),
                 self.frozen)
        if self.cfg.grad_accum < 1:
            raise ValueError(f"grad_accum must be ≥ 1, not {self.cfg.grad_accum}")

    def load_frozen(self) -> None:
        """The store and its embedded speech tokenizer (None: S3 tokens), and the stage-1 encoder + mapper trained
        over the same text encoder (else refused)."""
        from cache.reader import CacheReader
        from tts_core.stage1.artifacts import load_mapper

        cfg = self.cfg
        self.reader = reader = CacheReader(cfg.store)
        self.speech_tokenizer = store_speech_tokenizer(cfg.store)
        self.store_te = reader.identities.get("text_encoder")
        self.encoder, self.mapper, self.mapper_meta = load_mapper(cfg.mapper_dir, device="cpu")
        check_stage1_for_store(reader, self.encoder, self.mapper_meta, store=cfg.store, mapper_dir=cfg.mapper_dir)
        self.encoder.to(self.device)
        self.mapper.to(self.device)

    def load_t3(self) -> None:
        """T3 (module doc, "t3 resolution"), its text tokenizer, the language and the prompt length."""
        cfg = self.cfg
        t3, report, source = build_t3(cfg.t3, instruction_dim=self.encoder.hidden_size, seed=cfg.seed,
                                      speech_codes=self.preset_speech_codes())
        codes = self.speech_tokenizer.vocab_size if self.speech_tokenizer is not None else None
        if codes is not None and codes > t3.cfg.start_speech_token:
            raise ValueError(f"the store's {self.speech_tokenizer.kind} speech tokenizer has {codes} codes but the T3 "
                             f"{cfg.t3} has speech ids for {t3.cfg.start_speech_token} (BOS): train a preset over "
                             "this store, or use a store of the tokens this T3 was trained on")
        t3_dir = source.directory if source is not None else None
        tokenizer = run_text_tokenizer(cfg.text_tokenizer, t3, source)
        self.language = check_language(cfg.language) if cfg.language else None
        if tokenizer.requires_language is False and cfg.language:
            log.warning("--language %s is ignored: the %s T3's tokenizer takes no language", cfg.language,
                        t3.cfg.family)
        if report is not None:
            log.info("T3 from %s: %s", cfg.t3, report.summary)
        if (t3_dir is not None and t3_dir.resolve() == self.out.resolve()
                and (not cfg.resume or self.ckpts.latest() is None)):
            raise ValueError(f"out_dir {self.out} is the --t3 source directory and holds no stage-2 checkpoint to "
                             "resume; a fresh run would overwrite its weights: choose another out_dir")
        limit = t3.cfg.speech_cond_prompt_len
        self.prompt_len = int(cfg.prompt_len if cfg.prompt_len is not None else limit)
        if not 0 <= self.prompt_len <= limit:
            raise ValueError(f"prompt_len must lie in [0, {limit}] (this Chatterbox T3 feeds ≤ {limit} prompt tokens)")
        self.t3, self.load_report, self.source, self.tokenizer = t3, report, source, tokenizer

    def preset_speech_codes(self) -> int | None:
        """What a preset T3's speech table is sized to (`build_t3` sizes presets only): the codes of the store's
        embedded tokenizer (None for S3 tokens: Chatterbox's 8194-row table). A resumed run keeps what its checkpoint
        records, whatever the store says."""
        latest = self.ckpts.latest() if self.cfg.resume else None
        recorded = config_from_checkpoint(latest / T3_WEIGHTS) if latest is not None else None
        if recorded is not None:
            return recorded.speech_codes
        return self.speech_tokenizer.vocab_size if self.speech_tokenizer is not None else None

    def prepare_data(self) -> None:
        """Rank 0 prepares the shared tables (the others then load them); the length-bucketed sampler."""
        cfg, dd, t3_cfg = self.cfg, self.dd, self.t3.cfg
        self.n_steps = int(cfg.mapper_n_steps or self.mapper.config.n_steps)
        kw = dict(mapper_meta=self.mapper_meta, mapper_seed=cfg.mapper_seed, mapper_samples=cfg.mapper_samples,
                  n_steps=self.n_steps, max_text_tokens=t3_cfg.max_text_tokens,
                  max_speech_tokens=t3_cfg.max_speech_tokens, prepared_path=self.out / PREPARED,
                  language=self.language, prompt_seconds=FAMILIES[t3_cfg.family].prompt_seconds)
        t0 = time.time()
        if dd.rank == 0:
            data = prepare_stage2_data(self.reader, self.tokenizer, self.encoder, self.mapper, **kw)
        dd.barrier()
        if dd.rank != 0:
            data = prepare_stage2_data(self.reader, self.tokenizer, self.encoder, self.mapper, write_prepared=False,
                                       **kw)
        self.encoder.cpu()
        self.mapper.cpu()
        self.val_data, held = None, {}
        if cfg.hold_out == "mapper":  # tts_core.stage2.hold_out
            train_rows, val_rows, held_ids = mapper_split(self.reader, self.mapper_meta, data.clip_ids,
                                                          cfg.mapper_dir)
            held = {"held_out_rows": len(val_rows), "excluded_rows": len(data) - len(train_rows) - len(val_rows)}
            self.val_data = data.subset(val_rows).to(self.device)
            data = data.subset(train_rows).without_instructions(held_ids)  # no held-out text is trained
        if len(data) == 0:
            raise ValueError(f"no usable rows in {cfg.store} (dropped: {data.dropped})")
        data.to(self.device)
        log.info("stage2 data ready in %.1fs: %d rows", time.time() - t0, len(data))
        self.data, self.fingerprint = data, data.meta["fingerprint"]
        # conditioning positions per row, at most (Turbo: 1 + prompt tokens; a perceiver T3: always 34)
        self.cond_bound = int(cond_lens(t3_cfg, torch.tensor([self.prompt_len]), 1)[0])
        self.sampler = BucketBatchSampler(data.seq_lens(self.cond_bound), batch_size=cfg.batch_size,
                                          max_tokens=cfg.max_tokens, pool_batches=cfg.pool_batches, seed=cfg.seed)
        self.data_stats = {"rows": len(data), "n_ok": data.meta["n_ok"], "dropped": data.dropped,
                           "n_instructions": data.n_instructions,
                           "rows_with_instruction": int((data.instruction_id >= 0).sum()),
                           "own_prompt_frac": len(data.own_prompt_rows) / len(data),
                           "prompt_seconds": data.meta["prompt_seconds"],
                           "row_mix": cfg.row_mix.shares(),
                           "batches_per_epoch": len(self.sampler.batches(0)), **self.sampler.padding_stats(0),
                           **held}

    # -- resume ------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Weights + position from the latest checkpoint (refused when it is another run), or a clean start;
        then the LR-schedule length."""
        cfg, dd = self.cfg, self.dd
        # A step covers V = ranks × grad_accum global batches; batch k of a step goes to "virtual rank"
        # v = micro·N + rank, so N ranks × A micro-batches and 1 rank × N·A micro-batches see the same
        # batches with the same seeds, and average the same gradients (tests/test_ddp_equivalence.py).
        self.V = V = dd.world_size * cfg.grad_accum
        self.st = st = RunState(world_size=V)
        latest = self.ckpts.latest() if cfg.resume else None
        self.saved_opt, saved_cfg = None, {}
        if latest is not None:
            saved = torch.load(latest / TRAIN_STATE, map_location="cpu", weights_only=True)
            saved_cfg = json.loads(saved["config"])
            problems = [] if saved["fingerprint"] == self.fingerprint else [
                "the data differ (store rows, text tokenizer, mapper weights or mapper seeds)"]
            refuse_other_run(latest, problems + config_changes(saved_cfg, cfg.to_dict(), RUN_KEYS, RECORDED_DEFAULTS))
            load_t3_checkpoint(self.t3, latest / T3_WEIGHTS, allow_missing_adapters=False)
            self.st = st = RunState(**json.loads(saved["state"]))
            self.saved_opt = saved["optimizer"]
            log.info("resumed %s at step %d (epoch %d, batch %d)", latest, st.global_step, st.epoch, st.position)
            if dd.rank == 0:
                truncate_metrics(self.metrics_path, st.global_step)
        elif dd.rank == 0:
            self.ckpts.clear(RUN_FILES)  # a fresh start in an existing out_dir: no stale files
        if dd.rank == 0:
            save_speech_codebook(self.speech_tokenizer, self.out)
        self.last_saved = st.global_step if latest is not None else -1

        # LR-schedule length: fixed at the start of a run and kept by a resume with the same world size and
        # length settings (so the resumed LR curve is the uninterrupted one); recomputed otherwise.
        if (latest is None or st.world_size != V or not st.total_steps
                or saved_cfg.get("epochs") != cfg.epochs or saved_cfg.get("max_steps") != cfg.max_steps):
            spe = self.sampler.steps_in_epoch(0, V)
            remaining = 0 if st.epoch >= cfg.epochs else (
                self.sampler.steps_in_epoch(st.epoch, V, st.position) + (cfg.epochs - st.epoch - 1) * spe)
            st.total_steps = st.global_step + remaining
            if cfg.max_steps is not None:
                st.total_steps = min(st.total_steps, cfg.max_steps)
        if latest is not None and st.world_size != V:
            log.warning("resuming a run saved with %d global batches per step with %d: global step %d kept, epoch %d "
                        "continues at global batch %d; LR schedule length now %d steps", st.world_size, V,
                        st.global_step, st.epoch, st.position, st.total_steps)
        st.world_size = V

    def build_training(self) -> None:
        """Compile, the loss wrapper (DDP-wrapped under torchrun), the optimizer, and the run metadata."""
        cfg, t3, dd = self.cfg, self.t3, self.dd
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(t3)
        if cfg.compile:
            t3.tfmr.compile(dynamic=True)
        self.model = Stage2Model(t3, text_loss_weight=cfg.text_loss_weight, padding_mask=cfg.padding_mask)
        self.model.train()
        self.encoder.eval()
        self.mapper.eval()
        self.wrapped: nn.Module = self.model
        if dd.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # no running-stat buffers in T3 (only rotary tables): nothing to broadcast each step
            self.wrapped = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               broadcast_buffers=False)
        self.opt = make_optimizer(t3, cfg, self.device)
        if self.saved_opt is not None:
            self.opt.load_state_dict(self.saved_opt)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.nonfinite = NonFiniteSteps(self.st, cfg.max_nonfinite)
        self.meta = self.run_meta()

    def run_meta(self) -> dict:
        """``stage2.json``: what inference needs to use a checkpoint of this run."""
        cfg, mm, report, source = self.cfg, self.mapper_meta, self.load_report, self.source
        return {
            "format": FORMAT, "t3_source": cfg.t3, "t3_config": self.t3.cfg.to_dict(),
            "speech_vocab": speech_vocab_record(self.t3.cfg, self.speech_tokenizer),
            "tokenizer": self.tokenizer.to_dict(),
            "text_encoder": self.store_te.to_dict() if self.store_te is not None else None,
            "mapper": {"dir": absolute(str(cfg.mapper_dir)), "weights_sha256": mm.get("weights_sha256"),
                       "n_steps": self.n_steps, "mapper_config": mm.get("mapper_config"), "encoder": mm.get("encoder")},
            "instruction_dim": self.encoder.hidden_size, "prompt_len": self.prompt_len,
            "emotion_adv": cfg.emotion_adv, "language": self.language, "family": self.t3.cfg.family,
            "store": {"url": absolute(cfg.store), "lines_digest": self.reader.info.lines_digest},
            **cfg.run_record(),
            "frozen_models": frozen_models_record(self.reader.identities),
            "load_report": report.summary if report is not None else None,
            "t3_found": source.describe() if source is not None else None,
        }

    # -- one step ------------------------------------------------------------------------------------------------
    def one_step(self) -> float:
        """Forward/backward over this rank's micro-batches, clip, and step unless any rank saw a non-finite
        loss or gradient norm (then skip and count). → the step's LR factor."""
        cfg, dd, st, opt = self.cfg, self.dd, self.st, self.opt
        self.opt.zero_grad(set_to_none=True)
        red = None
        for micro in range(cfg.grad_accum):
            vr = micro * dd.world_size + dd.rank
            gidx, rows, weight = self.sampler.rank_batch(st.epoch, st.position, vr, self.V)
            b = self.data.build_batch(rows, mix=cfg.row_mix, rng=batch_rng(cfg.seed, st.epoch, gidx),
                                      prompt_len=self.prompt_len, cond_len=self.cond_bound,
                                      emotion_adv=cfg.emotion_adv)
            torch.manual_seed(mix_seed(cfg.seed, "step", st.global_step, vr))  # dropout: a function of the step
            last = not dd.enabled or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else self.wrapped.no_sync():
                with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.float32,
                                    enabled=self.amp is not None):
                    loss, stats = self.wrapped(b.batch, b.instruction_only, weight / cfg.grad_accum)
                loss.backward()
            part = torch.cat([stats.float() * weight, torch.tensor([weight, b.n_real_tokens * weight,
                                                                    b.n_padded_tokens * weight], device=stats.device)])
            red = part if red is None else red + part
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        dd.all_reduce(red)
        vals = torch.cat([red, gnorm.detach().float().reshape(1).to(red.device)]).cpu().double()
        finite = bool(torch.isfinite(vals).all())
        lr_f = lr_factor(st.global_step, cfg.warmup_steps, st.total_steps, cfg.min_lr_ratio)
        if finite:
            set_lr(opt, lambda g: g["base_lr"] * lr_f)
            opt.step()
            self.nonfinite.ok()
        else:
            opt.zero_grad(set_to_none=True)
            self.nonfinite.skipped(
                f"stage2: non-finite step skipped at step {st.global_step} (loss {float(vals[0])}, grad norm "
                f"{float(vals[-1])})",
                lambda: Stage2NonFiniteError(
                    f"stage 2: {st.consecutive_nonfinite} consecutive non-finite steps at step {st.global_step} "
                    f"(epoch {st.epoch}); {st.nonfinite_total} skipped in total (max_nonfinite={cfg.max_nonfinite}). "
                    f"Lower lr, check the cache for NaN/inf vectors, or try amp_dtype='fp32'. Last good checkpoint: "
                    f"{self.ckpts.latest()}"))
        self.window.add(vals, finite)
        st.tokens_seen += int(float(vals[len(STAT_NAMES) + 1]))
        return lr_f

    def after_step(self, nb: int, lr_f: float) -> None:
        """Metrics row every ``log_every`` steps, checkpoint every ``save_every``, Ctrl-C at the boundary."""
        cfg, st = self.cfg, self.st
        if cfg.log_every > 0 and st.global_step % cfg.log_every == 0:
            row = self.window.row(st, nb, lr_f * cfg.lr)
            if st.global_step % (cfg.eval_every or 10 * cfg.log_every) == 0:
                row.update(self.evaluate())
            self.window = MetricsWindow()
            if self.dd.rank == 0:
                write_metrics_row(self.metrics_path, row)
                if self.on_log is not None:
                    self.on_log(row)
        if cfg.save_every > 0 and st.global_step % cfg.save_every == 0:
            self.save_checkpoint()
        if stop_requested():  # Ctrl-C (tts_core.interrupt; never set under torchrun): checkpoint here, then stop
            if self.last_saved != st.global_step:
                self.save_checkpoint()
            raise TrainingInterrupted(f"stage 2 stopped at step {st.global_step}, checkpoint "
                                      f"{self.ckpts.latest()}; rerun the same command to resume")

    # -- evaluate, checkpoint, report ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Teacher-forced loss on the held-out rows (instruction-only rows: the rows' own instructions) →
        ``val_speech_loss``, ``val_text_loss`` (mean CE per token) and ``val_loss``; {} without hold-out.
        Every rank scores its share; the sums are all-reduced. Memoised per step (the last row and the
        end of the run may ask twice)."""
        if self.val_data is None:
            return {}
        cfg, st, dd, val = self.cfg, self.st, self.dd, self.val_data
        if self._val[0] == st.global_step:
            return dict(self._val[1])
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # CE text, text tokens, CE speech, speech tokens
        mine = np.arange(len(val))[dd.rank::dd.world_size]
        for i in range(0, len(mine), cfg.batch_size):
            b = val.build_batch(mine[i:i + cfg.batch_size], mix=SCORED_AS_INSTRUCTION_ONLY,
                                rng=np.random.default_rng(mix_seed(cfg.seed, "val", i)), prompt_len=self.prompt_len,
                                cond_len=self.cond_bound, emotion_adv=cfg.emotion_adv)
            with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.float32,
                                enabled=self.amp is not None):
                _, stats = self.model(b.batch, b.instruction_only)
            s = stats.double().cpu()
            sums += torch.stack([s[3] + s[5], s[4] + s[6], s[7] + s[9], s[8] + s[10]])
        self.model.train()
        sums = sums.to(self.device)
        dd.all_reduce(sums)
        sums = sums.cpu()
        text, speech = float(sums[0] / sums[1].clamp(min=1)), float(sums[2] / sums[3].clamp(min=1))
        out = {"val_speech_loss": speech, "val_text_loss": text, "val_loss": cfg.text_loss_weight * text + speech}
        self._val = (st.global_step, out)
        return dict(out)

    def save_checkpoint(self) -> None:
        """Rank 0 writes ``checkpoints/step_N`` (module doc, "Checkpoints"); every rank waits for it."""
        st = self.st
        if self.dd.rank == 0:
            def fill(tmp: Path) -> None:
                save_t3(self.t3, tmp / T3_WEIGHTS, config=self.t3.cfg)
                self.tokenizer.save(tmp)
                atomic_torch_save({"optimizer": self.opt.state_dict(), "state": json.dumps(asdict(st)),
                                   "config": json.dumps(self.cfg.to_dict()), "fingerprint": self.fingerprint},
                                  tmp / TRAIN_STATE)
                atomic_write_json(tmp / STAGE2_META, {**self.meta, "step": st.global_step, "epoch": st.epoch,
                                                       "position": st.position})

            self.ckpts.write(st.global_step, fill, self.cfg.keep_checkpoints)
        self.last_saved = st.global_step
        self.dd.barrier()

    def report(self, stopped: str, val: dict) -> Stage2Result:
        """Publish the final checkpoint at the run root and write ``report.md`` (rank 0)."""
        cfg, st = self.cfg, self.st
        history = read_metrics(self.metrics_path)
        ckpt = None
        if self.dd.rank == 0:
            publish(self.out, self.ckpts.latest())
            ckpt = self.out
            summary = {"t3_source": cfg.t3, "t3_found": self.meta["t3_found"], "load_report": self.meta["load_report"],
                       "speech_vocab": self.meta["speech_vocab"],
                       "tokenizer": self.tokenizer.to_dict(), "mapper_dir": str(cfg.mapper_dir),
                       "text_encoder": self.meta["text_encoder"] or {}, "data": self.data_stats,
                       "config": cfg.to_dict(), "world_size": self.dd.world_size, "device": str(self.device),
                       "amp": str(self.amp).removeprefix("torch.") if self.amp else "fp32",
                       "global_step": st.global_step, "epoch": st.epoch, "stopped_reason": stopped,
                       "nonfinite_steps": st.nonfinite_total, "trainable": self.trainable, "frozen": self.frozen,
                       "val": val, "last_row": history[-1] if history else {}}
            write_report(self.out, summary, history, plot=True)
        self.dd.barrier()
        return Stage2Result(run_dir=self.out, checkpoint=ckpt, global_step=st.global_step, epoch=st.epoch,
                            stopped_reason=stopped, history=history, trainable=self.trainable, frozen=self.frozen,
                            nonfinite_steps=st.nonfinite_total, world_size=self.dd.world_size, t3=self.t3,
                            encoder=self.encoder, mapper=self.mapper, tokenizer=self.tokenizer,
                            load_report=self.meta["load_report"], data_stats=self.data_stats, val=val)
