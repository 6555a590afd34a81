"""Elementwise-affine layers (LayerNorm, every RMSNorm-like module, offset norms): weight
PerSample(sum_t g * u) with u = dy/dw along ones (one forward-mode pass; u = y / w for a norm
verified offset-free), bias PerSample(sum_t g). Verified on each module (gefx.rules.verify)."""
from __future__ import annotations

import torch
from torch import nn

from .. import dist, ops
from ..dist import shape as full_shape
from ..pieces import PerSample
from ..precision import acc_dtype
from .base import Refused, Rule, _copied, _input, own_params, recompute, register_rule, rows
from .verify import verdict_of


def _norm_candidate(m: nn.Module) -> bool:
    ps = dict(m.named_parameters(recurse=False))
    w = ps.get("weight")
    return (w is not None and len(full_shape(w)) == 1 and set(ps) <= {"weight", "bias"}
            and (ps.get("bias") is None or full_shape(ps["bias"]) == full_shape(w))
            and next(m.children(), None) is None)


def _norm_params(m, dt):
    w = dist.full(m.weight).detach().to(dt)
    b = None if getattr(m, "bias", None) is None else dist.full(m.bias).detach().to(dt)
    return w, b


def _with_input(call, x):
    """Copies of the call's recorded arguments, with the first input replaced by x."""
    args, kwargs = _copied(call.args), _copied(call.kwargs)
    if args:
        return (x, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: x}


def norm_u(tape, call) -> torch.Tensor:
    """u = dy/dw for y elementwise-affine in w (y = u * w + c): the derivative of the module's
    output along w -> w + t*1, by one forward-mode pass (exact, whatever dtype the module computes
    in). For a norm verified offset-free (c = 0) whose recorded output is unmodified and in the
    accumulation dtype, u = y / w (w without zeros) instead."""
    u = _quotient_u(call)
    if u is not None:
        return u
    m = call.module
    x = _input(call)
    dt = acc_dtype(x)
    w, b = _norm_params(m, dt)
    args, kwargs = _with_input(call, x.detach().to(dt, copy=True))
    params = {} if b is None else {"bias": b}

    def f(weight):
        return recompute(tape, call, {**params, "weight": weight}, args, kwargs)

    with torch.no_grad():
        _, u = torch.func.jvp(f, (w,), (torch.ones_like(w),))
    return u


def _quotient_u(call) -> torch.Tensor | None:
    """u = y / w for a norm verified offset-free whose recorded output is unmodified and in the
    accumulation dtype (w without zeros); None otherwise."""
    m = call.module
    x = _input(call)
    dt = acc_dtype(x)
    y = call.outputs[0]
    verdict = verdict_of(call)
    if (verdict is None or not verdict.offset_free or getattr(m, "bias", None) is not None or y.dtype != dt
            or y._version != call.out_versions[0] or y.shape != x.shape):
        return None
    w = _norm_params(m, dt)[0]
    return y.detach() / w if bool((w != 0).all()) else None


def norm_pieces(tape, call, grads):
    m = call.module
    d = full_shape(m.weight).numel()
    # u by a quotient of recorded tensors each time (nothing kept), or by forward-mode AD once per
    # trace (kept for its other losses)
    u = call.memo.get("norm_u")
    if u is None:
        u = _quotient_u(call)
    if u is None:
        u = call.memo["norm_u"] = norm_u(tape, call)
    if u.shape[-1] != d:
        raise Refused(f"{call.name}: its weight does not act on the last dimension")
    g = rows(call, grads[0], d)
    out = {"weight": PerSample(ops.norm_grad(rows(call, u, d), g))}
    if getattr(m, "bias", None) is not None:
        out["bias"] = PerSample(g.sum(1, dtype=acc_dtype(g)))
    return out


def _offset_free(tape, call, outs, leaves) -> dict:
    """After a passed verification: whether y = u * w exactly (no offset), so that u = y / w."""
    u = norm_u(tape, call)  # the verdict is not stored yet: this is the forward-mode u
    y0 = outs[0].detach()
    return {"offset_free": bool(((y0 - u * leaves["weight"].detach()).abs() <= 1e-6 * y0.abs().max()).all())}


register_rule(_norm_candidate, Rule("norm", norm_pieces, own_params, streams=True, note=_offset_free))
