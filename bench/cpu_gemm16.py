"""16-bit matrix products on CPUs without 16-bit matrix units, for benchmarks only.

torch's CPU GEMM for bfloat16 / float16 goes through oneDNN, which on a CPU without AVX-512 (e.g.
the AVX2 "AMD EPYC" VMs) emulates 16-bit products at 5-10 GFLOP/s, and falls back to a naive loop
for two row-major operands (a 256 x 5632 by 5632 x 2048 product 400x slower than in float32):
every step's backward ``grad @ W`` is such a product, so a bfloat16 step at the 1.1B shape would run
for hours. ``install()`` routes ``aten::mm``, ``bmm`` and ``addmm`` of 16-bit CPU tensors through
float32: each operand upcast exactly in chunks of at most 2^23 elements (32 MiB), multiplied by the
float32 GEMM, rounded once to the 16-bit dtype on the way out (what a GPU's tensor cores do: float32
accumulation, one rounding; entries differ from oneDNN's in the last bit where the summation order
does). It changes no tensor that outlives the call: a step's memory is that of its 16-bit tensors
plus at most ~100 MiB of chunks during one product, in the plain and in the measured step alike.
Other dtypes and devices go to torch's own kernels.
"""
from __future__ import annotations

import torch

_BUDGET = 1 << 23  # elements of one float32 operand chunk
_SIXTEEN = (torch.bfloat16, torch.float16)
_lib = None


def _mm16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    out = a.new_empty(m, n)
    rows = max(1, min(m, _BUDGET // max(k, 1)))
    cols = max(1, min(n, _BUDGET // max(k, 1)))
    for j in range(0, n, cols):
        bj = b[:, j:j + cols].float()
        for i in range(0, m, rows):
            out[i:i + rows, j:j + cols] = a[i:i + rows].float() @ bj
    return out


def _mm(a, b):
    if a.dtype in _SIXTEEN:
        return _mm16(a, b)
    return torch.ops.aten.mm.out(a, b, out=a.new_empty(a.shape[0], b.shape[1]))


def _bmm(a, b):
    if a.dtype in _SIXTEEN:
        return torch.stack([_mm16(x, y) for x, y in zip(a, b)])
    return torch.ops.aten.bmm.out(a, b, out=a.new_empty(a.shape[0], a.shape[1], b.shape[2]))


def _addmm(c, a, b, *, beta=1, alpha=1):
    if a.dtype in _SIXTEEN:
        return (c.float() * beta + _mm16(a, b).float() * alpha).to(a.dtype)
    return torch.ops.aten.addmm.out(c, a, b, beta=beta, alpha=alpha, out=a.new_empty(a.shape[0], b.shape[1]))


def install() -> None:
    """Route this process's 16-bit CPU matrix products through float32 (idempotent)."""
    global _lib
    if _lib is not None:
        return
    import warnings
    _lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
        for name, fn in (("mm", _mm), ("bmm", _bmm), ("addmm", _addmm)):
            _lib.impl(name, fn, "CPU")
