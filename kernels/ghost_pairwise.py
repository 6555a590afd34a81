"""Ghost pairwise inner products between two sets of samples (twin: gefx.reference.ghost_pairwise).

    M[i, j] = sum_{t,s} (a1_it . a2_js) (g1_it . g2_js)

One program per (token tile t, token tile s, sample i, sample j): both [BLOCK_T, BLOCK_S] Gram
tiles (activations over Da, output gradients over Dg) are accumulated in float32 registers by
tl.dot over feature blocks, multiplied elementwise and reduced in the same program; the T x S
Gram is never written. Each program stores one float32 partial, summed on the host in a fixed
order (deterministic). Tiles whose tokens are all masked are skipped.

Small B x T: the feature loop (Da + Dg features) can be split over SPLIT programs per tile pair
(chosen by the cost model of _split.py): _split's chunk kernel accumulates each chunk of the Da
or of the Dg blocks into one partial Gram tile in a bounded float32 workspace, and
_split.gram_reduce sums them in a fixed order and forms sum(Ga * Gg).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _split as S
from ._common import _gram_tile, _load_mask

# (BLOCK_T, BLOCK_S, BLOCK_K, num_warps, num_stages); the first one is the default / interpreter config
CONFIGS = (
    dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_T=128, BLOCK_S=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=64, BLOCK_S=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_S=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=128, num_warps=4, num_stages=2),
)
CONFIGS_FP32 = (  # float32 / mixed inputs: three tf32 dots per tile (see _common._dot), sized not to spill
    dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=16, num_warps=4, num_stages=3),
    dict(BLOCK_T=32, BLOCK_S=64, BLOCK_K=32, num_warps=4, num_stages=3),
)


@triton.jit
def _ghost_pairwise_kernel(
    a1_ptr, g1_ptr, a2_ptr, g2_ptr, m1_ptr, m2_ptr, part_ptr,
    T1, T2, DA, DG, n_s,
    stride_a1b, stride_a1t, stride_a1d, stride_g1b, stride_g1t, stride_g1d,
    stride_a2b, stride_a2t, stride_a2d, stride_g2b, stride_g2t, stride_g2d,
    stride_m1b, stride_m1t, stride_m2b, stride_m2t,
    stride_pi, stride_pj,
    HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_A: tl.constexpr, PREC_A: tl.constexpr, UPCAST_G: tl.constexpr, PREC_G: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    pt = pid // n_s
    ps = pid % n_s
    offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = ps * BLOCK_S + tl.arange(0, BLOCK_S)
    ok_t = _load_mask(m1_ptr + i * stride_m1b, stride_m1t, offs_t, offs_t < T1, HAS_M1)
    ok_s = _load_mask(m2_ptr + j * stride_m2b, stride_m2t, offs_s, offs_s < T2, HAS_M2)
    live = (tl.sum(ok_t.to(tl.int32), axis=0) > 0) & (tl.sum(ok_s.to(tl.int32), axis=0) > 0)
    # a dead tile pair runs zero feature iterations (a loop bound, not an `if`: a loop nested in
    # scf.if is not software-pipelined)
    ga = _gram_tile(a1_ptr + i * stride_a1b, stride_a1t, stride_a1d, offs_t, ok_t,
                    a2_ptr + j * stride_a2b, stride_a2t, stride_a2d, offs_s, ok_s, tl.where(live, DA, 0),
                    BLOCK_T, BLOCK_S, BLOCK_K, UPCAST_A, PREC_A)
    gg = _gram_tile(g1_ptr + i * stride_g1b, stride_g1t, stride_g1d, offs_t, ok_t,
                    g2_ptr + j * stride_g2b, stride_g2t, stride_g2d, offs_s, ok_s, tl.where(live, DG, 0),
                    BLOCK_T, BLOCK_S, BLOCK_K, UPCAST_G, PREC_G)
    row = tl.sum(ga * gg, axis=1)
    tl.store(part_ptr + i * stride_pi + j * stride_pj + pid, tl.sum(row, axis=0))


def _launch(a1, g1, a2, g2, mask1, mask2, cfg: dict) -> torch.Tensor:
    """Run the kernel with one config (blocks fitted to the problem). cfg["SPLIT"] > 1: the feature
    loops in about that many chunks (S.gram_chunks), whose partial Grams _split's chunk kernel
    writes to a workspace and S.gram_reduce sums."""
    b1, t1, da = a1.shape
    b2, t2, dg = g2.shape
    bt, bs, bk = cfg["BLOCK_T"], cfg["BLOCK_S"], cfg["BLOCK_K"]
    n_t, n_s = triton.cdiv(t1, bt), triton.cdiv(t2, bs)
    if cfg.get("SPLIT", 1) > 1:
        per_a, n_ca, per_g, n_cg = S.gram_chunks(triton.cdiv(da, bk), triton.cdiv(dg, bk), cfg["SPLIT"])
        ws = S.gram_workspace(n_ca + n_cg, b1 * b2 * n_t * n_s, bt, bs, a1.device)
        S.gram_chunk_launch(ws, 0, n_ca, per_a, a1, a2, mask1, mask2, None, n_s, n_t * n_s, cfg, *C.pair_mode(a1, a2))
        S.gram_chunk_launch(ws, n_ca, n_cg, per_g, g1, g2, mask1, mask2, None, n_s, n_t * n_s, cfg, *C.pair_mode(g1, g2))
        return S.gram_reduce(ws, n_ca).view(b1, b2, n_t * n_s).sum(dim=-1)
    part = torch.empty((b1, b2, n_t * n_s), dtype=torch.float32, device=a1.device)
    m1, sm1b, sm1t, has1 = C.mask_args(mask1, a1)
    m2, sm2b, sm2t, has2 = C.mask_args(mask2, a2)
    up_a, prec_a = C.pair_mode(a1, a2)
    up_g, prec_g = C.pair_mode(g1, g2)
    _ghost_pairwise_kernel[(n_t * n_s, b1, b2)](
        a1, g1, a2, g2, m1, m2, part,
        t1, t2, da, dg, n_s,
        *a1.stride(), *g1.stride(), *a2.stride(), *g2.stride(),
        sm1b, sm1t, sm2b, sm2t,
        part.stride(0), part.stride(1),
        HAS_M1=has1, HAS_M2=has2, BLOCK_T=bt, BLOCK_S=bs, BLOCK_K=cfg["BLOCK_K"],
        UPCAST_A=up_a, PREC_A=prec_a, UPCAST_G=up_g, PREC_G=prec_g,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(dim=-1)


def plan(cfg: dict, b1: int, b2: int, t1: int, t2: int, da: int, dg: int, elem_bytes: int, device) -> dict:
    """cfg with SPLIT set by the cost model (_split.gram_split) unless it is set already."""
    if "SPLIT" in cfg:
        return cfg
    items = b1 * b2 * triton.cdiv(t1, cfg["BLOCK_T"]) * triton.cdiv(t2, cfg["BLOCK_S"])
    bk = cfg["BLOCK_K"]
    return dict(cfg, SPLIT=S.gram_split(cfg, items, triton.cdiv(da, bk), triton.cdiv(dg, bk), elem_bytes, device,
                                        input_bytes=(b1 * t1 + b2 * t2) * (da + dg) * elem_bytes))


def fit_configs(t1: int, t2: int, da: int, dg: int, configs=None, fp32: bool = True) -> list[dict]:
    """The candidate configs (float32 / mixed inputs: CONFIGS_FP32) fitted to the problem and pruned for the device."""
    return C.fit_configs(configs or (CONFIGS_FP32 if fp32 else CONFIGS), 4 if fp32 else 2, BLOCK_T=t1, BLOCK_S=t2, BLOCK_K=max(da, dg))


def ghost_pairwise_triton(a1, g1, a2, g2, mask1=None, mask2=None):
    """M[i, j] = sum_{t,s} (a1_it . a2_js)(g1_it . g2_js) -> float32 [B1, B2] (see module doc)."""
    ok = all([C.check_float(n, x) for n, x in (("a1", a1), ("g1", g1), ("a2", a2), ("g2", g2))])
    for n, x in (("a1", a1), ("g1", g1), ("a2", a2), ("g2", g2)):
        C.check_3d(n, x)
    C.check_same("a1 and g1 [B, T]", tuple(a1.shape[:2]), tuple(g1.shape[:2]))
    C.check_same("a2 and g2 [B, T]", tuple(a2.shape[:2]), tuple(g2.shape[:2]))
    C.check_same("a1 vs a2 feature sizes", a1.shape[2], a2.shape[2])
    C.check_same("g1 vs g2 feature sizes", g1.shape[2], g2.shape[2])
    C.check_mask("mask1", mask1, a1, "a1")
    C.check_mask("mask2", mask2, a2, "a2")
    C.check_same_device(a1=a1, g1=g1, a2=a2, g2=g2, mask1=mask1, mask2=mask2)
    if not ok or not C.runs_here(a1):
        return NotImplemented
    b1, t1, da = a1.shape
    b2, t2, dg = g2.shape
    if b1 == 0 or b2 == 0 or t1 == 0 or t2 == 0:
        return torch.zeros((b1, b2), dtype=torch.float32, device=a1.device)
    key = (b1, b2, t1, t2, da, dg, a1.dtype, a2.dtype, g1.dtype, g2.dtype, mask1 is None, mask2 is None)
    fp32 = C.wide(C.pair_mode(a1, a2)[1], C.pair_mode(g1, g2)[1])
    elem = max(x.element_size() for x in (a1, g1, a2, g2))
    cands = [plan(c, b1, b2, t1, t2, da, dg, elem, a1.device) for c in fit_configs(t1, t2, da, dg, fp32=fp32)]
    return C.tuned("ghost_pairwise", key, cands, lambda cfg: _launch(a1, g1, a2, g2, mask1, mask2, cfg), a1.device)
