"""Per-sample gradient inner products on raw tensors, for libraries that capture their own
activations and output gradients (DP clipping, data attribution, influence).

For a linear map y = x W^T, sample i contributes activations ``a[i]`` [T, in] and output gradients
``g[i]`` [T, out]; its weight gradient is ``g[i]^T a[i]`` (never formed here).

    pairwise(a1, g1, a2, g2)        [B1, B2]  <grad_i, grad_j> between two sets
    self_norms(a, g)                [B]       ||grad_i||^2
    dense_dot(a, g, m)              [B]       <grad_i, m>, m: [out, in] (e.g. an aggregated gradient)
    embedding_pairwise(ids1, g1, ids2, g2)   the same for an embedding table (ids: [B, T] long)
    embedding_self_norms(ids, g)
    embedding_dense_dot(ids, g, m)  m: [V, D]
    norm_grad(u, g)                 [B, D]    per-sample gradient of an elementwise weight
                                              (u: the normalised input the weight multiplies)

Shapes: a [B, T, in], g [B, T, out]; 2-D inputs [B, D] are read as T = 1. Optional masks are bool
[B, T]: False tokens are ignored (padding, non-answer tokens). The two sets may differ in batch
size and token count. Inputs may be float64/32/16 or bfloat16 and keep their storage dtype;
results are float32 (float64 if any input is float64). Each call dispatches to the fastest
available backend for the tensors' device (see ``gefx.backends``).
"""
from __future__ import annotations

import torch

from .backends import dispatch
from .precision import acc_dtype

# dense_dot of a CPU m in another dtype than the accumulation's: its rows in blocks of about this
# many elements (each backend converts the m it is given whole: a float32 copy of a 16-bit parameter
# would be twice the parameter)
_CONVERT_BLOCK = 1 << 22

__all__ = ["pairwise", "self_norms", "dense_dot", "embedding_pairwise", "embedding_self_norms",
           "embedding_dense_dot", "norm_grad"]


def _as3d(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, D] (or [B, D]), got shape {tuple(x.shape)}")
    return x


def _floating(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _ids(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor of token ids [B, T]")
    x = x.unsqueeze(1) if x.dim() == 1 else x
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")
    return x.long()


def _mask(mask, like: torch.Tensor, name: str):
    if mask is None:
        return None
    mask = mask.unsqueeze(1) if mask.dim() == 1 and like.shape[1] == 1 else mask
    if tuple(mask.shape) != tuple(like.shape[:2]):
        raise ValueError(f"{name} must be [B, T] = {tuple(like.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def _set(a, g, mask, k: str):
    """Validate one sample set (a, g, mask) and return it in [B, T, D] form."""
    a, g = _as3d(a, f"a{k}"), _as3d(g, f"g{k}")
    _floating(a, f"a{k}")
    _floating(g, f"g{k}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a{k} {tuple(a.shape)} and g{k} {tuple(g.shape)} disagree on [B, T]")
    if a.device != g.device:
        raise ValueError(f"a{k} is on {a.device} but g{k} is on {g.device}")
    return a, g, _mask(mask, a, f"mask{k}")


def _same_features(x1, x2, what: str) -> None:
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"{what}: feature sizes differ ({x1.shape[-1]} vs {x2.shape[-1]})")
    if x1.device != x2.device:
        raise ValueError(f"{what}: tensors on different devices ({x1.device} vs {x2.device})")


def pairwise(a1, g1, a2, g2, mask1=None, mask2=None) -> torch.Tensor:
    """M[i, j] = <g1_i^T a1_i, g2_j^T a2_j> = sum_{t,s} (a1_it . a2_js)(g1_it . g2_js)."""
    a1, g1, mask1 = _set(a1, g1, mask1, "1")
    a2, g2, mask2 = _set(a2, g2, mask2, "2")
    _same_features(a1, a2, "a1 vs a2")
    _same_features(g1, g2, "g1 vs g2")
    return dispatch("ghost_pairwise", a1, g1, a2, g2, mask1, mask2)


def self_norms(a, g, mask=None) -> torch.Tensor:
    """v[i] = ||g_i^T a_i||_F^2, the squared per-sample gradient norm."""
    a, g, mask = _set(a, g, mask, "")
    return dispatch("ghost_self", a, g, mask)


def dense_dot(a, g, m, mask=None) -> torch.Tensor:
    """v[i] = <g_i^T a_i, m> = sum_t g_it^T m a_it, with m [out, in]."""
    a, g, mask = _set(a, g, mask, "")
    if m.dim() != 2 or tuple(m.shape) != (g.shape[-1], a.shape[-1]):
        raise ValueError(f"m must be [out, in] = {(g.shape[-1], a.shape[-1])}, got {tuple(m.shape)}")
    _floating(m, "m")
    m = m.to(a.device)
    rows = max(1, _CONVERT_BLOCK // max(1, m.shape[1]))
    if m.device.type != "cpu" or m.dtype == acc_dtype(a, g, m) or m.shape[0] <= rows:
        return dispatch("dense_dot", a, g, m, mask)
    # <g_i^T a_i, m> is a sum over m's rows (g's features): one block of rows converted at a time
    out = dispatch("dense_dot", a, g[..., :rows], m[:rows], mask)
    for o in range(rows, m.shape[0], rows):
        out += dispatch("dense_dot", a, g[..., o:o + rows], m[o:o + rows], mask)
    return out


def embedding_pairwise(ids1, g1, ids2, g2, mask1=None, mask2=None) -> torch.Tensor:
    """M[i, j] = sum_{t,s} [ids1_it == ids2_js] (g1_it . g2_js): embedding-table gradients."""
    ids1, ids2 = _ids(ids1, "ids1"), _ids(ids2, "ids2")
    g1, g2 = _as3d(g1, "g1"), _as3d(g2, "g2")
    for ids, g, k in ((ids1, g1, "1"), (ids2, g2, "2")):
        _floating(g, f"g{k}")
        if ids.shape != g.shape[:2]:
            raise ValueError(f"ids{k} {tuple(ids.shape)} and g{k} {tuple(g.shape)} disagree on [B, T]")
    _same_features(g1, g2, "g1 vs g2")
    return dispatch("embedding_pairwise", ids1.to(g1.device), g1, ids2.to(g2.device), g2,
                    _mask(mask1, g1, "mask1"), _mask(mask2, g2, "mask2"))


def embedding_self_norms(ids, g, mask=None) -> torch.Tensor:
    """v[i] = ||sum_t e_{ids_it} g_it^T||^2."""
    ids, g = _ids(ids, "ids"), _as3d(g, "g")
    _floating(g, "g")
    if ids.shape != g.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} and g {tuple(g.shape)} disagree on [B, T]")
    return dispatch("embedding_self", ids.to(g.device), g, _mask(mask, g, "mask"))


def embedding_dense_dot(ids, g, m, mask=None) -> torch.Tensor:
    """v[i] = sum_t m[ids_it] . g_it, with m [V, D]."""
    ids, g = _ids(ids, "ids"), _as3d(g, "g")
    _floating(g, "g")
    if m.dim() != 2 or m.shape[1] != g.shape[-1]:
        raise ValueError(f"m must be [V, {g.shape[-1]}], got {tuple(m.shape)}")
    if ids.numel() and (int(ids.max()) >= m.shape[0] or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= m.shape[0] else int(ids.min())
        raise ValueError(f"token id {bad} out of range for a table of {m.shape[0]} rows")
    return dispatch("embedding_dense_dot", ids.to(g.device), g, m.to(g.device), _mask(mask, g, "mask"))


def norm_grad(u, g, mask=None) -> torch.Tensor:
    """Per-sample gradient sum_t u_it * g_it [B, D] of an elementwise weight."""
    u, g, mask = _set(u, g, mask, "")
    if u.shape != g.shape:
        raise ValueError(f"u {tuple(u.shape)} and g {tuple(g.shape)} must have the same shape")
    return dispatch("norm_grad", u, g, mask)
