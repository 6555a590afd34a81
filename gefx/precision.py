"""gefx's one precision rule: products and sums accumulate in float64 when any input is float64,
else in float32 (never in half precision; bf16 / fp16 inputs are converted tile by tile)."""
from __future__ import annotations

import torch


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The accumulation dtype of `tensors` (None entries ignored)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
