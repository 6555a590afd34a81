"""Per-module rules: from a recorded call and its output gradients to gradient pieces.

A rule says which parameters of a module it *covers* (``Rule.covers``; by default the module's own
parameters and those of its ``ParameterDict`` / ``ParameterList`` children) and how to turn one
recorded call plus the gradients at the call's outputs into per-sample pieces for them
(``gefx.pieces``). Rules are matched in registration order, the last registered first;
:func:`register_rule` adds one for a custom layer. Built in:

    nn.Linear (and subclasses)   weight: Factored(g, a);  bias: PerSample(sum_t g)
    transformers Conv1D          weight [in, out]: Factored(a, g); bias as above
    nn.Embedding (and scaled     weight: Factored(ids, g * scale), padding_idx masked
      subclasses)
    elementwise-affine norms     weight: PerSample(sum_t g * u) with u = dy/dw along ones (one
      (LayerNorm, every RMSNorm- forward-mode pass; u = y / w for verified offset-free norms);
      like module)               bias: PerSample(sum_t g)
    nn.MultiheadAttention        the generic rule over all its parameters (out_proj is used
                                 functionally, never called); batch on dim 1 unless batch_first
    anything else                generic: the module re-run on the recorded inputs (same random
                                 numbers, copies of its buffers), checked to reproduce the
                                 recorded output, then per-sample vector-Jacobian products

Every rule but the generic one is *verified* on the first call of each module under each
:func:`conditions` (its forward, hooks, training flag, plain attributes, the call's input shapes
and dtypes, autocast), except on stock modules whose rule is exact by construction (``stock``: nn.Linear,
nn.Embedding and transformers' Conv1D of exactly those classes, running torch's own ops): its pieces for a random output gradient must equal autograd's gradient of the re-run
module (``verdict``). A rule that does not fit the module (a subclass whose forward does more, a
norm that is not elementwise-affine in its weight) is replaced by the generic rule for that module.
The verdicts are kept in :data:`CHECKED` (module -> verdicts; ``gefx.soundness.forget`` clears it).

Rows: a recorded input/output has the samples of the loss on its batch dimension, either one row
per sample or, when a model flattens [B, T, H] to [B*T, H] (OPT, mixture-of-experts blocks),
consecutive groups of rows per sample (``Call.samples``; checked by ``gefx.soundness``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_map

from . import ops
from .dist import full, shape as full_shape
from .pieces import Factored, PerSample, dense, merge
from .precision import acc_dtype


class Refused(ValueError):
    """gefx cannot give an exact number for this model or input, and says why and what to do.
    `names` lists the counted parameters concerned (empty: the loss or the model as a whole)."""

    def __init__(self, message: str, names=()):
        super().__init__(message)
        self.names = list(names)


@dataclass(frozen=True)
class Rule:
    name: str
    pieces: Callable             # (tape, call, grads) -> {local parameter name: Piece}
    covers: Callable[[nn.Module], list[str]]
    batch_dim: Callable[[nn.Module], int] | None = None   # None: found per call (gefx.soundness.batch_dim)
    exact: bool = False          # exact by construction (autograd of the module itself): not verified


_RULES: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def own_params(m: nn.Module) -> list[str]:
    """The module's own parameters and those of its parameter containers (ParameterDict/List),
    which have no forward of their own (e.g. PEFT's lora_embedding_A)."""
    names = [n for n, _ in m.named_parameters(recurse=False)]
    for child_name, child in m.named_children():
        if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
            names += [f"{child_name}.{n}" for n, _ in child.named_parameters(recurse=False)]
    return names


def all_params(m: nn.Module) -> list[str]:
    return [n for n, _ in m.named_parameters(remove_duplicate=False)]


def register_rule(predicate: Callable[[nn.Module], bool] | type, rule: Callable | Rule, *,
                  covers: Callable[[nn.Module], list[str]] | str | None = None,
                  batch_dim: Callable[[nn.Module], int] | int | None = None) -> None:
    """Register `rule(tape, call, grads) -> {local parameter name: Piece or [Piece, ...]}` for
    modules accepted by `predicate` (a callable, or a class matched with isinstance).

    `grads` aligns with ``call.outputs`` (zeros where a loss does not reach an output); the rows
    of every recorded tensor group into ``call.samples`` samples (use ``rows(call, x, d)``).
    `covers` names the parameters the rule accounts for: "own" (the default: the module's own and
    its parameter containers'), "all" (every parameter below the module: its submodules are then not
    recorded separately, e.g. ``register_rule(MyBlock, gefx.rules.GENERIC, covers="all")``) or a
    callable module -> local names. `batch_dim` is the dimension of the module's inputs and outputs
    that holds the batch (default: found per call, 0 or 1). A rule other than GENERIC is verified
    against autograd on the first call of each module; if it does not fit, the generic rule is
    used for that module. `rule` may also be a :class:`Rule` (covers and batch_dim then override
    its own when given).
    """
    pred = (lambda m, cls=predicate: isinstance(m, cls)) if isinstance(predicate, type) else predicate
    cov = {"own": own_params, "all": all_params}.get(covers, covers) if isinstance(covers, str) else covers
    if cov is not None and not callable(cov):
        raise ValueError(f"covers must be 'own', 'all' or a callable, got {covers!r}")
    dim = (lambda m, d=batch_dim: d) if isinstance(batch_dim, int) else batch_dim
    if isinstance(rule, Rule):
        rule = replace(rule, covers=cov or rule.covers, batch_dim=dim if dim is not None else rule.batch_dim)
    else:
        rule = Rule(getattr(rule, "__name__", "custom"), rule, cov or own_params, dim)
    _RULES.insert(0, (pred, rule))


def rule_for(module: nn.Module) -> Rule:
    return next(rule for pred, rule in _RULES if pred(module))


# -- helpers ------------------------------------------------------------------------------------
def _input(call) -> torch.Tensor:
    x = call.args[0] if call.args else next(iter(call.kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(call.module).__name__}: first input is not a tensor")
    return x


def rows(call, x: torch.Tensor, d: int | None = None) -> torch.Tensor:
    """x read as [samples, T, d] (or [samples, T] ids for d=None): the rows of x's batch
    dimension grouped into ``call.samples`` samples, the rest flattened."""
    if x.dim() < 1:
        raise Refused(f"{type(call.module).__name__}: a recorded tensor of shape {tuple(x.shape)} "
                      "has no batch dimension")
    x = x.movedim(call.batch_dim, 0) if call.batch_dim else x
    return x.reshape(call.samples, -1) if d is None else x.reshape(call.samples, -1, d)


def _copied(tree):
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _cast(tree, dt):
    return tree_map(lambda x: x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


@contextlib.contextmanager
def _replay(call, seen: dict | None = None):
    """The random-number and autocast state the module's forward ran under; the global RNG state
    is restored afterwards. `seen["drew"]` tells whether the re-run drew random numbers."""
    devices = [d for d in call.rng if d != "cpu"]
    with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
        torch.set_rng_state(call.rng["cpu"])
        for d in devices:
            torch.cuda.set_rng_state(call.rng[d], d)
        for device_type, dtype in call.autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield
        if seen is not None:
            seen["drew"] = not torch.equal(torch.get_rng_state(), call.rng["cpu"]) or any(
                not torch.equal(torch.cuda.get_rng_state(d), call.rng[d]) for d in devices)


def recompute(tape, call, params: dict[str, torch.Tensor], args=None, kwargs=None, seen: dict | None = None):
    """Re-run ``call.module.forward`` (not its hooks: the recorded inputs are those after its
    pre-hooks and the recorded outputs those before its other forward hooks) on copies of the
    recorded inputs, with `params` substituted, on copies of the module's buffers (a forward that
    updates statistics or its inputs in place leaves the model's untouched), with its plain
    tensor attributes as the call saw them (a recurrent state it rebinds), under the recorded RNG
    and autocast state, with gefx's hooks paused."""
    m = call.module
    args = _copied(call.args) if args is None else args
    kwargs = _copied(call.kwargs) if kwargs is None else kwargs
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    now = {k: v for k, v in vars(m).items() if k in call.state}
    vars(m).update(call.state)  # plain attributes as the call saw them (a recurrent state)
    try:
        with tape.paused(), torch.enable_grad(), _replay(call, seen), _reparametrize_module(m, {**buffers, **params}):
            return m.forward(*args, **kwargs)
    finally:
        vars(m).update(now)


def _outputs(call, out) -> list[torch.Tensor]:
    flat, _ = tree_flatten(out)
    if call.broadcast:
        b = call.outputs[0].shape[0]
        flat = [x.expand(b, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
                for x in flat]
    try:
        return [flat[k] for k in call.output_index]
    except (IndexError, TypeError) as exc:
        raise Refused(f"re-running {call.name} gives a different output structure than its recorded "
                      "call; gefx cannot handle this module") from exc


# -- linear maps --------------------------------------------------------------------------------
def linear_pieces(tape, call, grads):
    m = call.module
    a = rows(call, _input(call), m.in_features).detach()
    g = rows(call, grads[0], m.out_features)
    out = {"weight": Factored(g, a)}
    if m.bias is not None:
        out["bias"] = PerSample(g.sum(1, dtype=acc_dtype(g)))
    return out


def _is_conv1d(m: nn.Module) -> bool:  # transformers.pytorch_utils.Conv1D, matched without importing it
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and len(full_shape(m.weight)) == 2


def conv1d_pieces(tape, call, grads):
    m = call.module
    nx, nf = full_shape(m.weight)
    a = rows(call, _input(call), nx).detach()
    g = rows(call, grads[0], nf)
    out = {"weight": Factored(a, g)}
    if getattr(m, "bias", None) is not None:
        out["bias"] = PerSample(g.sum(1, dtype=acc_dtype(g)))
    return out


def embedding_pieces(tape, call, grads):
    m = call.module
    if m.scale_grad_by_freq:
        raise Refused(f"{call.name}: nn.Embedding with scale_grad_by_freq=True has no per-sample "
                      "gradient (its scale depends on the whole batch); gefx does not support it")
    ids = rows(call, _input(call))
    g = rows(call, grads[0], m.embedding_dim)
    scale = getattr(m, "embed_scale", None) if type(m).forward is not nn.Embedding.forward else None
    if scale is not None:  # e.g. Gemma's scaled word embedding: y = W[ids] * embed_scale
        g = g * (scale.to(device=g.device, dtype=g.dtype) if isinstance(scale, torch.Tensor) else float(scale))
    mask = None
    if m.padding_idx is not None:  # no gradient reaches the padding row (its output gradient may even be NaN)
        mask = ids != m.padding_idx
        g = torch.where(mask.unsqueeze(-1), g, 0)
    return {"weight": Factored(ids, g, mask)}


# -- elementwise-affine (norm) layers -----------------------------------------------------------
def _norm_candidate(m: nn.Module) -> bool:
    ps = dict(m.named_parameters(recurse=False))
    w = ps.get("weight")
    return (w is not None and len(full_shape(w)) == 1 and set(ps) <= {"weight", "bias"}
            and (ps.get("bias") is None or full_shape(ps["bias"]) == full_shape(w))
            and next(m.children(), None) is None)


def _norm_params(m, dt):
    w = full(m.weight).detach().to(dt)
    b = None if getattr(m, "bias", None) is None else full(m.bias).detach().to(dt)
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
    verdict = CHECKED.get(m, {}).get(("norm", call.conditions))
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


# -- mixture-of-experts blocks (transformers 5.x stacked experts) -------------------------------
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
    up, down = full(m.gate_up_proj if gated else m.up_proj).detach(), full(m.down_proj).detach()
    up_b = getattr(m, "gate_up_proj_bias" if gated else "up_proj_bias", None) if m.has_bias else None
    down_b = getattr(m, "down_proj_bias", None) if m.has_bias else None
    up_b, down_b = (None if b is None else full(b).detach() for b in (up_b, down_b))

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


# -- generic rule -------------------------------------------------------------------------------
GENERIC_MB = float(os.environ.get("GEFX_GENERIC_MB", "2048"))


def _sample_grads(call, g: torch.Tensor) -> torch.Tensor:
    """[samples, *g.shape]: g with every row outside sample i zeroed in slice i."""
    dim, n = call.batch_dim, g.shape[call.batch_dim]
    owner = torch.arange(n, device=g.device) // (n // call.samples)
    onehot = owner == torch.arange(call.samples, device=g.device)[:, None]         # [samples, n]
    shape = [call.samples] + [1] * g.dim()
    shape[dim + 1] = n
    return onehot.view(shape).to(g.dtype) * g.unsqueeze(0)


def _check_replay(call, outs, drew: bool) -> None:
    """The re-run must give the recorded outputs (same dropout masks, same state)."""
    for o, r, v in zip(outs, call.outputs, call.out_versions):
        if r._version != v:
            if drew:
                raise Refused(f"{call.name} draws random numbers in its forward and its output was "
                              "changed in place afterwards, so gefx cannot check that re-running it "
                              "reproduces the forward; avoid the in-place op after it or use eval mode")
            continue
        if o.shape != r.shape:
            raise Refused(f"re-running {call.name} gives an output of shape {tuple(o.shape)}, the "
                          f"recorded one is {tuple(r.shape)}")
        tol = 8 * torch.finfo(r.dtype).eps * float(r.detach().abs().max().clamp(min=1e-30))
        if not torch.equal(o, r) and float((o.detach() - r.detach()).abs().max()) > tol:
            raise Refused(f"re-running {call.name} on its recorded inputs does not reproduce its "
                          "output (random numbers outside torch's default generators, or state that "
                          "changed since the forward); gefx cannot differentiate it per sample. "
                          "Measure in eval mode, or register a rule for it (gefx.register_rule)")


def generic_pieces(tape, call, grads):
    """Exact per-sample gradients of the covered parameters: the module is re-run once on the whole
    recorded batch (same random numbers, buffer copies) and checked against the recorded output;
    then one vector-Jacobian product per sample, batched (``is_grads_batched``), with the output
    gradients of the other samples' rows zeroed. Forms [samples, *shape] per parameter."""
    m = call.module
    local = [loc for loc, _ in tape.owned[m]]
    params = {loc: m.get_parameter(loc) for loc in local}
    size = call.samples * sum(full_shape(p).numel() for p in params.values()) * 8
    if size > GENERIC_MB * 2**20:
        raise Refused(f"{call.name} ({type(m).__name__}) has no specific rule and its generic per-sample "
                      f"gradients would take {size / 2**20:.0f} MiB (> GEFX_GENERIC_MB={GENERIC_MB:g}); "
                      "register a rule for it (gefx.register_rule), measure fewer samples at once, "
                      "or leave its parameters out of `params`")
    leaves = {loc: full(p).detach().requires_grad_(True) for loc, p in params.items()}
    seen: dict = {}
    try:
        outs = _outputs(call, recompute(tape, call, leaves, seen=seen))
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - a forward that cannot be re-run on its recorded inputs
        raise Refused(f"re-running {call.name} ({type(m).__name__}) on its recorded inputs failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); gefx cannot differentiate "
                      "it per sample. Register a rule for it (gefx.register_rule)") from exc
    _check_replay(call, outs, drew=seen["drew"])
    want = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
    if not want:
        return {}
    targets = list(leaves.values())
    with torch.enable_grad():
        if call.samples == 1:
            got = [None if x is None else x.unsqueeze(0) for x in torch.autograd.grad(
                [o for o, _ in want], targets, [g for _, g in want], allow_unused=True)]
        else:
            batched = [_sample_grads(call, g) for _, g in want]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = list(torch.autograd.grad([o for o, _ in want], targets, batched, retain_graph=True,
                                                   allow_unused=True, is_grads_batched=True))
            except RuntimeError:  # an op without a batching rule: one product per sample
                per = [torch.autograd.grad([o for o, _ in want], targets, [b[i] for b in batched],
                                           retain_graph=True, allow_unused=True) for i in range(call.samples)]
                got = [None if per[0][k] is None else torch.stack([p[k] for p in per]) for k in range(len(targets))]
    out = {}
    for loc, x in zip(leaves, got):
        p = params[loc]
        out[loc] = PerSample(torch.zeros((call.samples, *full_shape(p)), dtype=acc_dtype(p), device=p.device)
                             if x is None else x.to(acc_dtype(p)))
    return out


# -- verification -------------------------------------------------------------------------------
@dataclass
class Verdict:
    exact: bool                 # the rule's pieces matched autograd on this module
    offset_free: bool = False   # norm rule: y = u * w, so u = y / w
    error: float = 0.0          # the largest relative difference seen


#: module -> {(rule name, conditions): Verdict}: a verdict holds for calls made under the same
#: conditions (:func:`conditions`), the last _KEPT per module
CHECKED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_KEPT = 16


def checked_rule(tape, call) -> Rule:
    """The rule to use for this call: the module's own rule once it is verified on this module
    under the call's conditions, else the generic rule. Stock modules (:func:`stock`) need no
    verification. Refused when the module changed between its recorded forward and now (a re-run,
    the verification's or a rule's, would then compute something else than the forward did)."""
    m = call.module
    rule = tape.rules[m]
    if rule.exact:
        return rule
    if call.conditions is None:  # stock when it ran
        if stock(m, rule):
            return rule
        raise Refused(f"{call.name} ({type(m).__name__}) changed between its recorded forward and this measurement "
                      "(it was a stock module then); measure right after the forward", [c for _, c in tape.owned[m]])
    what = changed(call.conditions[0], module_state(m, tape.hook_ids))
    if what:
        raise Refused(f"{call.name} ({type(m).__name__}) changed between its recorded forward and this measurement "
                      f"({what}): its rule would re-run another computation than the forward's; measure right "
                      "after the forward", [c for _, c in tape.owned[m]])
    key = (rule.name, call.conditions)
    verdicts = CHECKED.setdefault(m, {})
    if key not in verdicts:
        verdicts[key] = _verify(tape, call, rule)
        while len(verdicts) > _KEPT:
            del verdicts[next(iter(verdicts))]
    return rule if verdicts[key].exact else replace(GENERIC, batch_dim=rule.batch_dim)


def verdict_of(tape, call) -> Verdict | None:
    """The verdict made for the call's rule under its conditions (None: none yet)."""
    return CHECKED.get(call.module, {}).get((tape.rules[call.module].name, call.conditions))


def ready(tape, call) -> bool:
    """Whether the call's pieces can be formed inside autograd's backward, as its output gradient
    arrives (``gefx.dots.collect_each``): a built-in rule that forms them from the recorded tensors
    alone (no autograd of its own), with nothing left to verify on this module."""
    rule = tape.rules[call.module]
    if rule.pieces not in (linear_pieces, conv1d_pieces, embedding_pieces, norm_pieces):
        return False
    if rule.exact or (call.conditions is None and stock(call.module, rule)):
        return True
    verdict = verdict_of(tape, call)
    return verdict is not None and verdict.exact


# -- the conditions a verdict holds under --------------------------------------------------------
# A rule verified on one call is trusted on another only if everything gefx can see that the
# module's computation may depend on is the same: the module's state (module_state) and the call's
# inputs and context. What it cannot see: globals, closures and other objects the forward reads
# (e.g. a config object's fields), tensor values beyond small buffers and attributes.
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_SMALL = 16  # tensor attributes and buffers up to this many elements count by value
_INTERNALS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (training: a part of its own)
_ENGINES = ("ds_", "applied_pre_backward")  # DeepSpeed ZeRO-3's per-module counters, set around each call


def _plain(v):
    """A hashable stand-in for a value that may steer a forward: plain values as they are, tuples
    and lists of them as tuples, small tensors by value, other tensors by shape and dtype; None
    for anything else (not seen)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return tuple(v)
    if isinstance(v, torch.Tensor):
        meta = (tuple(v.shape), v.dtype)
        return (*meta, tuple(v.detach().flatten().tolist())) if v.numel() <= _SMALL and not v.is_meta else meta
    return None


def _hashable(f):
    try:
        hash(f)
        return f
    except TypeError:
        return id(f)


def module_state(m: nn.Module, skip=()) -> tuple:
    """What gefx can see of a module's behaviour, as named parts: its class, the forward bound at
    call time (replaced on the instance or on the class: the function and its code), its forward
    hooks, its training flag, its plain attributes (flags, sizes, epsilons, small tensors; on the
    instance, and on its classes below nn.Module), its own parameters' full shapes and its buffers
    (shape and dtype; small ones by value). `skip`: the handle ids of gefx's own hooks."""
    forward = vars(m).get("forward") or type(m).forward
    func = getattr(forward, "__func__", forward)
    hooks = tuple(_hashable(h) for d in (m._forward_pre_hooks, m._forward_hooks) for k, h in d.items() if k not in skip)
    attrs = tuple(sorted((k, x) for k, v in vars(m).items()
                         if k not in _INTERNALS and not k.startswith(_ENGINES) and (x := _plain(v)) is not None))
    classwide = tuple((k, x) for cls in type(m).__mro__[:type(m).__mro__.index(nn.Module)]
                      for k, v in vars(cls).items() if not k.startswith("__") and (x := _plain(v)) is not None)
    # parameters by their full shape only: sharding (ZeRO-3, FSDP2) and mixed precision swap them
    tensors = (tuple((n, tuple(full_shape(t))) for n, t in m.named_parameters(recurse=False))
               + tuple((n, _plain(t)) for n, t in m.named_buffers(recurse=False)))
    return (("its class", type(m)), ("its forward", (_hashable(forward), _hashable(getattr(func, "__code__", None)))),
            ("its forward hooks", hooks), ("its training flag", m.training), ("its attributes", attrs),
            ("its class's attributes", classwide),
            ("its parameters and buffers", tensors))


def conditions(m: nn.Module, args, kwargs, autocast, skip=()) -> tuple:
    """Everything a recorded call's computation may depend on that gefx can see: the module's
    state, the call's inputs (tensors by shape and dtype, plain values as they are, keyword
    names) and the autocast state."""
    inputs = tuple(_seen(x) for x in tree_flatten((args, kwargs))[0])
    return module_state(m, skip), (inputs, tuple(kwargs), tuple(autocast))


def _seen(x):
    """An input as the conditions see it: a tensor by shape and dtype, a plain value as it is."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype
    plain = _plain(x)
    return type(x) if plain is None else plain


def changed(before: tuple, now: tuple) -> str:
    """What differs between two module states ("" if nothing), named for a refusal."""
    for (part, a), (_, b) in zip(before, now):
        if a != b:
            if part in ("its attributes", "its class's attributes"):
                da, db = dict(a), dict(b)
                keys = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
                return f"{part} {', '.join(repr(k) for k in keys)}"
            return part
    return ""


_F_EMBEDDING = torch.nn.functional.embedding  # as torch defines it (a later monkey-patch is not stock)


def _stock_linear(f) -> bool:
    """F.linear is torch's, or DeepSpeed ZeRO-3's replacement (x W^T + b by its own autograd
    function, which gathers the partitioned weight), not another patch."""
    zero3 = getattr(sys.modules.get("deepspeed.runtime.zero.linear"), "zero3_linear_wrap", None)
    return f is torch._C._nn.linear or (zero3 is not None and f is zero3)


def stock(m: nn.Module, rule: Rule) -> bool:
    """An nn.Linear, nn.Embedding (without scale_grad_by_freq, sparse gradients or max_norm) or
    transformers Conv1D of exactly that class, running the class's own forward (none bound on the
    instance) through torch's own functional op (F.linear: or DeepSpeed ZeRO-3's replacement),
    with no parameters of its own but its weight and bias, under its built-in rule: the rule is
    then exact by construction (the gradient formulas of F.linear, F.embedding and addmm), so
    verifying it would only cost a re-run of the module with a backward (and, for a sharded one,
    gather the whole weight)."""
    if "forward" in vars(m) or {n for n, _ in m.named_parameters(recurse=False)} - {"weight", "bias"}:
        return False
    F = torch.nn.functional
    if type(m) is nn.Linear:
        return rule.pieces is linear_pieces and _stock_linear(F.linear)
    if type(m) is nn.Embedding:
        return (rule.pieces is embedding_pieces and F.embedding is _F_EMBEDDING
                and not m.scale_grad_by_freq and not m.sparse and m.max_norm is None)
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and type(m) is conv1d and rule.pieces is conv1d_pieces


def _verify(tape, call, rule: Rule) -> Verdict:
    """Compare the rule's aggregated gradient for a random output gradient with autograd's
    through the re-run module, in the accumulation dtype."""
    m = call.module
    local = [loc for loc, _ in tape.owned[m]]
    first = m.get_parameter(local[0])
    dt = acc_dtype(first)
    leaves = {loc: full(m.get_parameter(loc)).detach().to(dt).requires_grad_(True) for loc in local}
    args, kwargs = _cast(_copied(call.args), dt), _cast(_copied(call.kwargs), dt)
    try:
        outs = _outputs(call, recompute(tape, call, leaves, args, kwargs))
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
        ref = torch.autograd.grad(outs, list(leaves.values()), v, allow_unused=True)
        fake = replace(call, args=args, kwargs=kwargs, outputs=[o.detach() for o in outs],
                       out_versions=[o._version for o in outs], samples=1, memo={}, broadcast=False)
        pieces = rule.pieces(tape, fake, v)
    except Refused:
        raise
    except Exception:  # noqa: BLE001 - the rule does not apply to this module: generic instead
        return Verdict(False)
    worst = 0.0
    for loc, r in zip(leaves, ref):
        p = pieces.get(loc)
        got = torch.zeros_like(leaves[loc]) if not p else dense(merge(p if isinstance(p, list) else [p]),
                                                                 leaves[loc].shape)
        r = torch.zeros_like(leaves[loc]) if r is None else r
        scale = float(r.abs().max().clamp(min=torch.finfo(dt).tiny))
        worst = max(worst, float((got.to(dt) - r).abs().max()) / scale)
    offset_free = False
    if rule.name == "norm" and worst <= 1e-4:
        u = norm_u(tape, call)  # the verdict is not stored yet: this is the forward-mode u
        y0 = outs[0].detach()
        offset_free = bool(((y0 - u * leaves["weight"].detach()).abs() <= 1e-6 * y0.abs().max()).all())
    return Verdict(worst <= 1e-4, offset_free, worst)


# -- registry (last registered first: the catch-all first) --------------------------------------
GENERIC = Rule("generic", generic_pieces, own_params, exact=True)
_RULES.append((lambda m: True, GENERIC))
register_rule(_norm_candidate, Rule("norm", norm_pieces, own_params))
register_rule(nn.Embedding, Rule("embedding", embedding_pieces, own_params))
register_rule(_is_conv1d, Rule("conv1d", conv1d_pieces, own_params))
register_rule(nn.Linear, Rule("linear", linear_pieces, own_params))
register_rule(_is_hf_experts, Rule("experts", experts_pieces, own_params))
register_rule(lambda m: type(m).__name__ == "ParametrizationList",  # its parameters are refused by name
              Rule("parametrization", generic_pieces, lambda m: []))
register_rule(nn.MultiheadAttention, Rule("generic", generic_pieces, all_params,
                                          lambda m: 0 if m.batch_first else 1, exact=True))
