"""gefx's one precision rule: products and sums accumulate in float64 when any input is float64,
else in float32 (never in half precision; bf16 / fp16 inputs are converted tile by tile)."""
from __future__ import annotations

import torch


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The accumulation dtype of `tensors` (None entries ignored)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


_SQ_CHUNK_CPU = 1 << 18  # 1 MiB of float32 (cache-sized); 1 << 24 elsewhere


def sq_sum(x: torch.Tensor) -> torch.Tensor:
    """sum(x ** 2) in x's accumulation dtype, chunk by chunk: no temporary of x's size (a
    parameter's), each chunk summed as torch sums (cascaded), the chunks' sums in float64. (torch's
    float32 ``vector_norm`` on the CPU accumulates plainly: 1e-2 off at 65 M entries.)"""
    dt = acc_dtype(x)
    flat = x.reshape(-1)
    n = _SQ_CHUNK_CPU if x.device.type == "cpu" else 1 << 24
    if flat.numel() <= n:
        return flat.to(dt).square().sum()
    parts = torch.stack([c.to(dt).square().sum() for c in flat.split(n)])
    return parts.to(torch.float64).sum().to(dt)
