"""Pure-PyTorch reference of every engine op: the oracle for the kernels and the fallback everywhere.

Notation (docs/METHOD.md §5). One *set* of samples is given by two factor tensors of the same batch and
token count: ``a`` [B, T, Da] and ``g`` [B, T, Dg]. Sample i's gradient of a matrix parameter is
``G_i^T A_i = sum_t g_it (x) a_it`` (for nn.Linear: a = input activations, g = output gradients).
Every op returns inner products of such gradients without forming them:

    ghost_pairwise   M[i, j] = sum_{t,s} (a1_it . a2_js) (g1_it . g2_js)           -> [B1, B2]
    ghost_self       v[i]    = sum_{t,s} (a_it . a_is) (g_it . g_is) = ||G_i^T A_i||^2 -> [B]
    dense_dot        v[i]    = sum_t g_it^T M a_it = <G_i^T A_i, M>,  M: [Dg, Da]     -> [B]
    embedding_*      the same with a one-hot left factor given by token ids [B, T]:
                     the activation Gram becomes the equality mask [id1_it == id2_js]
    embedding_linear_pairwise
                     cross term of a tied parameter used by an embedding (ids1, g1) and by a
                     linear map (l2, r2) whose left factor is dense over the vocabulary:
                     M[i, j] = sum_{t,s} l2_js[id1_it] (g1_it . r2_js)
    norm_grad        per-sample gradient of an elementwise weight: sum_t u_it * g_it -> [B, D]

Masks are optional bool tensors [B, T]; a False token contributes nothing. Inputs stay in their
storage dtype and are converted tile by tile; accumulation is float32, or float64 when any input
is float64. Peak extra memory is bounded by ``tile_budget()`` elements per Gram tile (two tiles
live at once), set by the GEFX_TILE_MB environment variable (default 64 MiB of float32 per tile).
"""
from __future__ import annotations

import math
import os

import torch

from .precision import acc_dtype


def tile_budget() -> int:
    """Elements allowed in one Gram tile (the torch reference keeps two such tiles alive)."""
    mb = float(os.environ.get("GEFX_TILE_MB", "64"))
    return max(1, int(mb * 2**20 / 4))


def _masked(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Upcast one tile and zero its masked-out tokens."""
    x = x.to(dtype)
    return x if mask is None else x * mask.unsqueeze(-1).to(dtype)


def _tiles(b1: int, t1: int, b2: int, t2: int) -> tuple[int, int, int, int]:
    """Tile sizes (samples and tokens of each set) with bi*ti*bj*tj <= tile_budget()."""
    budget = tile_budget()
    ti = min(t1, max(1, int(math.isqrt(budget))))
    tj = min(t2, max(1, budget // ti))
    per_pair = ti * tj
    bi = min(b1, max(1, int(math.isqrt(max(1, budget // per_pair)))))
    bj = min(b2, max(1, budget // (per_pair * bi)))
    return bi, ti, bj, tj


def _gram(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """[bi, ti, D] x [bj, tj, D] -> [bi, ti, bj, tj] of token dot products."""
    bi, ti, d = x1.shape
    bj, tj, _ = x2.shape
    return (x1.reshape(bi * ti, d) @ x2.reshape(bj * tj, d).T).reshape(bi, ti, bj, tj)


def _id_gram(ids1: torch.Tensor, ids2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[bi, ti] x [bj, tj] -> [bi, ti, bj, tj] equality mask of token ids."""
    return (ids1[:, :, None, None] == ids2[None, None, :, :]).to(dtype)


def _pairwise_tiled(left_gram, right_gram, b1, t1, b2, t2, out_dtype, device) -> torch.Tensor:
    """Shared tile loop: M[i, j] = sum_{t,s} left_gram(tile)[i,t,j,s] * right_gram(tile)[i,t,j,s]."""
    out = torch.zeros(b1, b2, dtype=out_dtype, device=device)
    if b1 == 0 or b2 == 0 or t1 == 0 or t2 == 0:
        return out
    bi, ti, bj, tj = _tiles(b1, t1, b2, t2)
    for i0 in range(0, b1, bi):
        for j0 in range(0, b2, bj):
            acc = out[i0:i0 + bi, j0:j0 + bj]
            for t0 in range(0, t1, ti):
                for s0 in range(0, t2, tj):
                    sl = (slice(i0, i0 + bi), slice(t0, t0 + ti), slice(j0, j0 + bj), slice(s0, s0 + tj))
                    acc += (left_gram(*sl) * right_gram(*sl)).sum(dim=(1, 3))
    return out


def ghost_pairwise(a1, g1, a2, g2, mask1=None, mask2=None) -> torch.Tensor:
    dt = acc_dtype(a1, g1, a2, g2)

    def ga(i, t, j, s):
        return _gram(_masked(a1[i, t], None if mask1 is None else mask1[i, t], dt),
                     _masked(a2[j, s], None if mask2 is None else mask2[j, s], dt))

    def gg(i, t, j, s):
        return _gram(g1[i, t].to(dt), g2[j, s].to(dt))

    return _pairwise_tiled(ga, gg, a1.shape[0], a1.shape[1], a2.shape[0], a2.shape[1], dt, a1.device)


def ghost_self(a, g, mask=None) -> torch.Tensor:
    """Symmetric case: only token tiles (p, q) with q >= p are visited; off-diagonal ones count twice."""
    dt = acc_dtype(a, g)
    b, t = a.shape[:2]
    out = torch.zeros(b, dtype=dt, device=a.device)
    if b == 0 or t == 0:
        return out
    budget = tile_budget()
    tt = min(t, max(1, int(math.isqrt(budget))))
    bb = min(b, max(1, budget // (tt * tt)))
    for i0 in range(0, b, bb):
        sl = slice(i0, i0 + bb)
        m = None if mask is None else mask[sl]
        for p0 in range(0, t, tt):
            ap = _masked(a[sl, p0:p0 + tt], None if m is None else m[:, p0:p0 + tt], dt)
            gp = g[sl, p0:p0 + tt].to(dt)
            for q0 in range(p0, t, tt):
                aq = _masked(a[sl, q0:q0 + tt], None if m is None else m[:, q0:q0 + tt], dt)
                gq = g[sl, q0:q0 + tt].to(dt)
                tile = ((ap @ aq.transpose(1, 2)) * (gp @ gq.transpose(1, 2))).sum(dim=(1, 2))
                out[sl] += tile if q0 == p0 else 2 * tile
    return out


def dense_dot(a, g, m, mask=None) -> torch.Tensor:
    """v[i] = sum_t g_it^T M a_it, chunked over tokens so that (a M^T) never exceeds one tile."""
    dt = acc_dtype(a, g, m)
    b, t, da = a.shape
    dg = g.shape[-1]
    out = torch.zeros(b, dtype=dt, device=a.device)
    if b == 0 or t == 0:
        return out
    mt = m.to(dt).T  # [Da, Dg]
    rows = max(1, tile_budget() // max(1, dg))
    tt = min(t, max(1, rows // b)) if rows >= b else 1
    bb = b if rows >= b else rows
    for i0 in range(0, b, bb):
        for t0 in range(0, t, tt):
            sl = (slice(i0, i0 + bb), slice(t0, t0 + tt))
            x = _masked(a[sl], None if mask is None else mask[sl], dt)
            out[sl[0]] += ((x @ mt) * g[sl].to(dt)).sum(dim=(1, 2))
    return out


def embedding_pairwise(ids1, g1, ids2, g2, mask1=None, mask2=None) -> torch.Tensor:
    dt = acc_dtype(g1, g2)

    def gi(i, t, j, s):
        return _id_gram(ids1[i, t], ids2[j, s], dt)

    def gg(i, t, j, s):
        return _gram(_masked(g1[i, t], None if mask1 is None else mask1[i, t], dt),
                     _masked(g2[j, s], None if mask2 is None else mask2[j, s], dt))

    return _pairwise_tiled(gi, gg, g1.shape[0], g1.shape[1], g2.shape[0], g2.shape[1], dt, g1.device)


def embedding_self(ids, g, mask=None) -> torch.Tensor:
    """||sum_t e_{id_t} (x) g_t||^2 by segment sums over token ids: O(T * D) per sample."""
    dt = acc_dtype(g)
    b, t, d = g.shape
    out = torch.zeros(b, dtype=dt, device=g.device)
    for i in range(b):
        gi = _masked(g[i:i + 1], None if mask is None else mask[i:i + 1], dt)[0]
        uniq, inv = torch.unique(ids[i], return_inverse=True)
        rows = torch.zeros(uniq.numel(), d, dtype=dt, device=g.device).index_add_(0, inv, gi)
        out[i] = (rows * rows).sum()
    return out


def embedding_dense_dot(ids, g, m, mask=None) -> torch.Tensor:
    """v[i] = sum_t M[id_it] . g_it  (M: [V, D], the dense gradient of the embedding table)."""
    dt = acc_dtype(g, m)
    x = _masked(g, mask, dt)
    return (m[ids].to(dt) * x).sum(dim=(1, 2))  # rows gathered, then converted: no copy of the table


def embedding_linear_pairwise(ids1, g1, l2, r2, mask1=None, mask2=None) -> torch.Tensor:
    dt = acc_dtype(g1, l2, r2)

    def gl(i, t, j, s):
        lj = l2[j, s]  # [bj, tj, V]
        picked = lj.reshape(-1, lj.shape[-1])[:, ids1[i, t].reshape(-1)]  # [bj*tj, bi*ti]
        bi, ti = ids1[i, t].shape
        return picked.T.reshape(bi, ti, lj.shape[0], lj.shape[1]).to(dt)

    def gr(i, t, j, s):
        return _gram(_masked(g1[i, t], None if mask1 is None else mask1[i, t], dt),
                     _masked(r2[j, s], None if mask2 is None else mask2[j, s], dt))

    return _pairwise_tiled(gl, gr, g1.shape[0], g1.shape[1], r2.shape[0], r2.shape[1], dt, g1.device)


def norm_grad(u, g, mask=None) -> torch.Tensor:
    """Per-sample gradient of an elementwise weight: sum_t u_it * g_it -> [B, D]."""
    dt = acc_dtype(u, g)
    return (_masked(u, mask, dt) * g.to(dt)).sum(dim=1)


OPS = {
    "ghost_pairwise": ghost_pairwise,
    "ghost_self": ghost_self,
    "dense_dot": dense_dot,
    "embedding_pairwise": embedding_pairwise,
    "embedding_self": embedding_self,
    "embedding_dense_dot": embedding_dense_dot,
    "embedding_linear_pairwise": embedding_linear_pairwise,
    "norm_grad": norm_grad,
}
