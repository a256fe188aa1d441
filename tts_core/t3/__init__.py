"""Stage 2: Chatterbox's T3 (Llama over [conditioning | text | speech]) with AdaRMSNorm
instruction adapters. See DESIGN.md "Stage 2" and "Known failure modes" 3–5."""
from .adapters import AdaRMSNorm, attach_adaptive_norms, instruction_context, is_adapter_key
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
    pad_sequences,
)
from .loading import CheckpointMismatchError, LoadReport, config_from_checkpoint, load_t3_checkpoint, save_t3
from .model import T3, T3Batch, T3Cond, T3Output, next_token_loss, sample_next_token

__all__ = [
    "AdaRMSNorm", "attach_adaptive_norms", "instruction_context", "is_adapter_key",
    "IGNORE_INDEX", "T3Config",
    "SEG_COND", "SEG_PAD", "SEG_SPEECH", "SEG_TEXT", "T3Layout", "T3Step",
    "build_generation_layout", "build_layout", "pad_sequences",
    "CheckpointMismatchError", "LoadReport", "config_from_checkpoint", "load_t3_checkpoint", "save_t3",
    "T3", "T3Batch", "T3Cond", "T3Output", "next_token_loss", "sample_next_token",
]
