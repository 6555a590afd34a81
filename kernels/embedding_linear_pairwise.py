"""Cross term of a tied parameter (embedding use in set 1, linear use in set 2)
(twin: gefx.reference.embedding_linear_pairwise).

    M[i, j] = sum_{t,s} l2_js[ids1_it] (g1_it . r2_js)

l2 [B2, S, V] is set 2's left factor over the vocabulary (e.g. the logits gradient of a tied
lm_head), r2 [B2, S, D] its right factor (the lm_head input). Each program takes one tile pair:
the (g1, r2) Gram in float32 registers, multiplied by the [BLOCK_T, BLOCK_S] tile of l2 gathered at
set 1's token ids, and reduced; one partial per program, summed on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import _gram_tile, _load_mask

CONFIGS = (
    dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_T=128, BLOCK_S=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=128, num_warps=4, num_stages=2),
)
CONFIGS_FP32 = (  # float32 / mixed inputs: three tf32 dots per tile (see _common._dot), sized not to spill
    dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=32, num_warps=8, num_stages=3),
)


@triton.jit
def _embedding_linear_pairwise_kernel(
    ids1_ptr, g1_ptr, l2_ptr, r2_ptr, m1_ptr, m2_ptr, part_ptr,
    T1, T2, D, n_s,
    stride_i1b, stride_i1t, stride_g1b, stride_g1t, stride_g1d,
    stride_l2b, stride_l2t, stride_l2v, stride_r2b, stride_r2t, stride_r2d,
    stride_m1b, stride_m1t, stride_m2b, stride_m2t, stride_pi, stride_pj,
    HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    offs_t = (pid // n_s) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = (pid % n_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok_t = _load_mask(m1_ptr + i * stride_m1b, stride_m1t, offs_t, offs_t < T1, HAS_M1)
    ok_s = _load_mask(m2_ptr + j * stride_m2b, stride_m2t, offs_s, offs_s < T2, HAS_M2)
    live = (tl.sum(ok_t.to(tl.int32), axis=0) > 0) & (tl.sum(ok_s.to(tl.int32), axis=0) > 0)
    ids = tl.load(ids1_ptr + i * stride_i1b + offs_t.to(tl.int64) * stride_i1t, mask=ok_t, other=0).to(tl.int64)
    # int64: token x vocabulary row stride passes 2^31 at 16k tokens x a 128k vocabulary
    lt = tl.load(l2_ptr + j * stride_l2b + offs_s.to(tl.int64)[None, :] * stride_l2t + ids[:, None] * stride_l2v,
                 mask=ok_t[:, None] & ok_s[None, :], other=0.0).to(tl.float32)
    # dead tile pair: zero feature iterations (a loop bound, not an `if`, keeps the loop pipelined)
    gg = _gram_tile(g1_ptr + i * stride_g1b, stride_g1t, stride_g1d, offs_t, ok_t,
                    r2_ptr + j * stride_r2b, stride_r2t, stride_r2d, offs_s, ok_s, tl.where(live, D, 0),
                    BLOCK_T, BLOCK_S, BLOCK_K, UPCAST, PRECISION)
    row = tl.sum(lt * gg, axis=1)
    tl.store(part_ptr + i * stride_pi + j * stride_pj + pid, tl.sum(row, axis=0))


def _launch(ids1, g1, l2, r2, mask1, mask2, cfg: dict) -> torch.Tensor:
    b1, t1, d = g1.shape
    b2, t2, _ = r2.shape
    bt, bs = cfg["BLOCK_T"], cfg["BLOCK_S"]
    n_t, n_s = triton.cdiv(t1, bt), triton.cdiv(t2, bs)
    part = torch.empty((b1, b2, n_t * n_s), dtype=torch.float32, device=g1.device)
    m1, sm1b, sm1t, has1 = C.mask_args(mask1, g1)
    m2, sm2b, sm2t, has2 = C.mask_args(mask2, r2)
    up, prec = C.pair_mode(g1, r2)
    _embedding_linear_pairwise_kernel[(n_t * n_s, b1, b2)](
        ids1, g1, l2, r2, m1, m2, part, t1, t2, d, n_s,
        *ids1.stride(), *g1.stride(), *l2.stride(), *r2.stride(),
        sm1b, sm1t, sm2b, sm2t, part.stride(0), part.stride(1),
        HAS_M1=has1, HAS_M2=has2, BLOCK_T=bt, BLOCK_S=bs, BLOCK_K=cfg["BLOCK_K"],
        UPCAST=up, PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(dim=-1)


def fit_configs(t1: int, t2: int, d: int, configs=None, fp32: bool = True) -> list[dict]:
    """The candidate configs (float32 / mixed inputs: CONFIGS_FP32) fitted to the problem and pruned for the device."""
    return C.fit_configs(configs or (CONFIGS_FP32 if fp32 else CONFIGS), 4 if fp32 else 2, BLOCK_T=t1, BLOCK_S=t2, BLOCK_K=d)


def embedding_linear_pairwise_triton(ids1, g1, l2, r2, mask1=None, mask2=None):
    """M[i, j] = sum_{t,s} l2_js[ids1_it](g1_it . r2_js) -> float32 [B1, B2]."""
    ok = C.check_float("g1", g1) & C.check_float("l2", l2) & C.check_float("r2", r2)
    for n, x in (("g1", g1), ("l2", l2), ("r2", r2)):
        C.check_3d(n, x)
    C.check_ids("ids1", ids1, g1, "g1")
    C.check_same("l2 and r2 [B, T]", tuple(l2.shape[:2]), tuple(r2.shape[:2]))
    C.check_same("g1 vs r2 feature sizes", g1.shape[2], r2.shape[2])
    C.check_mask("mask1", mask1, g1, "g1")
    C.check_mask("mask2", mask2, r2, "r2")
    C.check_same_device(ids1=ids1, g1=g1, l2=l2, r2=r2, mask1=mask1, mask2=mask2)
    if not ok or not C.runs_here(g1):
        return NotImplemented
    b1, t1, d = g1.shape
    b2, t2, _ = r2.shape
    if b1 == 0 or b2 == 0 or t1 == 0 or t2 == 0:
        return torch.zeros((b1, b2), dtype=torch.float32, device=g1.device)
    C.check_id_range("ids1", ids1, l2.shape[2])
    key = (t1, t2, d, g1.dtype, r2.dtype, l2.dtype, mask1 is None, mask2 is None)
    return C.tuned("embedding_linear_pairwise", key, fit_configs(t1, t2, d, fp32=C.wide(C.pair_mode(g1, r2)[1])),
                   lambda cfg: _launch(ids1, g1, l2, r2, mask1, mask2, cfg), g1.device)
