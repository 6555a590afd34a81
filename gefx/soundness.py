"""What gefx proves about a loss and the model before it contracts anything (docs/METHOD.md §6).

The per-sample gradient of a loss splits exactly into the pieces of the recorded calls iff

  (a) every counted parameter reaches the loss only through recorded calls whose rule covers it;
  (b) the recorded values are those the forward used; and
  (c) row k of every recorded output depends only on sample k, and loss entry k only on row k.

(a) *Coverage*, for every loss (:meth:`Graph.reach`): the autograd graph is walked from the loss.
A recorded output's node opens the *region* of its call, which ends at the call's inputs and at
other calls' outputs (nested or upstream calls, walked as regions of their own). A counted
parameter whose gradient accumulator lies inside a region must be covered by that call's rule (the
generic rule takes in the parameters of submodules its module uses functionally, e.g.
``nn.MultiheadAttention.out_proj``); one found outside every region reaches the loss where no rule
sees it (a functional use in another module's forward, a parametrization, a compiled region) and
is refused by name. Each region is walked once per trace, the rest once per loss.

(b) Output gradients are taken at the autograd edges the outputs had when their module returned
them (``gefx.tape``), so a later in-place change (``ReLU(inplace=True)``) or a forward hook that
rewrites an output (gefx's hook runs first) acts downstream of them; an *input* changed in place
after its call is refused (``Call.check_unmodified``); rules are verified against autograd on the
first call of each module (``gefx.rules``).

(c) *The per-sample probe* (:meth:`Graph.probe`): the loss's gradient at every reached recorded
output is split by a random partition S of the samples, d(sum_{i in S} l_i)/dY and its complement.
If the contract holds, rows of samples outside S receive exactly nothing from the first and rows of
samples in S nothing from the second; any leak larger than 64 roundoffs of the largest row is
refused, naming where it shows (the loss itself or the model: batch statistics, batch means).
Cost: one partial backward per probed loss (two in online mode), run the first time a loss's graph
has a given *structure* (the node types of the walk, the recorded modules and their training
flags) for a model in this process (:data:`PROBED`), or on every loss with
``gefx.trace(..., check="full")``. A mixing that depends on values only, not on the graph's
structure, is caught only by "full".
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .rules import CHECKED, GENERIC, Refused

#: model -> structures (hashes) of loss graphs whose per-sample contract was probed in this process
PROBED: "weakref.WeakKeyDictionary[nn.Module, set[int]]" = weakref.WeakKeyDictionary()

_LEAK_ROUNDOFFS = 64


def forget() -> None:
    """Clear what gefx remembers between traces: probed graph structures and verified rules."""
    PROBED.clear()
    CHECKED.clear()


@dataclass
class Region:
    params: set[str]                 # counted parameters whose accumulator lies in the region
    exits: list                      # nodes where it ends: the call's inputs, other calls' outputs
    signature: int


@dataclass
class Reach:
    """The recorded calls a loss reaches (in tape order), the ones it reaches first (its heads)
    and the structure of its graph."""

    calls: list
    heads: set = field(default_factory=set)
    signature: int = 0

    def slots(self) -> list:
        """(call, output index, edge to differentiate at) for every output of the reached calls."""
        return [(c, k, e) for c in self.calls for k, e in enumerate(c.targets())]


def sample_view(tape, call, x: torch.Tensor, samples: int, what: str = "the loss") -> torch.Tensor:
    """x [.., rows on the module's batch dimension, ..] as [samples, -1]: one row per sample, or
    consecutive groups of rows per sample when the module sees the batch flattened ([B*T, H]) in
    a model forward of batch `samples`. Anything else is refused."""
    dim = tape.rules[call.module].batch_dim(call.module)
    n = x.shape[dim] if x.dim() > dim else None
    if n == samples or (dim == 0 and n and n % samples == 0 and call.batch == samples):
        return (x.movedim(dim, 0) if dim else x).reshape(samples, -1)
    if call.batch and call.batch != samples:
        raise Refused(f"{what} has {samples} entries but the traced forward it depends on has batch size "
                      f"{call.batch} (module {call.name}); a per-sample loss needs one entry per batch row")
    raise Refused(f"{call.name} ({type(call.module).__name__}) sees {n if n is not None else 'no'} rows on its "
                  f"batch dimension ({dim}) where {what} has {samples} entries: its rows are not the "
                  "samples (a module that gathers tokens across the batch, e.g. an expert loop, needs a "
                  "rule of its own or the generic rule on the block around it: "
                  "gefx.register_rule(cls, gefx.rules.GENERIC, covers='all'))",
                  [canon for _, canon in tape.owned[call.module]])


def per_row(tape, call, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample `values` [samples] laid out to broadcast against `like` (a recorded output or
    its gradient) along the module's batch dimension, one per row or per group of rows."""
    dim = tape.rules[call.module].batch_dim(call.module)
    n = like.shape[dim]
    shape = [1] * like.dim()
    shape[dim] = n
    return values.repeat_interleave(n // values.shape[0]).view(shape)


class Graph:
    """The soundness checks of one trace (see the module docstring)."""

    def __init__(self, tape):
        self.tape = tape
        self._regions: dict = {}    # call -> Region

    def _stop_nodes(self) -> dict:
        stops: dict = {}
        for call in self.tape.calls:
            for edge in call.targets():
                stops.setdefault(edge.node, []).append(call)
        return stops

    # -- (a) coverage -----------------------------------------------------------------------------
    def reach(self, loss: torch.Tensor, what: str) -> Reach:
        """Walk the loss's graph; raise :class:`Refused` for any counted parameter it reaches
        where no recorded call's rule accounts for it. Returns the calls it reaches."""
        tape, stops = self.tape, self._stop_nodes()
        reached: dict = {}
        heads: set = set()
        loose: dict[str, str] = {}       # parameter -> the node it was reached from
        sig: list = []
        seen: set = set()
        todo = [(loss.grad_fn, None, True)]
        while todo:
            node, parent, direct = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            calls = stops.get(node)
            if calls:
                for call in calls:
                    if direct:
                        heads.add(call)
                    if call not in reached:
                        region = reached[call] = self._region(call, stops)
                        sig.append((id(call.module), call.module.training, region.signature))
                        todo.extend((n, None, False) for n in region.exits)
                continue
            sig.append(node.name())
            var = getattr(node, "variable", None)
            if var is not None:
                name = tape.names.get(id(var))
                if name is not None:
                    loose.setdefault(name, parent)
                continue
            todo.extend((n, node, direct) for n, _ in node.next_functions if n is not None)
        problems = [(name, _loose_message(name, parent)) for name, parent in loose.items()]
        for call, region in reached.items():
            call.check_unmodified()  # (b): the recorded inputs are what the forward used
            problems += self._uncovered(call, region, reached)
        if problems:
            lines = [text for _, text in problems]
            raise Refused(f"{what}: gefx cannot account for every counted parameter it reaches:\n  - "
                          + "\n  - ".join(lines[:6]) + (f"\n  ... and {len(lines) - 6} more" if len(lines) > 6 else ""),
                          [name for name, _ in problems])
        order = {c: k for k, c in enumerate(tape.calls)}
        return Reach(sorted(reached, key=order.__getitem__), heads, hash(tuple(sig)))

    def _region(self, call, stops) -> Region:
        region = self._regions.get(call)
        if region is not None:
            return region
        starts = {e.node for e in call.targets()}
        params, exits, sig, seen = set(), [], [], set()
        todo = list(starts)
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in call.input_nodes or (node in stops and node not in starts):
                exits.append(node)
                continue
            sig.append(node.name())
            var = getattr(node, "variable", None)
            if var is not None:
                name = self.tape.names.get(id(var))
                if name is not None:
                    params.add(name)
                continue
            todo.extend(n for n, _ in node.next_functions if n is not None)
        region = self._regions[call] = Region(params, exits, hash(tuple(sig)))
        return region

    def _uncovered(self, call, region: Region, reached: dict) -> list[tuple[str, str]]:
        """(parameter, problem) for the parameters used inside a call's region but not covered by its rule;
        the generic rule takes in those of its module's submodules that no nested recorded call
        covers (set on ``call.extra``)."""
        tape, m = self.tape, call.module
        covered = {canon for _, canon in tape.owned[m]} | {canon for _, canon in call.extra}
        missing = region.params - covered
        if not missing:
            return []
        rule = tape.rules[m]
        local = {tape.names[id(p)]: n for n, p in m.named_parameters(remove_duplicate=False) if id(p) in tape.names}
        exits = set(region.exits)
        nested = {canon for c in reached if c is not call and any(e.node in exits for e in c.targets())
                  for _, canon in tape.owned[c.module]}
        out = []
        for canon in sorted(missing):
            if rule.pieces is GENERIC.pieces and canon in local and canon not in nested:
                call.extra.append((local[canon], canon))
                continue
            fix = _PARAMETRIZATION if "parametrizations." in canon else (
                f"register a rule covering it (gefx.register_rule({type(m).__name__}, gefx.rules.GENERIC, "
                "covers='all') uses the exact generic rule), or leave it out of `params`")
            out.append((canon, f"`{canon}` is used inside the forward of `{call.name}` ({type(m).__name__}), "
                        f"whose rule ({rule.name}) does not account for it"
                        + (" (the parameter of a submodule used functionally)" if canon in local else "")
                        + f": {fix}"))
        return out

    # -- (c) the per-sample probe -----------------------------------------------------------------
    def probe(self, loss: torch.Tensor, reach: Reach, slots: list, grads: list | None, what: str) -> None:
        """Check that loss entry i depends only on the rows of sample i of every reached recorded
        output. `slots` are ``reach.slots()`` and `grads` the gradient of ``loss.sum()`` at each
        output (None: computed here)."""
        samples = loss.shape[0]
        if samples < 2 or not slots:
            return
        done = PROBED.setdefault(self.tape.model, set())
        if self.tape.check == "auto" and reach.signature in done:
            return
        gen = torch.Generator(device="cpu").manual_seed(samples)
        s = torch.rand(samples, generator=gen) < 0.5
        s[0], s[-1] = True, False  # both parts non-empty
        s = s.to(loss.device)
        targets = [e for *_, e in slots]

        def grad(weights):
            got = torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), targets, retain_graph=True,
                                      allow_unused=True)
            return [c.as_output(k, g) for (c, k, _), g in zip(slots, got)]

        g_s = grad(s)
        if grads is None:
            g_c = grad(~s)
        else:
            g_c = [None if g is None else (g if a is None else g - a) for g, a in zip(grads, g_s)]
        leaks = []
        for (call, *_), a, b in zip(slots, g_s, g_c):
            if a is None and b is None:
                continue
            like = a if a is not None else b
            wide = torch.float64 if like.dtype == torch.float64 else torch.float32
            ra = None if a is None else sample_view(self.tape, call, a, samples, what).to(wide)
            rb = None if b is None else sample_view(self.tape, call, b, samples, what).to(wide)
            full = ra if rb is None else (rb if ra is None else ra + rb)
            scale = float(torch.linalg.vector_norm(full, dim=1).max())
            leak = 0.0
            if ra is not None:
                leak = float(torch.linalg.vector_norm(ra[~s], dim=1).max())
            if rb is not None:
                tol_b = torch.finfo(like.dtype).eps / torch.finfo(wide).eps if grads is not None else 1.0
                leak = max(leak, float(torch.linalg.vector_norm(rb[s], dim=1).max()) / tol_b)
            if leak > _LEAK_ROUNDOFFS * torch.finfo(wide).eps * scale:
                leaks.append((call, leak / max(scale, 1e-300)))
        if leaks:
            raise Refused(_leak_message(what, leaks, reach.heads))
        done.add(reach.signature)


_PARAMETRIZATION = ("it belongs to a parametrization (torch.nn.utils.parametrize); remove it while measuring "
                    "(parametrize.remove_parametrizations) or leave the parameter out of `params`")


def _loose_message(name: str, parent) -> str:
    how = "" if parent is None else parent.name()
    if "parametrizations." in name:
        fix = _PARAMETRIZATION
    elif "CompiledFunction" in how:
        fix = ("it is used inside a torch.compile'd region, which gefx cannot look into; measure the "
               "uncompiled module (e.g. the `_orig_mod` of the compiled one)")
    else:
        fix = ("it is used outside the forward of any module gefx records (e.g. F.linear(h, emb.weight) "
               "in another module's forward); call the module that owns it (for a tied head, an "
               "nn.Linear whose weight is the embedding's), register a rule for the module whose "
               "forward uses it (gefx.register_rule(cls, rule, covers='all')), or leave it out of `params`")
    return f"`{name}` reaches the loss" + (f" through {how}" if how else "") + f" where no recorded call accounts for it: {fix}"


def _leak_message(what: str, leaks: list, heads: set) -> str:
    call, amount = leaks[-1]  # the most downstream recorded output with a leak
    if call in heads:
        return (f"{what} is not per-sample: its entry i depends on rows of other samples at the output of "
                f"`{call.name}` (relative size {amount:.2g}), in the loss or in the model after that module. "
                "Give a vector whose entry i depends only on batch row i (e.g. gefx.losses.sequence_nll), "
                "or pass its sum as a scalar where a scalar is accepted")
    return (f"the model mixes batch rows: the gradient of {what}'s entries reaches rows of other samples "
            f"at the output of `{call.name}` (relative size {amount:.2g}), so per-sample gradients are not "
            "defined by rows (batch statistics such as BatchNorm in train mode, a mean over the batch, "
            "attention across samples). Measure in eval mode or remove the mixing")
