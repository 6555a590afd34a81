"""Embedding-table self norms (twin: gefx.reference.embedding_self).

    v[i] = ||sum_t e_{ids_it} g_it^T||^2 = sum_{t,s} [ids_it == ids_is] (g_it . g_is)

The symmetric token-id Gram-Hadamard: only upper-triangular tile pairs q >= p work (off-diagonal
ones count twice), and a tile pair sharing no token id skips its gradient Gram. Partials are summed
on the host in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import _gram_tile, _load_mask

CONFIGS = (
    dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=2),
    dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=2),
)
CONFIGS_FP32 = (  # float32 / mixed inputs: three tf32 dots per tile (see _common._dot), sized not to spill
    dict(BLOCK_T=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_T=64, BLOCK_K=16, num_warps=4, num_stages=3),
)


@triton.jit
def _embedding_self_kernel(
    ids_ptr, g_ptr, m_ptr, part_ptr,
    T, D, n_t,
    stride_ib, stride_it, stride_gb, stride_gt, stride_gd, stride_mb, stride_mt, stride_pb,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    p = pid // n_t
    q = pid % n_t
    offs_t = p * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = q * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_t = _load_mask(m_ptr + i * stride_mb, stride_mt, offs_t, offs_t < T, HAS_MASK)
    ok_s = _load_mask(m_ptr + i * stride_mb, stride_mt, offs_s, offs_s < T, HAS_MASK)
    id_t = tl.load(ids_ptr + i * stride_ib + offs_t.to(tl.int64) * stride_it, mask=ok_t, other=0)
    id_s = tl.load(ids_ptr + i * stride_ib + offs_s.to(tl.int64) * stride_it, mask=ok_s, other=0)
    eq = (id_t[:, None] == id_s[None, :]) & ok_t[:, None] & ok_s[None, :]
    live = (q >= p) & (tl.sum(tl.sum(eq.to(tl.int32), axis=1), axis=0) > 0)
    # dead / lower-triangle: zero feature iterations (a loop bound, not an `if`, keeps it pipelined)
    g_i = g_ptr + i * stride_gb
    gg = _gram_tile(g_i, stride_gt, stride_gd, offs_t, ok_t, g_i, stride_gt, stride_gd, offs_s, ok_s,
                    tl.where(live, D, 0), BLOCK_T, BLOCK_T, BLOCK_K, False, PRECISION)
    w = tl.where(live, 1.0 + (q > p).to(tl.float32), 0.0)
    row = tl.sum(tl.where(eq, gg, 0.0), axis=1) * w
    tl.store(part_ptr + i * stride_pb + pid, tl.sum(row, axis=0))


def _launch(ids, g, mask, cfg: dict) -> torch.Tensor:
    b, t, d = g.shape
    bt = cfg["BLOCK_T"]
    n_t = triton.cdiv(t, bt)
    part = torch.empty((b, n_t * n_t), dtype=torch.float32, device=g.device)
    m, smb, smt, has = C.mask_args(mask, g)
    _embedding_self_kernel[(n_t * n_t, b)](
        ids, g, m, part, t, d, n_t,
        *ids.stride(), *g.stride(), smb, smt, part.stride(0),
        HAS_MASK=has, BLOCK_T=bt, BLOCK_K=cfg["BLOCK_K"], PRECISION=C.dot_precision(g.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(dim=-1)


def fit_configs(t: int, d: int, configs=None, fp32: bool = True) -> list[dict]:
    """The candidate configs (float32 / mixed inputs: CONFIGS_FP32) fitted to the problem and pruned for the device."""
    return C.fit_configs(configs or (CONFIGS_FP32 if fp32 else CONFIGS), 4 if fp32 else 2, BLOCK_T=t, BLOCK_K=d)


def embedding_self_triton(ids, g, mask=None):
    """v[i] = ||sum_t e_{ids_it} g_it^T||^2 -> float32 [B]."""
    ok = C.check_float("g", g)
    C.check_3d("g", g)
    C.check_ids("ids", ids, g, "g")
    C.check_mask("mask", mask, g, "g")
    C.check_same_device(ids=ids, g=g, mask=mask)
    if not ok or not C.runs_here(g):
        return NotImplemented
    b, t, d = g.shape
    if b == 0 or t == 0:
        return torch.zeros((b,), dtype=torch.float32, device=g.device)
    key = (t, d, g.dtype, ids.dtype, mask is None)
    return C.tuned("embedding_self", key, fit_configs(t, d, fp32=C.wide(C.dot_precision(g.dtype))), lambda cfg: _launch(ids, g, mask, cfg), g.device)
