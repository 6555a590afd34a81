"""Per-sample inner products of embedding gradients with a dense table gradient
(twin: gefx.reference.embedding_dense_dot).

    v[i] = sum_t M[ids_it] . g_it,   M: [V, D]

A gather-and-dot: one program per (token tile, sample) streams feature blocks of the gathered
rows of M and of g, accumulating in float32; one partial per program, summed on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import _load_mask

CONFIGS = (
    dict(BLOCK_T=16, BLOCK_D=256, num_warps=4, num_stages=2),
    dict(BLOCK_T=32, BLOCK_D=128, num_warps=4, num_stages=2),
    dict(BLOCK_T=8, BLOCK_D=512, num_warps=4, num_stages=2),
)


@triton.jit
def _embedding_dense_dot_kernel(
    ids_ptr, g_ptr, m_ptr, mask_ptr, part_ptr,
    T, D, n_t,
    stride_ib, stride_it, stride_gb, stride_gt, stride_gd, stride_mv, stride_md,
    stride_maskb, stride_maskt,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_t = _load_mask(mask_ptr + i * stride_maskb, stride_maskt, offs_t, offs_t < T, HAS_MASK)
    # int64 offsets: token id x table row stride (256k x 16k), token x row stride (128k x 16k) and
    # feature x feature stride of transposed views all pass 2^31; the partial index i * n_t + pid is
    # < the number of programs (< 2^31)
    ids = tl.load(ids_ptr + i * stride_ib + offs_t.to(tl.int64) * stride_it, mask=ok_t, other=0).to(tl.int64)
    m_rows = m_ptr + ids[:, None] * stride_mv
    g_rows = g_ptr + i * stride_gb + offs_t.to(tl.int64)[:, None] * stride_gt
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        ok = ok_t[:, None] & (dd < D)[None, :]
        dd64 = dd.to(tl.int64)
        m = tl.load(m_rows + dd64[None, :] * stride_md, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_rows + dd64[None, :] * stride_gd, mask=ok, other=0.0).to(tl.float32)
        acc += m * g
    tl.store(part_ptr + i * n_t + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


def _launch(ids, g, m, mask, cfg: dict) -> torch.Tensor:
    b, t, d = g.shape
    bt = cfg["BLOCK_T"]
    n_t = triton.cdiv(t, bt)
    part = torch.empty((b, n_t), dtype=torch.float32, device=g.device)
    mk, smb, smt, has = C.mask_args(mask, g)
    _embedding_dense_dot_kernel[(n_t, b)](
        ids, g, m, mk, part, t, d, n_t,
        *ids.stride(), *g.stride(), *m.stride(), smb, smt,
        HAS_MASK=has, BLOCK_T=bt, BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(dim=-1)


def fit_configs(t: int, d: int, configs=None) -> list[dict]:
    return C.fit_configs(CONFIGS if configs is None else configs, BLOCK_T=(t, 2), BLOCK_D=d)


def embedding_dense_dot_triton(ids, g, m, mask=None):
    """v[i] = sum_t m[ids_it] . g_it -> float32 [B], m: [V, D]."""
    ok = C.check_float("g", g) & C.check_float("m", m)
    C.check_3d("g", g)
    C.check_ids("ids", ids, g, "g")
    if m.dim() != 2 or m.shape[1] != g.shape[2]:
        raise ValueError(f"m must be [V, {g.shape[2]}], got {tuple(m.shape)}")
    C.check_mask("mask", mask, g, "g")
    C.check_same_device(ids=ids, g=g, m=m, mask=mask)
    if not ok or not C.runs_here(g):
        return NotImplemented
    b, t, d = g.shape
    if b == 0 or t == 0 or d == 0:
        return torch.zeros((b,), dtype=torch.float32, device=g.device)
    C.check_id_range("ids", ids, m.shape[0])
    key = (t, d, g.dtype, m.dtype, mask is None)
    return C.tuned("embedding_dense_dot", key, fit_configs(t, d),
                   lambda cfg: _launch(ids, g, m, mask, cfg), g.device)
