"""Per-module rules: from a recorded call and its output gradients to gradient *pieces*.

A piece describes the per-sample gradients of one parameter without forming them when they are
large:

    Factored(left, right)   grad_i = sum_t left_it (x) right_it, for a parameter [D0, D1].
                            left is dense [B, T, D0] or token ids [B, T] (a one-hot row over
                            D0, for embedding tables); right is [B, T, D1].
    PerSample(grad)         grad_i formed explicitly, [B, *param.shape]; only for parameters no
                            larger than a norm layer's weight, or for the generic fallback.

Rules are matched in registration order; the first whose predicate accepts the module wins.
:func:`register_rule` adds one for a custom layer. Built in:

    nn.Linear (not subclassed forward)   weight: Factored(g, a);  bias: PerSample(sum_t g)
    transformers Conv1D                  weight [in, out]: Factored(a, g); bias as above
    nn.Embedding (padding_idx masked)    weight: Factored(ids, g)
    elementwise-affine norms             weight: PerSample(sum_t g * u), u = y(w + 1) - y(w);
      (LayerNorm, every RMSNorm-like     bias: PerSample(sum_t g). Matched by structure and
       module)                           verified by what it computes (affine, elementwise in w)
    anything else with parameters        exact per-sample vector-Jacobian products of that module
                                         alone (one small recomputation per sample)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from . import ops
from .dist import full


@dataclass
class Factored:
    left: torch.Tensor            # [B, T, D0] float, or [B, T] long token ids
    right: torch.Tensor           # [B, T, D1]
    mask: torch.Tensor | None = None  # [B, T] bool: tokens that count

    @property
    def ids(self) -> bool:
        return not self.left.is_floating_point()

    @property
    def batch(self) -> int:
        return self.right.shape[0]

    @property
    def tokens(self) -> int:
        return self.right.shape[0] * self.right.shape[1]


@dataclass
class PerSample:
    grad: torch.Tensor            # [B, *param.shape]

    @property
    def batch(self) -> int:
        return self.grad.shape[0]


Piece = Factored | PerSample
Rule = Callable[["object", "object", list], dict]  # (tape, call, output grads) -> {local name: Piece}
_RULES: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_rule(predicate: Callable[[nn.Module], bool] | type, rule: Rule, *, first: bool = True) -> None:
    """Register `rule(tape, call, grads) -> {local parameter name: Piece}` for modules accepted by
    `predicate` (a callable, or a class matched with isinstance). `grads` aligns with
    ``call.outputs`` (the output gradients, zeros where a loss does not reach an output)."""
    pred = (lambda m, cls=predicate: isinstance(m, cls)) if isinstance(predicate, type) else predicate
    _RULES.insert(0 if first else len(_RULES), (pred, rule))


def rule_for(module: nn.Module) -> Rule:
    return next(rule for pred, rule in _RULES if pred(module))


# -- helpers ------------------------------------------------------------------------------------
def _input(call) -> torch.Tensor:
    x = call.args[0] if call.args else next(iter(call.kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(call.module).__name__}: first input is not a tensor")
    return x


def _batched(x: torch.Tensor, d: int, what: str) -> torch.Tensor:
    """[B, ..., d] -> [B, T, d] (T = product of the middle dimensions)."""
    if x.dim() < 2:
        raise ValueError(f"{what}: input of shape {tuple(x.shape)} has no batch dimension")
    return x.reshape(x.shape[0], -1, d)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _own_forward(module: nn.Module, base: type) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


# -- linear maps --------------------------------------------------------------------------------
def linear_rule(tape, call, grads):
    m = call.module
    a = _batched(_input(call), m.in_features, "Linear").detach()
    g = _batched(grads[0], m.out_features, "Linear")
    out = {"weight": Factored(g, a)}
    if m.bias is not None:
        out["bias"] = PerSample(g.sum(1, dtype=_acc(g)))
    return out


def _is_conv1d(m: nn.Module) -> bool:  # transformers.pytorch_utils.Conv1D, matched without importing it
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def conv1d_rule(tape, call, grads):
    m = call.module
    nx, nf = m.weight.shape
    a = _batched(_input(call), nx, "Conv1D").detach()
    g = _batched(grads[0], nf, "Conv1D")
    out = {"weight": Factored(a, g)}
    if getattr(m, "bias", None) is not None:
        out["bias"] = PerSample(g.sum(1, dtype=_acc(g)))
    return out


def embedding_rule(tape, call, grads):
    m = call.module
    if m.scale_grad_by_freq:
        raise ValueError("nn.Embedding with scale_grad_by_freq=True has no per-sample gradient "
                         "(its scale depends on the whole batch); gefx does not support it")
    ids = _input(call)
    if ids.dim() < 2:
        raise ValueError(f"Embedding: input ids of shape {tuple(ids.shape)} have no batch dimension")
    ids = ids.reshape(ids.shape[0], -1)
    g = _batched(grads[0], m.embedding_dim, "Embedding")
    mask = None if m.padding_idx is None else ids != m.padding_idx
    return {"weight": Factored(ids, g, mask)}


# -- elementwise-affine (norm) layers -----------------------------------------------------------
def _norm_candidate(m: nn.Module) -> bool:
    ps = dict(m.named_parameters(recurse=False))
    w = ps.get("weight")
    return (w is not None and w.dim() == 1 and set(ps) <= {"weight", "bias"}
            and (ps.get("bias") is None or ps["bias"].shape == w.shape)
            and next(m.children(), None) is None)


_NORM_AFFINE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _norm_eval(m, x, weight, bias):
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return functional_call(m, params, (x,))


def _norm_u(m: nn.Module, x: torch.Tensor, verify: bool, y: torch.Tensor | None = None) -> torch.Tensor | None:
    """u = dy/dw for y elementwise-affine in w (y = u * w + c), or None if the module is not
    (checked on a random direction when `verify`). Once verified, a bias-free module whose
    recorded output `y` is in the accumulation dtype and unmodified gives u = y / w directly (w
    without zeros; within one rounding of u), instead of two re-evaluations of the module."""
    dt = _acc(x)
    w = full(m.weight.detach()).to(dt)
    b = None if getattr(m, "bias", None) is None else full(m.bias.detach()).to(dt)
    if (not verify and b is None and y is not None and y.dtype == dt and y._version == 0
            and y.shape == x.shape and bool((w != 0).all())):
        return y.detach() / w
    x = x.detach().to(dt)
    y0 = _norm_eval(m, x, w, b)
    if not isinstance(y0, torch.Tensor) or y0.shape != x.shape or x.shape[-1] != w.numel():
        return None
    u = _norm_eval(m, x, w + 1, b) - y0
    if not verify:
        return u
    # verify on a random direction: affine and elementwise in w (and b adds itself)
    gen = torch.Generator(device="cpu").manual_seed(0)
    delta = torch.rand(w.shape, generator=gen, dtype=dt).to(w.device) + 0.5
    scale = y0.abs().amax().clamp(min=1.0) + u.abs().amax()
    tol = (1e-9 if dt == torch.float64 else 2e-4) * scale * 4
    if (_norm_eval(m, x, w + delta, b) - y0 - u * delta).abs().amax() > tol:
        return None
    if b is not None and (_norm_eval(m, x, w, b + delta) - y0 - delta).abs().amax() > tol:
        return None
    return u


def norm_rule(tape, call, grads):
    m = call.module
    x = _input(call)
    cache = _NORM_AFFINE  # verified once per module (the structure of its forward does not change)
    with tape.paused(), torch.no_grad():
        u = _norm_u(m, x, verify=m not in cache, y=call.outputs[0]) if cache.get(m, True) else None
    if u is None:  # not elementwise-affine after all: exact generic fallback
        cache[m] = False
        return generic_rule(tape, call, grads)
    cache[m] = True
    d = m.weight.numel()
    g = _batched(grads[0], d, type(m).__name__)
    out = {"weight": PerSample(ops.norm_grad(_batched(u, d, type(m).__name__), g))}
    if getattr(m, "bias", None) is not None:
        out["bias"] = PerSample(g.sum(1, dtype=_acc(g)))
    return out


# -- generic fallback ---------------------------------------------------------------------------
def generic_rule(tape, call, grads):
    """Exact per-sample gradients of the module's own parameters by per-sample vector-Jacobian
    products of that module alone (its recorded inputs, sliced to one sample, and the recorded
    output gradients). Forms [B, *shape] per parameter: meant for small parameters. Assumes the
    module treats batch rows independently and deterministically (no dropout in train mode)."""
    m = call.module
    local = [loc for loc, _ in tape.owned[m]]
    own = dict(m.named_parameters(recurse=False))
    B = call.outputs[0].shape[0]
    result = {loc: torch.zeros((B, *own[loc].shape), dtype=_acc(own[loc]), device=own[loc].device) for loc in local}

    def take(i):
        return lambda x: x[i:i + 1].detach() if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == B else x

    for i in range(B):
        leaves = {loc: full(own[loc].detach()).requires_grad_(True) for loc in local}
        try:
            with tape.paused(), torch.enable_grad():
                out = functional_call(m, leaves, tree_map(take(i), call.args), tree_map(take(i), call.kwargs))
            flat, _ = tree_flatten(out)
            outs = [flat[k] for k in call.output_index]
            gi = torch.autograd.grad(outs, list(leaves.values()), [g[i:i + 1] for g in grads], allow_unused=True)
        except Exception as exc:
            raise RuntimeError(f"unsupported module {type(m).__name__} ({tape.module_names.get(m, '?')}): "
                               f"the generic per-sample fallback failed ({type(exc).__name__}: {exc}); "
                               "register a rule with gefx.rules.register_rule") from exc
        for loc, gr in zip(local, gi):
            if gr is not None:
                result[loc][i] = gr
    return {loc: PerSample(v) for loc, v in result.items()}


# order: last registered first, so register the catch-all first
register_rule(lambda m: True, generic_rule)
register_rule(_norm_candidate, norm_rule)
register_rule(lambda m: _own_forward(m, nn.Embedding), embedding_rule)
register_rule(_is_conv1d, conv1d_rule)
register_rule(lambda m: _own_forward(m, nn.Linear), linear_rule)
