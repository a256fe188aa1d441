"""Mixed-precision choice shared by the training stages."""
from __future__ import annotations

import torch


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default, none on CPU; fp16 is refused (it would need loss scaling)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name in ("fp32", "float32", "none"):
        return None
    raise ValueError(f"amp_dtype {name!r}: use 'bf16', 'fp32' or 'auto' (fp16 needs loss scaling, not supported)")
