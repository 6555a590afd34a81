"""Directional derivatives of any function of a model by forward-mode AD.

    value, deriv = gefx.forward_ad.jvp(model, fn, direction)

gives ``value = fn(model)`` and, with the same structure, ``deriv = d/de fn(model at theta + e*d)``
at e = 0: for every output entry y_k, the directional derivative <grad y_k, d>, all of them from one
forward pass that carries tangents (``torch.func.jvp`` over ``torch.func.functional_call``).

G-effect reading. With ``d = {n: p.grad}`` after the step's backward of an objective L and ``fn``
returning a per-token NLL [B, T-1] (``gefx.losses.token_nll``), ``deriv[b, t] = <grad nll[b, t],
grad L>`` is every token's G-effect. With ``d`` the optimizer's update delta_theta (the step's
``p_after - p_before``), ``deriv`` is the first-order predicted change of each output over that
step (an SGD step theta -= lr * grad L gives deriv = -lr * G-effect). No per-sample decomposition is
needed, so the output may be anything computed from the model: rows that mix (batch norm, a
retrieval over the batch, a loss over the whole batch), MoE routing, a per-token or per-layer
quantity.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["jvp"]

# Hugging Face experts implementations whose kernels have no forward-mode AD formula (torch 2.13:
# "_grouped_mm ... does not support forward AD") or are GPU-only fused kernels; "batched_mm" is the
# same computation from bmm / index ops, which forward AD supports. deepgemm_megamoe is a load-time
# weight layout and is never switched.
_NO_FWD_AD_EXPERTS = frozenset({"grouped_mm", "deepgemm", "sonicmoe"})
_EXPERTS_FALLBACK = "batched_mm"


class _Call(torch.nn.Module):
    """``forward() = fn(self.model)`` flattened to its tensor leaves, so that ``functional_call`` on
    this wrapper reparametrises the model's parameters (keys ``"model.<name>"``) for any code that
    calls the model normally."""

    def __init__(self, model: torch.nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_fn", fn)  # never registered as a submodule, even if fn is a Module
        self.spec = None
        self.leaves: list = []
        self.slots: list[int] = []

    def forward(self):
        out = self._fn(self.model)
        leaves, spec = tree_flatten(out)
        slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        if not slots:
            kind = type(out).__name__
            raise ValueError(f"jvp: fn(model) returned no tensor (got {kind}{' ' + repr(out) if out is None else ''}); "
                             "return a tensor or a tuple / list / dict of tensors")
        if not any(leaves[i].is_floating_point() or leaves[i].is_complex() for i in slots):
            raise ValueError("jvp: fn(model) returned no floating-point tensor (only "
                             + ", ".join(sorted({str(leaves[i].dtype) for i in slots}))
                             + "): there is nothing to differentiate")
        self.spec, self.leaves, self.slots = spec, leaves, slots
        return tuple(leaves[i] for i in slots)


def _aliases(model: torch.nn.Module) -> tuple[dict[str, str], dict[int, str], dict[str, torch.Tensor]]:
    """name (every alias of a tied parameter) -> canonical name; id(parameter) -> canonical name;
    canonical name -> parameter. Canonical = the name ``model.named_parameters()`` gives."""
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    alias = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        alias[n] = by_id[id(p)]
    return alias, by_id, params


def _resolve(model: torch.nn.Module, direction: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical name -> parameter, canonical name -> tangent in the parameter's dtype/device)."""
    if not isinstance(direction, Mapping):
        raise TypeError(f"jvp: direction must be a mapping {{parameter name or parameter: tensor}}, got "
                        f"{type(direction).__name__}")
    alias, by_id, params = _aliases(model)
    chosen: dict[str, tuple[str, torch.Tensor]] = {}
    for key, d in direction.items():
        if isinstance(key, str):
            if key not in alias:
                close = difflib.get_close_matches(key, list(alias), n=3)
                raise ValueError(f"jvp: direction key {key!r} is not a parameter name of the model"
                                 + (f" (did you mean {', '.join(map(repr, close))}?)" if close else
                                    " (keys are names as in model.named_parameters(), or the parameters themselves)"))
            canon, shown = alias[key], key
        elif isinstance(key, torch.Tensor):
            if id(key) not in by_id:
                raise ValueError(f"jvp: a direction key (a tensor of shape {tuple(key.shape)}, {key.dtype}) is not a "
                                 "parameter of the model")
            canon = shown = by_id[id(key)]
        else:
            raise TypeError(f"jvp: direction keys must be parameter names or parameters, got {type(key).__name__}")
        if d is None:
            continue
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"jvp: direction[{shown!r}] must be a tensor or None, got {type(d).__name__}")
        p = params[canon]
        if d.shape != p.shape:
            raise ValueError(f"jvp: direction[{shown!r}] has shape {tuple(d.shape)} but parameter {canon!r} has "
                             f"shape {tuple(p.shape)}")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"jvp: parameter {canon!r} is {p.dtype}: it has no tangent space")
        if canon in chosen:
            prev_name, prev = chosen[canon]
            if prev is not d and not (prev.shape == d.shape and torch.equal(prev.detach().to(p.device),
                                                                             d.detach().to(p.device))):
                names = sorted(a for a, c in alias.items() if c == canon)
                where = (f"under {prev_name!r} and {shown!r}" if prev_name != shown
                         else f"under {shown!r}, by name and as the tensor")
                raise ValueError(f"jvp: parameter {canon!r} is given two different directions, {where}"
                                 + (f" ({' and '.join(map(repr, names))} are tied names of one tensor, which has one "
                                    "tangent: give it under one name, or the same tensor under both)"
                                    if len(names) > 1 else ""))
            continue
        chosen[canon] = (shown, d)
    tangents = {n: d.detach().to(device=params[n].device, dtype=params[n].dtype) for n, (_, d) in chosen.items()}
    _check_finite({shown: tangents[n] for n, (shown, _) in chosen.items()})
    return params, tangents


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor with a NaN or inf entry. Fast path: one sum per tensor and
    one host sync (a NaN or inf entry makes the sum NaN or inf); only when a sum is not finite (or
    overflowed) is each such tensor checked entry by entry."""
    if not tensors:
        return
    dev = next(iter(tensors.values())).device
    sums = [t.sum() for t in tensors.values()]
    flags = torch.isfinite(torch.stack([(x.abs() if x.is_complex() else x).to(device=dev, dtype=torch.float64)
                                        for x in sums]))
    if bool(flags.all()):
        return
    for (name, t), ok in zip(tensors.items(), flags.tolist()):
        if not ok and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ValueError(f"jvp: direction[{name!r}] contains {kind} entries")


class _ExpertsForFwdAD:
    """Switch Hugging Face MoE blocks whose experts implementation has no forward-AD formula (the
    default "grouped_mm") to "batched_mm" for the block, then restore every config as it was."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.saved: list[tuple[object, object]] = []

    def __enter__(self):
        seen = set()
        for m in self.model.modules():
            cfg = getattr(m, "config", None)
            if cfg is None or id(cfg) in seen or not hasattr(cfg, "_experts_implementation_internal"):
                continue
            seen.add(id(cfg))
            impl = cfg._experts_implementation_internal
            if isinstance(impl, str) and impl in _NO_FWD_AD_EXPERTS:
                self.saved.append((cfg, impl))
                cfg._experts_implementation_internal = _EXPERTS_FALLBACK  # this config only, not its sub-configs
        return self

    def __exit__(self, *exc):
        for cfg, impl in reversed(self.saved):
            cfg._experts_implementation_internal = impl
        self.saved.clear()
        return False


def jvp(model: torch.nn.Module, fn: Callable[[torch.nn.Module], Any],
        direction: Mapping[str | torch.Tensor, torch.Tensor | None]) -> tuple[Any, Any]:
    """``(fn(model), d/de fn(model with theta + e * direction) at e = 0)`` by forward-mode AD.

    Args:
        model: any ``torch.nn.Module`` (a Hugging Face model, a PEFT wrapper, a plain module).
        fn: ``fn(model) -> output``; it may run the model any way it likes (keyword arguments,
            several forwards, hooks, a loss on the outputs). It may also call the model object it
            closes over: that is the same object, reparametrised for the call. Output: a tensor, or a
            (nested) tuple / list / dict of them, or a Hugging Face ``ModelOutput`` (a registered
            pytree; pass ``use_cache=False``, see below).
        direction: {parameter name (as in ``model.named_parameters()``, any alias of a tied
            parameter) or the parameter itself: tensor of its shape, or None}. Parameters absent
            (or None) get a zero tangent. Tensors are cast to their parameter's dtype and device.

    Returns:
        ``(value, derivative)``, both with fn's output structure. ``value`` is the output of the one
        forward that was run; ``derivative`` holds, for every floating-point tensor of the output,
        the directional derivative entry by entry, in that tensor's dtype; None for integer / bool
        tensors (e.g. a mask) and for non-tensor leaves (which are returned in ``value`` as fn
        gave them).

    G-effects: with ``fn = lambda m: gefx.losses.token_nll(m(ids).logits, labels)[0]`` ([B, T-1])
    and ``direction = {n: p.grad}`` after the step's backward of an objective L, ``derivative[b, t]
    = <grad nll[b, t], grad L>``: every token's G-effect (0 at masked positions). With direction =
    the optimizer's update delta_theta, it is the first-order predicted change of each token's NLL
    over that step.

    Cost: one forward that carries a tangent beside every activation and no backward: each matmul
    runs three times (primal, dX W and X dW), attention on sdpa's math kernel, so about 3x a plain
    forward's flops; measured on the CPU (bench/bench_jvp.py, Llama 9M, float32, B x T from 2 x 32 to
    8 x 512) 4-5x a plain no-grad sdpa forward and 1.1-1.5x the per-sample engine's traced forward +
    partial backward (which gives per-sequence values only); one backward per token instead is
    ~50x (48 tokens) to ~150x (192 tokens) slower. Memory: the activations of one layer at a time
    with their tangents (about 2x a no-grad forward's working set), nothing kept afterwards. The number of outputs does not matter
    (a [B, T] NLL costs the same as its sum); the number of directions does (one call each).
    torch.func adds a fixed per-op overhead (binary ops where one operand carries no tangent run
    through Python decompositions: ~25 ms per call on a 6-layer model), negligible at real sizes.

    When to prefer which:
      * ``jvp`` gives <grad y, d> for every entry y of any output against ONE known direction d:
        per-token effects, outputs whose rows mix, MoE or anything else the per-sample engine's
        rules refuse, or a direction that only exists after the step (the optimizer's update).
      * ``gefx.g_effect`` / ``gefx.grad_dots`` (the per-sample engine) give per-sample products
        <grad r_i, grad L> without forming grad L first, many risks and the objective's own
        per-instance split (PG-effects), per-group values, norms and cosines, from the traced
        forward of the step itself (one partial backward per risk, no extra forward). For
        per-sequence effects in a training loop it is the cheaper one; it needs a per-sample risk
        (entry i depends on row i only) and covered layers. Neither needs the other: their
        per-sequence values agree (``sequence_nll``'s effects are the masked means of jvp's
        per-token ones).

    Semantics and side effects:
      * Parameters, ``.grad`` and ``requires_grad`` are untouched: the forward runs on detached
        aliases of the parameters (functional_call puts them in place for the call and restores
        the originals). Buffers take no tangent; fn sees copies made inside the transform (which
        refuses in-place updates of tensors from outside it) and whatever it changes in them
        (BatchNorm's running stats in train mode) is copied back: they end as a plain call
        leaves them.
      * No autograd graph: fn runs under ``torch.no_grad()`` (forward-mode AD does not depend on
        grad mode), so ``value`` and ``derivative`` do not require grad. Works the same under
        an outer ``torch.no_grad()`` or ``torch.inference_mode()``.
      * Tied parameters (lm_head tied to the embeddings): one tensor, one tangent, taken from
        whichever name (or the tensor) the direction uses; two different tensors for it raise.
      * Scaled-dot-product attention: fn runs under ``sdpa_kernel(SDPBackend.MATH)``: none of the
        fused kernels (CPU flash; CUDA flash, memory-efficient, cuDNN) has a forward-AD formula in
        torch 2.13, the math one is plain matmul + softmax. The caller's backend settings are
        restored afterwards. ``value`` can then differ from a plain call on a fused kernel by
        roundoff. Hugging Face models on "sdpa" (the default) and "eager" attention work; other
        attention implementations (flash_attention_2, flex_attention, ...) only if their kernels
        support forward AD.
      * Hugging Face MoE: experts implemented by "grouped_mm" (the default in transformers 5),
        "deepgemm" or "sonicmoe" (no forward-AD formula) run as "batched_mm" for the call, the
        same computation by bmm; each config is restored afterwards. The routing (top-k) is
        piecewise constant: the derivative is the one with the experts chosen at theta.
      * Randomness (dropout in train mode): fn runs once and consumes the RNG exactly as a plain
        ``fn(model)`` call on the same kernels: under the same RNG state ``value`` equals a plain
        call (bit for bit, tested) and ``derivative`` is the derivative with that dropout mask.
        Attention dropout inside sdpa: on the CPU, sdpa with dropout runs the math kernel in a
        plain call too (same masks); on CUDA a plain call's fused kernels draw their masks with
        their own generator, so the value there is a different dropout sample.
      * ``ModelOutput`` with a cache: a KV cache is not a pytree of tensors; it is returned in
        ``value`` as built inside the transform, with derivative None. Pass ``use_cache=False``
        (or return ``out.logits``).
      * In-place operations on activations and module hooks work (forward AD supports them).

    Raises:
        ValueError: a key that is no parameter (name or tensor) of the model (with the closest
            names), a direction of the wrong shape or with NaN or inf entries (naming the
            parameter), two different directions for one (tied) parameter, fn returning no
            floating-point tensor.
        TypeError: direction not a mapping, keys or values of the wrong type.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"jvp: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(fn):
        raise TypeError(f"jvp: fn must be callable fn(model) -> tensor(s), got {type(fn).__name__}")
    params, tangents = _resolve(model, direction)

    call = _Call(model, fn)
    fixed = {"model." + n: p.detach() for n, p in params.items() if n not in tangents}
    names = list(tangents)
    primals = tuple(params[n].detach() for n in names)
    tans = tuple(tangents[n] for n in names)

    # Buffers take no tangent. They are cloned inside the transform (torch.func refuses in-place
    # updates of tensors captured from outside it, e.g. BatchNorm's running stats in train mode) and
    # whatever fn changed in them is copied back afterwards, as a plain call would have left them.
    buffers = dict(model.named_buffers())
    clones: dict[str, torch.Tensor] = {}

    def f(*duals):
        values = dict(fixed)
        values.update(("model." + n, t) for n, t in zip(names, duals))
        clones.clear()
        clones.update((n, b.clone()) for n, b in buffers.items())
        values.update(("model." + n, b) for n, b in clones.items())
        return torch.func.functional_call(call, values, (), tie_weights=True, strict=False)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _ExpertsForFwdAD(model):
        if names:
            outs, douts = torch.func.jvp(f, primals, tans)
        else:  # no direction at all: the derivative is zero, one plain forward
            outs = f()
            douts = tuple(torch.zeros_like(o) for o in outs)

        for n, b in clones.items():  # buffers fn updated in place (outside the transform now)
            if not torch.equal(b, buffers[n]):
                buffers[n].copy_(b)

    leaves, dleaves = list(call.leaves), [None] * len(call.leaves)
    for i, o, do in zip(call.slots, outs, douts):
        leaves[i] = o
        if o.is_floating_point() or o.is_complex():
            dleaves[i] = do
    return tree_unflatten(leaves, call.spec), tree_unflatten(dleaves, call.spec)
