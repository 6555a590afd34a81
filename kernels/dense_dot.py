"""Per-sample inner products with a dense matrix (twin: gefx.reference.dense_dot).

    v[i] = sum_t g_it^T M a_it = <G_i^T A_i, M>,   M: [Dg, Da]

A GEMM Z = A M^T over (sample, token tile) x (output-feature tile) programs, with a fused
epilogue that multiplies the float32 Z tile by the matching G tile and reduces it to one partial:
no [T, Dg] intermediate is written. Programs are ordered in groups of GROUP_M row tiles so that
tiles of M stay in L2. Partials are summed on the host in a fixed order (deterministic).

Small B x T (few output tiles, each a long loop over Da): split-K. The epilogue is linear in Z, so
sum(Z * G) = sum_k sum(Z_k * G) for Z = sum_k Z_k over chunks k of the Da loop: each of SPLIT
programs per output tile reduces its own partial Z_k against G to one more float32 partial; no
workspace beyond the partials. SPLIT comes from the cost model of _split.py (plan below). The
alternative, a cuBLAS GEMM in bounded token chunks with a row-dot epilogue, needs each chunk's
[rows, Dg] product in float32 (a bf16 output rounds Z before the dot) and a write + read of it:
at B x T = 2048, Dg = 4096 that is 32 MiB of traffic per chunk against 16 MiB of A and 32 MiB of
M read by the fused kernel; not taken.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _split as S
from ._common import _dot, _load_mask

CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
)
CONFIGS_FP32 = (  # float32 / mixed inputs: three tf32 dots per tile (see _common._dot), sized not to spill
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
)


@triton.jit
def _dense_dot_kernel(
    a_ptr, g_ptr, m_ptr, mask_ptr, part_ptr,
    T, DA, DG, n_t, num_pid_m, num_pid_n, per,
    stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gd,
    stride_m0, stride_m1, stride_maskb, stride_maskt,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    k_split = tl.program_id(1)  # chunk of the K loop: features [k_split * per, (k_split + 1) * per) blocks
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    b = (pid_m // n_t).to(tl.int64)
    offs_t = (pid_m % n_t) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    ok_t = _load_mask(mask_ptr + b * stride_maskb, stride_maskt, offs_t, offs_t < T, HAS_MASK)
    ok_n = offs_n < DG
    # int64 offsets: token x row stride and feature x stride pass 2^31 for T = 128k, D = 16k (any
    # layout); the partial index pid_m * num_pid_n + pid_n below is < the grid size (< 2^31)
    offs_t64 = offs_t.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    a_rows = a_ptr + b * stride_ab + offs_t64[:, None] * stride_at
    m_cols = m_ptr + offs_n64[None, :] * stride_m0
    n_k = DA
    if SPLIT:  # this chunk's features [k_lo, k_lo + n_k): move the pointers, loop from 0 as unsplit
        k_lo = (k_split * per * BLOCK_K).to(tl.int64)
        n_k = tl.minimum(DA - k_split * per * BLOCK_K, per * BLOCK_K)
        a_rows += k_lo * stride_ad
        m_cols += k_lo * stride_m1
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        kk = k0 + offs_k
        ok_k = kk < n_k
        kk64 = kk.to(tl.int64)
        x = tl.load(a_rows + kk64[None, :] * stride_ad, mask=ok_t[:, None] & ok_k[None, :], other=0.0)
        y = tl.load(m_cols + kk64[:, None] * stride_m1, mask=ok_k[:, None] & ok_n[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        z = _dot(x, y, z, PRECISION)
    gt = tl.load(g_ptr + b * stride_gb + offs_t64[:, None] * stride_gt + offs_n64[None, :] * stride_gd,
                 mask=ok_t[:, None] & ok_n[None, :], other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(z * gt, axis=1), axis=0)
    tl.store(part_ptr + (pid_m * num_pid_n + pid_n) * tl.num_programs(1) + k_split, total)


def _launch(a, g, m, mask, cfg: dict) -> torch.Tensor:
    b, t, da = a.shape
    dg = g.shape[2]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    n_t, n_n = triton.cdiv(t, bm), triton.cdiv(dg, bn)
    steps = triton.cdiv(da, bk)
    per = triton.cdiv(steps, max(1, min(cfg.get("SPLIT", 1), steps)))
    split = triton.cdiv(steps, per)  # no empty chunk
    part = torch.empty((b, n_t, n_n, split), dtype=torch.float32, device=a.device)
    mk, smb, smt, has = C.mask_args(mask, a)
    up, prec = C.pair_mode(a, m)
    _dense_dot_kernel[(b * n_t * n_n, split)](
        a, g, m, mk, part,
        t, da, dg, n_t, b * n_t, n_n, per,
        *a.stride(), *g.stride(), *m.stride(), smb, smt,
        HAS_MASK=has, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        UPCAST=up, PRECISION=prec, SPLIT=split > 1, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(dim=(1, 2, 3))


def plan(cfg: dict, b: int, t: int, da: int, dg: int, device) -> dict:
    """cfg with SPLIT (split-K chunks) set by the cost model (_split.split_count) unless set already:
    programs = B x token tiles x output tiles, steps = Da / BLOCK_K, overhead 1 step (the epilogue
    loads a [BLOCK_M, BLOCK_N] G tile, about one step's bytes; each chunk pays it again)."""
    if "SPLIT" in cfg:
        return cfg
    programs = b * triton.cdiv(t, cfg["BLOCK_M"]) * triton.cdiv(dg, cfg["BLOCK_N"])
    slots = S.sm_count(device) * S.PROGRAMS_PER_SM
    return dict(cfg, SPLIT=S.split_count(programs, triton.cdiv(da, cfg["BLOCK_K"]), slots, 1.0))


def fit_configs(t: int, da: int, dg: int, configs=None, fp32: bool = True) -> list[dict]:
    """The candidate configs (float32 / mixed inputs: CONFIGS_FP32) fitted to the problem and pruned for the device."""
    return C.fit_configs(configs or (CONFIGS_FP32 if fp32 else CONFIGS), 4 if fp32 else 2, BLOCK_M=t, BLOCK_N=dg, BLOCK_K=da)


def dense_dot_triton(a, g, m, mask=None):
    """v[i] = sum_t g_it^T m a_it -> float32 [B], m: [Dg, Da] (see module doc)."""
    ok = C.check_float("a", a) & C.check_float("g", g) & C.check_float("m", m)
    C.check_3d("a", a)
    C.check_3d("g", g)
    C.check_same("a and g [B, T]", tuple(a.shape[:2]), tuple(g.shape[:2]))
    if m.dim() != 2 or tuple(m.shape) != (g.shape[2], a.shape[2]):
        raise ValueError(f"m must be [Dg, Da] = {(g.shape[2], a.shape[2])}, got {tuple(m.shape)}")
    C.check_mask("mask", mask, a, "a")
    C.check_same_device(a=a, g=g, m=m, mask=mask)
    if not ok or not C.runs_here(a):
        return NotImplemented
    b, t, da = a.shape
    dg = g.shape[2]
    if b == 0 or t == 0 or da == 0 or dg == 0:
        return torch.zeros((b,), dtype=torch.float32, device=a.device)
    key = (b, t, da, dg, a.dtype, g.dtype, m.dtype, mask is None)
    cands = [plan(c, b, t, da, dg, a.device) for c in fit_configs(t, da, dg, fp32=C.wide(C.pair_mode(a, m)[1]))]
    return C.tuned("dense_dot", key, cands, lambda cfg: _launch(a, g, m, mask, cfg), a.device)
