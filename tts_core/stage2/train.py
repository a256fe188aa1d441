"""Stage-2 training loop: T3 + AdaRMSNorm adapters on instruction-only / audio-only rows, as a library.

    result = train_stage2(Stage2Config(store="runs/cache.zarr", mapper_dir="runs/stage1", t3="ckpt/chatterbox",
                                       out_dir="runs/stage2"), on_log=print)

or, for DDP, the same call in a script launched with ``torchrun --nproc-per-node N script.py``.

What is trained
---------------
Frozen, never in the optimizer: the stage-1 instruction encoder and mapper (loaded with
`load_mapper`, ``requires_grad=False``, eval mode; their outputs are precomputed once — see
`tts_core.stage2.prepare`), and the VoiceEncoder / S3 tokenizer / S3Gen (their outputs come from the
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
* a preset name (``"tiny"``, ``"small"``, ``"520m"``): fresh weights (seeded), the byte tokenizer by default.
  Over a store of embedded speech tokens (mel-vq / world-vq, V codes) its speech embedding and head are sized
  to them (`T3Config.sized_to_speech_codes`: V + 2 rows, BOS V, EOS V + 1), so it can sample no id the
  tokenizer cannot decode; over S3 tokens it keeps Chatterbox's 8194-row table. A checkpoint keeps its shape,
  and a resumed run what its checkpoint records. ``stage2.json`` ``speech_vocab`` and report.md say which.

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

Row kinds (`tts_core.stage2.row_mix`; drawn by `tts_core.stage2.mixing`), one `RowMix` in
``Stage2Config.row_mix``: ``instruction_prob`` splits instruction-only / audio-only rows (0.5: the design card's 50/50),
``prompt_instruction_prob`` takes a share of the rows for prompt + instruction, and ``instruction_dropout`` gives
instruction-on rows the null instruction that instruction guidance needs. Defaults 0.5 / 0.2 / 0.1: the lab's measured
mix (`tts_core.recipe`). The expected shares (`RowMix.shares`) are in the run's summary and report; the three values
are flat keys of ``train_config``, and ``stage2.json`` says outright whether the run trained the null instruction
(``null_instruction``: what synthesis's default instruction guidance reads).

Frozen models (`tts_core.run_models`): ``stage2.json`` ``frozen_models`` records the store's text encoder, speech
tokenizer, voice encoder and x-vector (name, sha256, source path) and the Chatterbox files among them, so synthesis
and evaluation load the same ones without options, and refuse a moved or different model by name.

Held-out loss (``hold_out="mapper"``, `tts_core.stage2.hold_out`): the stage-1 run's held-out clips are
left out of training (as rows and as prompt clips) and `Stage2Recipe.evaluate` scores their
teacher-forced loss as instruction-only rows every ``eval_every`` steps (at a metrics row) and at the end.
``hold_out="none"`` trains exactly as before.

Outputs: ``metrics.jsonl`` (one JSON row every ``log_every`` steps: loss, text/speech loss of
instruction-only rows vs rows with a reference prompt — ``text_instruction_only``, ``speech_with_prompt``, ...
(`row_mix.SEGMENTS`) — LR, grad norm, tokens/s, padding; ``val_speech_loss`` /
``val_text_loss`` / ``val_loss`` at evaluations) and ``report.md`` (+ ``loss_curves.png``).

Where each part lives: the loop is `tts_core.stage2.recipe.Stage2Recipe` (set-up → resume → one step / evaluate /
checkpoint → report); its config `tts_core.stage2.config`, the run directory's files `tts_core.stage2.artifacts`, the
metrics rows `tts_core.stage2.metrics`, the model side `tts_core.stage2.model`, the data `tts_core.stage2.data`
(prepare, mixing, sampler). Run directory, checkpoint directories, metrics rows, non-finite steps and the DDP helper
are `tts_core.training`'s.
"""
from __future__ import annotations

from typing import Callable

from tts_core.stage2.artifacts import STAGE2_META, T3_WEIGHTS, TRAIN_STATE
from tts_core.stage2.config import Stage2Config
from tts_core.stage2.hold_out import HOLD_OUT_MODES
from tts_core.stage2.model import (
    GROUPS, PRESETS, Stage2Model, build_t3, freeze_for_stage2, lr_factor, parameter_groups,
)
from tts_core.stage2.recipe import Stage2NonFiniteError, Stage2Recipe, Stage2Result
from tts_core.training import init_distributed

__all__ = ["Stage2Config", "Stage2Result", "Stage2Model", "Stage2NonFiniteError", "Stage2Recipe", "train_stage2",
           "build_t3", "freeze_for_stage2", "parameter_groups", "lr_factor", "T3_WEIGHTS", "STAGE2_META",
           "TRAIN_STATE", "GROUPS", "PRESETS"]


def train_stage2(cfg: Stage2Config, on_log: Callable[[dict], None] | None = None) -> Stage2Result:
    """Train (or resume) stage 2; see the module docstring. ``on_log(row)`` runs on rank 0 after each
    metrics row is written (raising from it stops the run like a kill, after the last checkpoint)."""
    if cfg.hold_out not in HOLD_OUT_MODES:
        raise ValueError(f"hold_out must be one of {HOLD_OUT_MODES}, not {cfg.hold_out!r}")
    if not cfg.store or not cfg.mapper_dir:
        raise ValueError("Stage2Config needs store (a cache store URL) and mapper_dir (a stage-1 run directory)")
    dd, device = init_distributed(cfg.device)
    try:
        return Stage2Recipe(cfg, on_log, dd, device).train()
    finally:
        dd.close()
