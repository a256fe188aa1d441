"""Stage 2's configuration: `Stage2Config` (what a run is told) and which of its keys define the run.

``to_dict`` / ``from_dict`` speak the flat record saved as ``train_config`` (in ``stage2.json`` and ``train_state.pt``)
— the row mix as its three keys, the CLI flags' names (`instruct_tts.options.stage2_config`). A resume with other values
of `RUN_KEYS` is refused (`tts_core.training.config_changes`); a key an older run's record lacks had its
`RECORDED_DEFAULTS` value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tts_core.recipe import ROW_MIX_BEFORE_RECORDED
from tts_core.stage2.row_mix import RowMix


@dataclass
class Stage2Config:
    """Everything a stage-2 run is told (module doc of `tts_core.stage2.train`); the CLI's help shows these defaults."""

    store: str = ""  # cache store URL (CacheReader)
    mapper_dir: str = ""  # stage-1 run dir (load_mapper)
    out_dir: str = "runs/stage2"
    t3: str = "520m"  # preset name, or a directory / file with t3_cfg.safetensors
    text_tokenizer: str | None = None  # None: the t3 family's tokenizer file, else bytes; "bytes"; a tokenizer file
    language: str | None = None  # multilingual T3: language of rows whose metadata has no 5th column
    # the row mix (tts_core.stage2.row_mix); flat keys instruction_prob / prompt_instruction_prob /
    # instruction_dropout in to_dict / from_dict (stage2.json's train_config, the CLI)
    row_mix: RowMix = field(default_factory=RowMix)
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
    # recompute each backbone layer in backward (HF checkpointing, adapters kept exact: tts_core.t3.checkpointing):
    # less activation memory for ~1/3 more compute; the same loss and gradients
    activation_checkpointing: bool = False
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
    hold_out: str = "none"  # "mapper": train without the stage-1 run's held-out clips, score loss on them
    eval_every: int = 0  # steps between held-out evaluations (at a metrics row); 0 = log_every × 10
    resume: bool = True
    progress: bool = False

    def to_dict(self) -> dict:
        """The flat record (``train_config``): the row mix as its three keys, where the field stands."""
        d = {}
        for k, v in asdict(self).items():
            d.update(v if k == "row_mix" else {k: v})
        d["betas"] = list(self.betas)
        return d

    def run_record(self) -> dict:
        """What ``stage2.json`` records of this config: ``train_config``, and outright whether the run trains the
        null instruction (what the default instruction guidance reads, `sampling_defaults.trained_null_instruction`)."""
        return {"train_config": self.to_dict(), "null_instruction": self.row_mix.null_instruction}

    @classmethod
    def from_dict(cls, d: dict) -> "Stage2Config":
        """From the flat record (unknown keys ignored; the row mix from its three keys)."""
        known = {f.name for f in fields(cls)} - {"row_mix"}
        out = {k: v for k, v in d.items() if k in known}
        if "betas" in out:
            out["betas"] = tuple(out["betas"])
        return cls(**out, row_mix=RowMix.from_dict(d))


# Fields that define the run: a resume with other values is refused (epochs / max_steps / logging may change).
RUN_KEYS = ("t3", *RowMix.KEYS, "batch_size", "max_tokens", "pool_batches", "lr", "adapter_lr", "min_lr_ratio",
            "weight_decay", "betas", "warmup_steps", "text_loss_weight", "grad_clip", "seed", "mapper_seed",
            "mapper_samples", "mapper_n_steps", "prompt_len", "emotion_adv", "padding_mask", "amp_dtype", "language",
            "hold_out")
# a key an older run's saved config lacks had this value (the row-kind refinements came later: off before)
RECORDED_DEFAULTS = {**Stage2Config().to_dict(), **ROW_MIX_BEFORE_RECORDED}
