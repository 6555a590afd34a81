"""Ghost self norms ||G_i^T A_i||_F^2 (twin: gefx.reference.ghost_self).

    v[i] = sum_{t,s} (a_it . a_is) (g_it . g_is)

The symmetric case of ghost_pairwise: one program per (upper-triangular token tile pair p <= q,
sample i), the n (n + 1) / 2 pairs of n = T / BLOCK_T tiles listed in a table (upper_pairs): no
lower-triangle programs; off-diagonal pairs count twice. Both Gram tiles live in float32 registers; the
T x T Gram is never written. Partials are summed on the host in a fixed order.

Small B x T: the feature loop (Da + Dg features) can be split over SPLIT programs per tile pair
(chosen by the cost model of _split.py): _split's chunk kernel accumulates each chunk of the Da
or of the Dg blocks into one partial Gram tile in a bounded float32 workspace, and
_split.gram_reduce sums them in a fixed order and forms sum(Ga * Gg).

Diagonal tiles: a diagonal pair p = q computes its full BLOCK_T x BLOCK_T square although the
mirror half is redundant (sum over the square = 2 x strict upper + diagonal). Of the computed
n (n + 1) / 2 tiles' work, the redundant part is n / 2 tiles: a fraction 1 / (n + 1) of the
tensor-core work (11% at T = 512 with 64-token tiles, 3% at T = 2048). Tensor-core tiles are
square blocks, so skipping it means sub-tiling the diagonal (3 of 4 half-size blocks: saves half of
that at half the arithmetic intensity); not done, to be weighed against GPU timings.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _split as S
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


_PAIRS: dict = {}


def upper_pairs(n: int, device) -> torch.Tensor:
    """int32 [n (n + 1) / 2, 2]: the upper-triangular tile pairs (p, q), q >= p, row by row (made on
    the device once per n; a table load costs the kernel fewer registers than computing them from
    the program id: the integer enumeration spilled 4 B on sm_80 under triton 3.6)."""
    key = (n, str(device))
    if key not in _PAIRS:
        _PAIRS[key] = torch.triu_indices(n, n, dtype=torch.int32, device=device).T.contiguous()
    return _PAIRS[key]


@triton.jit
def _ghost_self_kernel(
    a_ptr, g_ptr, m_ptr, part_ptr, pair_ptr,
    T, DA, DG,
    stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gd,
    stride_mb, stride_mt, stride_pb,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC_A: tl.constexpr, PREC_G: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    p = tl.load(pair_ptr + 2 * pid)  # the pid-th upper-triangular tile pair (upper_pairs)
    q = tl.load(pair_ptr + 2 * pid + 1)
    offs_t = p * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = q * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_t = _load_mask(m_ptr + i * stride_mb, stride_mt, offs_t, offs_t < T, HAS_MASK)
    ok_s = _load_mask(m_ptr + i * stride_mb, stride_mt, offs_s, offs_s < T, HAS_MASK)
    live = (tl.sum(ok_t.to(tl.int32), axis=0) > 0) & (tl.sum(ok_s.to(tl.int32), axis=0) > 0)
    # a dead tile pair runs zero feature iterations (a loop bound, not an `if`: a loop nested in
    # scf.if is not software-pipelined)
    a_i = a_ptr + i * stride_ab
    g_i = g_ptr + i * stride_gb
    ga = _gram_tile(a_i, stride_at, stride_ad, offs_t, ok_t, a_i, stride_at, stride_ad, offs_s, ok_s,
                    tl.where(live, DA, 0), BLOCK_T, BLOCK_T, BLOCK_K, False, PREC_A)
    gg = _gram_tile(g_i, stride_gt, stride_gd, offs_t, ok_t, g_i, stride_gt, stride_gd, offs_s, ok_s,
                    tl.where(live, DG, 0), BLOCK_T, BLOCK_T, BLOCK_K, False, PREC_G)
    w = tl.where(p == q, 1.0, 2.0)  # off-diagonal pairs stand for their mirror too
    row = tl.sum(ga * gg, axis=1) * w
    tl.store(part_ptr + i * stride_pb + pid, tl.sum(row, axis=0))


def _launch(a, g, mask, cfg: dict) -> torch.Tensor:
    """Run the kernel with one config (blocks fitted to the problem). cfg["SPLIT"] > 1: the feature
    loops in about that many chunks (S.gram_chunks), whose partial Grams _split's chunk kernel
    writes to a workspace and S.gram_reduce sums."""
    b, t, da = a.shape
    dg = g.shape[2]
    bt, bk = cfg["BLOCK_T"], cfg["BLOCK_K"]
    n_t = triton.cdiv(t, bt)
    pairs = upper_pairs(n_t, a.device)
    n_pairs = pairs.shape[0]
    if cfg.get("SPLIT", 1) > 1:
        per_a, n_ca, per_g, n_cg = S.gram_chunks(triton.cdiv(da, bk), triton.cdiv(dg, bk), cfg["SPLIT"])
        ws = S.gram_workspace(n_ca + n_cg, b * n_pairs, bt, bt, a.device)
        S.gram_chunk_launch(ws, 0, n_ca, per_a, a, a, mask, mask, pairs, 0, n_pairs, cfg,
                            False, C.dot_precision(a.dtype))
        S.gram_chunk_launch(ws, n_ca, n_cg, per_g, g, g, mask, mask, pairs, 0, n_pairs, cfg,
                            False, C.dot_precision(g.dtype))
        return S.gram_reduce(ws, n_ca).view(b, n_pairs).sum(dim=-1)
    part = torch.empty((b, n_pairs), dtype=torch.float32, device=a.device)
    m, smb, smt, has = C.mask_args(mask, a)
    _ghost_self_kernel[(n_pairs, b)](
        a, g, m, part, pairs,
        t, da, dg,
        *a.stride(), *g.stride(), smb, smt, part.stride(0),
        HAS_MASK=has, BLOCK_T=bt, BLOCK_K=bk,
        PREC_A=C.dot_precision(a.dtype), PREC_G=C.dot_precision(g.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(dim=-1)


def plan(cfg: dict, b: int, t: int, da: int, dg: int, elem_bytes: int, device) -> dict:
    """cfg with SPLIT set by the cost model (_split.gram_split) unless it is set already."""
    if "SPLIT" in cfg:
        return cfg
    n_t, bk = triton.cdiv(t, cfg["BLOCK_T"]), cfg["BLOCK_K"]
    items = b * n_t * (n_t + 1) // 2
    return dict(cfg, SPLIT=S.gram_split(cfg, items, triton.cdiv(da, bk), triton.cdiv(dg, bk), elem_bytes, device,
                                        input_bytes=b * t * (da + dg) * elem_bytes))


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
    key = (b, t, da, dg, a.dtype, g.dtype, mask is None)
    fp32 = C.wide(C.dot_precision(a.dtype), C.dot_precision(g.dtype))
    elem = max(a.element_size(), g.element_size())
    cands = [plan(c, b, t, da, dg, elem, a.device) for c in fit_configs(t, da, dg, fp32=fp32)]
    return C.tuned("ghost_self", key, cands, lambda cfg: _launch(a, g, mask, cfg), a.device)
