"""The generic rule: the module re-run on its recorded inputs (same random numbers, copies of its
buffers), checked to reproduce the recorded output, then per-sample vector-Jacobian products.
Exact by construction; the catch-all for modules no other rule claims, and what a rule that fails
its verification gives way to."""
from __future__ import annotations

import os
import warnings

import torch

from .. import dist
from ..dist import shape as full_shape
from ..pieces import PerSample
from ..precision import acc_dtype
from .base import _RULES, Refused, Rule, _outputs, own_params, recompute


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
    leaves = {loc: dist.full(p).detach().requires_grad_(True) for loc, p in params.items()}
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


GENERIC = Rule("generic", generic_pieces, own_params, exact=True)
_RULES.append((lambda m: True, GENERIC))  # the catch-all: matched last
