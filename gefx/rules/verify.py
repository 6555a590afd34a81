"""The verification of module rules: each rule but the exact ones is checked against autograd of
the re-run module, per module and per conditions (``gefx.rules.state``), before it is trusted;
a rule that does not fit gives way to the generic rule. Stock modules need none."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

from .. import dist
from ..pieces import dense, merge
from ..precision import acc_dtype
from . import state
from .base import Refused, Rule, _cast, _copied, _outputs, recompute
from .generic import GENERIC
from .state import changed


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
    what = changed(call.conditions[0], state.module_state(m, tape.hook_ids))
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


def verdict_of(call, rule: Rule | None = None) -> Verdict | None:
    """The verdict made for the call's rule (by default the norm rule) under its conditions (None:
    none yet)."""
    return CHECKED.get(call.module, {}).get(("norm" if rule is None else rule.name, call.conditions))


def ready(tape, call) -> bool:
    """Whether the call's pieces can be formed inside autograd's backward, as its output gradient
    arrives (``gefx.collect.collect_each``): a built-in rule that forms them from the recorded tensors
    alone (no autograd of its own), with nothing left to verify on this module."""
    rule = tape.rules[call.module]
    if not rule.streams:
        return False
    if rule.exact or (call.conditions is None and stock(call.module, rule)):
        return True
    verdict = verdict_of(call, rule)
    return verdict is not None and verdict.exact


def stock(m: nn.Module, rule: Rule) -> bool:
    """A module of exactly the class its built-in rule is exact for (``Rule.stock``: nn.Linear,
    nn.Embedding without scale_grad_by_freq, sparse gradients or max_norm, transformers' Conv1D,
    running torch's own functional op; F.linear may be DeepSpeed ZeRO-3's replacement), running the
    class's own forward (none bound on the instance), with no parameters of its own but its weight
    and bias: the rule is then exact by construction (the gradient formulas of F.linear,
    F.embedding and addmm), so verifying it would only cost a re-run of the module with a backward
    (and, for a sharded one, gather the whole weight)."""
    if rule.stock is None or "forward" in vars(m) or {n for n, _ in m.named_parameters(recurse=False)} - {"weight", "bias"}:
        return False
    return rule.stock(m)


def _verify(tape, call, rule: Rule) -> Verdict:
    """Compare the rule's aggregated gradient for a random output gradient with autograd's
    through the re-run module, in the accumulation dtype."""
    m = call.module
    local = [loc for loc, _ in tape.owned[m]]
    first = m.get_parameter(local[0])
    dt = acc_dtype(first)
    leaves = {loc: dist.full(m.get_parameter(loc)).detach().to(dt).requires_grad_(True) for loc in local}
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
    exact = worst <= 1e-4
    return Verdict(exact, error=worst, **(rule.note(tape, call, outs, leaves) if exact and rule.note else {}))
