"""Ghost self norms ||G_i^T A_i||_F^2 (twin: gefx.reference.ghost_self).

    v[i] = sum_{t,s} (a_it . a_is) (g_it . g_is)

The symmetric case of ghost_pairwise: one program per (token tile p, token tile q, sample i) with
only the upper-triangular tiles q >= p doing work (off-diagonal ones counted twice); programs of
the lower triangle store a zero partial and exit. Both Gram tiles live in float32 registers; the
T x T Gram is never written. Partials are summed on the host in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import _gram_tile, _load_mask

# square token tiles (BLOCK_T = BLOCK_S); the first one is the default / interpreter config
CONFIGS = (
    dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=2),
)
CONFIGS_FP32 = (  # float32 / mixed inputs: three tf32 dots per tile (see _common._dot), sized not to spill
    dict(BLOCK_T=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_T=64, BLOCK_K=16, num_warps=4, num_stages=3),
)


@triton.jit
def _ghost_self_kernel(
    a_ptr, g_ptr, m_ptr, part_ptr,
    T, DA, DG, n_t,
    stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gd,
    stride_mb, stride_mt, stride_pb,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC_A: tl.constexpr, PREC_G: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    p = pid // n_t
    q = pid % n_t
    offs_t = p * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = q * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_t = _load_mask(m_ptr + i * stride_mb, stride_mt, offs_t, offs_t < T, HAS_MASK)
    ok_s = _load_mask(m_ptr + i * stride_mb, stride_mt, offs_s, offs_s < T, HAS_MASK)
    live = (q >= p) & (tl.sum(ok_t.to(tl.int32), axis=0) > 0) & (tl.sum(ok_s.to(tl.int32), axis=0) > 0)
    # dead / lower-triangle programs run zero feature iterations (a loop bound, not an `if`: a loop
    # nested in scf.if is not software-pipelined)
    a_i = a_ptr + i * stride_ab
    g_i = g_ptr + i * stride_gb
    ga = _gram_tile(a_i, stride_at, stride_ad, offs_t, ok_t, a_i, stride_at, stride_ad, offs_s, ok_s,
                    tl.where(live, DA, 0), BLOCK_T, BLOCK_T, BLOCK_K, False, PREC_A)
    gg = _gram_tile(g_i, stride_gt, stride_gd, offs_t, ok_t, g_i, stride_gt, stride_gd, offs_s, ok_s,
                    tl.where(live, DG, 0), BLOCK_T, BLOCK_T, BLOCK_K, False, PREC_G)
    w = tl.where(live, 1.0 + (q > p).to(tl.float32), 0.0)
    row = tl.sum(ga * gg, axis=1) * w
    tl.store(part_ptr + i * stride_pb + pid, tl.sum(row, axis=0))


def _launch(a, g, mask, cfg: dict) -> torch.Tensor:
    b, t, da = a.shape
    dg = g.shape[2]
    bt = cfg["BLOCK_T"]
    n_t = triton.cdiv(t, bt)
    part = torch.empty((b, n_t * n_t), dtype=torch.float32, device=a.device)
    m, smb, smt, has = C.mask_args(mask, a)
    _ghost_self_kernel[(n_t * n_t, b)](
        a, g, m, part,
        t, da, dg, n_t,
        *a.stride(), *g.stride(), smb, smt, part.stride(0),
        HAS_MASK=has, BLOCK_T=bt, BLOCK_K=cfg["BLOCK_K"],
        PREC_A=C.dot_precision(a.dtype), PREC_G=C.dot_precision(g.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(dim=-1)


def fit_configs(t: int, da: int, dg: int, configs=None, fp32: bool = True) -> list[dict]:
    """The candidate configs (float32 / mixed inputs: CONFIGS_FP32) fitted to the problem and pruned for the device."""
    return C.fit_configs(configs or (CONFIGS_FP32 if fp32 else CONFIGS), 4 if fp32 else 2, BLOCK_T=t, BLOCK_K=max(da, dg))


def ghost_self_triton(a, g, mask=None):
    """v[i] = ||g_i^T a_i||_F^2 -> float32 [B] (see module doc)."""
    ok = C.check_float("a", a) & C.check_float("g", g)
    C.check_3d("a", a)
    C.check_3d("g", g)
    C.check_same("a and g [B, T]", tuple(a.shape[:2]), tuple(g.shape[:2]))
    C.check_mask("mask", mask, a, "a")
    C.check_same_device(a=a, g=g, mask=mask)
    if not ok or not C.runs_here(a):
        return NotImplemented
    b, t, da = a.shape
    dg = g.shape[2]
    if b == 0 or t == 0:
        return torch.zeros((b,), dtype=torch.float32, device=a.device)
    key = (t, da, dg, a.dtype, g.dtype, mask is None)
    return C.tuned("ghost_self", key, fit_configs(t, da, dg, fp32=C.wide(C.dot_precision(a.dtype), C.dot_precision(g.dtype))), lambda cfg: _launch(a, g, mask, cfg), a.device)
