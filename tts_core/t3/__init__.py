"""Stage 2: Chatterbox's T3 (Llama over [conditioning | text | speech]; Turbo: GPT-2, `turbo.py`) with
adaptive-norm instruction adapters. See docs/architecture.md "Known failure modes" 3–5."""
from .adapters import AdaLayerNorm, AdaRMSNorm, attach_adaptive_norms, instruction_context, is_adapter_key
from .checkpointing import enable_activation_checkpointing
from .config import IGNORE_INDEX, T3Config
from .layout import (
    SEG_COND,
    SEG_PAD,
    SEG_SPEECH,
    SEG_TEXT,
    T3Layout,
    T3Step,
    build_generation_layout,
    build_layout,
    cond_lens,
    pad_sequences,
)
from .loading import CheckpointMismatchError, LoadReport, config_from_checkpoint, load_t3_checkpoint, save_t3
from .model import T3, T3Batch, T3Cond, T3Output, next_token_loss, sample_next_token, t3_for_config
from .turbo import TurboFiles, TurboT3, load_turbo, turbo_config

__all__ = [
    "AdaLayerNorm", "AdaRMSNorm", "attach_adaptive_norms", "instruction_context", "is_adapter_key",
    "enable_activation_checkpointing", "IGNORE_INDEX", "T3Config",
    "SEG_COND", "SEG_PAD", "SEG_SPEECH", "SEG_TEXT", "T3Layout", "T3Step",
    "build_generation_layout", "build_layout", "cond_lens", "pad_sequences",
    "CheckpointMismatchError", "LoadReport", "config_from_checkpoint", "load_t3_checkpoint", "save_t3",
    "T3", "T3Batch", "T3Cond", "T3Output", "next_token_loss", "sample_next_token", "t3_for_config",
    "TurboFiles", "TurboT3", "load_turbo", "turbo_config",
]
