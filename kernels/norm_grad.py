"""Per-sample gradient of an elementwise weight (norm layers) (twin: gefx.reference.norm_grad).

    out[i, :] = sum_t u_it * g_it     (u: the normalised input the weight multiplies)

One program per (feature block, sample) streams token blocks, accumulating in float32, and writes
its [BLOCK_D] slice of the [B, D] float32 result directly (no partials).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import _load_mask

CONFIGS = (
    dict(BLOCK_T=32, BLOCK_D=128, num_warps=4, num_stages=2),
    dict(BLOCK_T=64, BLOCK_D=64, num_warps=4, num_stages=2),
    dict(BLOCK_T=16, BLOCK_D=256, num_warps=4, num_stages=2),
)


@triton.jit
def _norm_grad_kernel(
    u_ptr, g_ptr, mask_ptr, out_ptr,
    T, D,
    stride_ub, stride_ut, stride_ud, stride_gb, stride_gt, stride_gd,
    stride_maskb, stride_maskt, stride_ob,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_d = offs_d < D
    # int64 offsets: token x row stride (128k x 16k) and feature x feature stride of transposed
    # views pass 2^31; the output is our own contiguous [B, D] (offs_d < D, stride 1: 32-bit is fine)
    offs_d64 = offs_d.to(tl.int64)
    u_cols = u_ptr + i * stride_ub + offs_d64[None, :] * stride_ud
    g_cols = g_ptr + i * stride_gb + offs_d64[None, :] * stride_gd
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok_t = _load_mask(mask_ptr + i * stride_maskb, stride_maskt, offs_t, offs_t < T, HAS_MASK)
        ok = ok_t[:, None] & ok_d[None, :]
        offs_t64 = offs_t.to(tl.int64)
        u = tl.load(u_cols + offs_t64[:, None] * stride_ut, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_cols + offs_t64[:, None] * stride_gt, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(u * g, axis=0)
    tl.store(out_ptr + i * stride_ob + offs_d, acc, mask=ok_d)


def _launch(u, g, mask, cfg: dict) -> torch.Tensor:
    b, t, d = u.shape
    out = torch.empty((b, d), dtype=torch.float32, device=u.device)
    mk, smb, smt, has = C.mask_args(mask, u)
    _norm_grad_kernel[(triton.cdiv(d, cfg["BLOCK_D"]), b)](
        u, g, mk, out, t, d,
        *u.stride(), *g.stride(), smb, smt, out.stride(0),
        HAS_MASK=has, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def fit_configs(t: int, d: int, configs=None) -> list[dict]:
    return C.fit_configs(CONFIGS if configs is None else configs, BLOCK_T=(t, 2), BLOCK_D=d)


def norm_grad_triton(u, g, mask=None):
    """sum_t u_it * g_it -> float32 [B, D]."""
    ok = C.check_float("u", u) & C.check_float("g", g)
    C.check_3d("u", u)
    C.check_3d("g", g)
    C.check_same("u and g shapes", tuple(u.shape), tuple(g.shape))
    C.check_mask("mask", mask, u, "u")
    C.check_same_device(u=u, g=g, mask=mask)
    if not ok or not C.runs_here(u):
        return NotImplemented
    b, t, d = u.shape
    if b == 0 or t == 0 or d == 0:
        return torch.zeros((b, d), dtype=torch.float32, device=u.device)
    key = (t, d, u.dtype, g.dtype, mask is None)
    return C.tuned("norm_grad", key, fit_configs(t, d), lambda cfg: _launch(u, g, mask, cfg), u.device)
