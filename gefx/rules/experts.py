"""Mixture-of-experts blocks of transformers 5.x (stacked expert weights [E, out, in]): per expert,
the tokens routed to it, Factored pieces per sample."""
from __future__ import annotations

import torch
from torch import nn

from .. import dist
from ..dist import shape as full_shape
from ..pieces import Factored, PerSample
from ..precision import acc_dtype
from .base import Rule, _copied, _replay, own_params, register_rule


def _is_hf_experts(m: nn.Module) -> bool:
    """An experts module of transformers 5.x (``@use_experts_implementation``): stacked weights
    [E, out, in] (or [E, in, out] when ``is_transposed``), forward(hidden [N, H], top_k_index
    [N, k], top_k_weights [N, k]). A post-expert norm is left to the generic rule."""
    up = getattr(m, "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj", None)
    down = getattr(m, "down_proj", None)
    return (hasattr(m, "is_transposed") and hasattr(m, "has_gate") and not getattr(m, "has_post_expert_norm", False)
            and isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter)
            and len(full_shape(up)) == 3 and len(full_shape(down)) == 3)


def _by_sample(call, rows: torch.Tensor, *tensors):
    """Tensors of selected rows (row index `rows` into the call's [N, ...] rows) regrouped per
    sample: [samples, L, D] each (L: the most rows any sample has) and the [samples, L] mask."""
    owner = rows // (call.outputs[0].shape[0] // call.samples)
    counts = torch.bincount(owner, minlength=call.samples)
    order = torch.argsort(owner, stable=True)
    owner = owner[order]
    slot = torch.arange(len(owner), device=owner.device) - (torch.cumsum(counts, 0) - counts)[owner]
    width = max(int(counts.max()), 1) if len(owner) else 1
    mask = torch.zeros(call.samples, width, dtype=torch.bool, device=rows.device)
    mask[owner, slot] = True
    out = []
    for t in tensors:
        x = t.new_zeros(call.samples, width, t.shape[-1])
        x[owner, slot] = t[order]
        out.append(x)
    return out, mask


def experts_pieces(tape, call, grads):
    """Per expert e, the tokens routed to it (grouped by sample): Factored pieces of the stacked
    weights' slice [e], from the expert's up/gate-up and down projections re-run on their inputs
    (the module's own gate and activation); biases per sample. Verified against autograd like
    every rule (a family whose experts differ falls back to the generic rule)."""
    m = call.module
    x, index, weights = (_copied(call.args) + tuple(_copied(call.kwargs).values()))[:3]
    gated = m.has_gate
    # the stacked weights whole (FSDP2 / ZeRO-3: gathered for this module alone)
    up, down = dist.full(m.gate_up_proj if gated else m.up_proj).detach(), dist.full(m.down_proj).detach()
    up_b = getattr(m, "gate_up_proj_bias" if gated else "up_proj_bias", None) if m.has_bias else None
    down_b = getattr(m, "down_proj_bias", None) if m.has_bias else None
    up_b, down_b = (None if b is None else dist.full(b).detach() for b in (up_b, down_b))

    def lin(h, w, b):
        y = h @ w if m.is_transposed else h @ w.T
        return y if b is None else y + b

    experts = [int(e) for e in torch.unique(index) if 0 <= int(e) < up.shape[0]]
    with torch.enable_grad(), _replay(call):
        out = torch.zeros(x.shape[0], down.shape[1] if not m.is_transposed else down.shape[2],
                          dtype=grads[0].dtype, device=x.device)
        caps = []
        for e in experts:
            tok, pos = torch.where(index == e)
            xe = x[tok]
            gu = lin(xe, up[e], None if up_b is None else up_b[e].detach()).detach().requires_grad_(True)
            h = m._apply_gate(gu) if gated else m.act_fn(gu)
            o = lin(h, down[e], None if down_b is None else down_b[e].detach())
            out = out.index_add(0, tok, (o * weights[tok, pos, None]).to(out.dtype))
            caps.append((e, tok, xe, gu, h.detach(), o))
        if not caps:
            return {}
        got = torch.autograd.grad(out, [c[3] for c in caps] + [c[5] for c in caps], grads[0], allow_unused=True)
    n = len(caps)
    names = ("gate_up_proj" if gated else "up_proj", "down_proj")
    result: dict = {names[0]: [], names[1]: []}
    biases = {}
    for (e, tok, xe, gu, h, o), d_gu, d_o in zip(caps, got[:n], got[n:]):
        d_gu = torch.zeros_like(gu) if d_gu is None else d_gu
        d_o = torch.zeros_like(o) if d_o is None else d_o
        (a, g_up, hh, g_down), mask = _by_sample(call, tok, xe, d_gu, h, d_o.detach())
        result[names[0]].append(Factored(a, g_up, mask, e) if m.is_transposed else Factored(g_up, a, mask, e))
        result[names[1]].append(Factored(hh, g_down, mask, e) if m.is_transposed else Factored(g_down, hh, mask, e))
        for name, g in ((names[0] + "_bias", g_up), ("down_proj_bias", g_down)):
            if m.has_bias:
                bias = biases.setdefault(name, torch.zeros(call.samples, *full_shape(getattr(m, name)),
                                                           dtype=acc_dtype(g), device=g.device))
                bias[:, e] += g.sum(1, dtype=acc_dtype(g))
    return {**result, **{n: PerSample(b) for n, b in biases.items()}}


register_rule(_is_hf_experts, Rule("experts", experts_pieces, own_params))
