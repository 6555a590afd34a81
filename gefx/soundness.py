"""What gefx proves about a loss and the model before it contracts anything (docs/METHOD.md §6).

The per-sample gradient of a loss splits exactly into the pieces of the recorded calls iff

  (a) every counted parameter reaches the loss only through recorded calls whose rule covers it;
  (b) the recorded values are those the forward used; and
  (c) row k of every recorded output depends only on sample k, and loss entry k only on row k.

(a) *Coverage*, for every loss (:meth:`Graph.reach`): the autograd graph is walked from the loss.
Every use of a counted parameter (an autograd node consuming it) belongs to the innermost module
call whose forward created that node: autograd numbers nodes in creation order, and every hooked
call records the span of numbers its forward used. The rule of that call must cover the
parameter. The generic rule, and *hosts* (modules with counted parameters below them and none of
their own, recorded too), take in their submodules' parameters used directly in their forward
(``nn.MultiheadAttention.out_proj``, an SSM mixer's conv weight), unless a call nested in it uses
the same parameter (it would count twice). A use in the traced model's own forward, outside its
submodules (``F.linear(h, emb.weight)``), a parametrization or a compiled region gefx cannot see
into is refused by name. A module whose rows are not the samples (an expert loop over gathered
tokens, a norm over [B*T*heads, d] rows) is *lifted*: the innermost enclosing host or generic
module whose rows are answers for its parameters. Only the calls the uses belong to are probed
and contracted. The walk is a few milliseconds per loss (bench/RESULTS.md).

(b) Output gradients are taken at the autograd edges the outputs had when their module returned
them (``gefx.tape``), so a later in-place change (``ReLU(inplace=True)``) or a forward hook that
rewrites an output (gefx's hook runs first) acts downstream of them; an *input* changed in place
after its call is refused (``Call.check_unmodified``); rules are verified against autograd on the
first call of each module (``gefx.rules``).

(c) *The per-sample probe* (:func:`probe`): the loss's gradient at every reached recorded
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

import bisect
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dist
from .precision import acc_dtype
from .rules import CHECKED, GENERIC, Refused
from .streaming import stream

#: model -> structures (hashes) of loss graphs whose per-sample contract was probed in this process
PROBED: "weakref.WeakKeyDictionary[nn.Module, set[int]]" = weakref.WeakKeyDictionary()

_LEAK_ROUNDOFFS = 64


def forget() -> None:
    """Clear what gefx remembers between traces: probed graph structures and verified rules."""
    PROBED.clear()
    CHECKED.clear()


@dataclass
class Reach:
    """A loss proved covered, (a): the recorded calls whose forwards use the counted parameters it
    reaches (in tape order: only their output gradients are needed), the calls it reaches first
    (its heads), the structure of its graph, and the loss itself with the name errors give it."""

    calls: list
    heads: set = field(default_factory=set)
    signature: int = 0
    loss: torch.Tensor | None = field(default=None, repr=False)
    what: str = "the loss"

    def slots(self) -> list:
        """(call, output index, edge to differentiate at) for every output of the reached calls."""
        return [(c, k, e) for c in self.calls for k, e in enumerate(c.targets())]


def batch_dim(tape, call, x: torch.Tensor, samples: int) -> int:
    """The dimension of a recorded tensor that holds the samples: the rule's, else 0 when its size
    is the number of samples or the model forward's [samples, T] tokens flattened, else 1 when
    dimension 1 is (time-major models such as XLNet), else 0 (refused by sample_view). A wrong
    guess cannot pass the per-sample probe."""
    fixed = tape.rules[call.module].batch_dim
    if fixed is not None:
        return fixed(call.module)
    n = x.shape[0] if x.dim() else 0
    if n == samples or _grouped(call, n, samples):
        return 0
    return 1 if x.dim() > 1 and x.shape[1] == samples else 0


def _grouped(call, n: int, samples: int) -> bool:
    """n rows are the model forward's [samples, T] tokens flattened (OPT, MoE blocks); any other
    layout is lifted to an enclosing call (Attribution._lift) or refused."""
    return call.batch == samples and n == samples * call.length > 0


def sample_dim(tape, call, x: torch.Tensor, samples: int) -> int | None:
    """The dimension of x whose rows are the samples: one row per sample, or consecutive groups of
    rows per sample when the module sees the batch flattened ([B*T, H]) in a model forward of
    batch `samples`; None when x has no such dimension."""
    dim = batch_dim(tape, call, x, samples)
    n = x.shape[dim] if x.dim() > dim else None
    return dim if n == samples or (dim == 0 and _grouped(call, n, samples)) else None


def sample_view(tape, call, x: torch.Tensor, samples: int, what: str = "the loss") -> torch.Tensor:
    """x [.., rows on the batch dimension, ..] as [samples, -1] (see :func:`sample_dim`). Anything
    else is refused."""
    dim = sample_dim(tape, call, x, samples)
    if dim is not None:
        return (x.movedim(dim, 0) if dim else x).reshape(samples, -1)
    dim = batch_dim(tape, call, x, samples)
    n = x.shape[dim] if x.dim() > dim else None
    if call.batch and call.batch != samples:
        raise Refused(f"{what} has {samples} entries but the traced forward it depends on has batch size "
                      f"{call.batch} (module {call.name}); a per-sample loss needs one entry per batch row")
    shared = n is not None and n == call.length and x.dim() >= 1
    raise Refused(f"{call.name} ({type(call.module).__name__}) has an output of shape {tuple(x.shape)} where "
                  f"{what} has {samples} entries: "
                  + ("it has no batch dimension (one tensor shared by every sample, e.g. position "
                     "embeddings computed from the sequence length), so its gradient is the sum over the "
                     "samples and has no per-sample split; give the module per-sample inputs (e.g. "
                     "position_ids of shape [B, T]) or leave its parameters out of `params`" if shared else
                     "its rows are not the samples and no enclosing module's are (register a rule for "
                     "it, or the generic rule on the block around it: gefx.register_rule(cls, "
                     "gefx.rules.GENERIC, covers='all'))"),
                  [canon for _, canon in tape.owned.get(call.module, ())])


def per_row(tape, call, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample `values` [samples] laid out to broadcast against `like` (a recorded output or
    its gradient) along its samples' dimension (:func:`sample_dim`), one per row or per group of rows."""
    dim = sample_dim(tape, call, like, values.shape[0])
    if dim is None:
        raise ValueError(f"{call.name}: an output of shape {tuple(like.shape)} has no dimension of "
                         f"{values.shape[0]} samples")
    n = like.shape[dim]
    shape = [1] * like.dim()
    shape[dim] = n
    return values.repeat_interleave(n // values.shape[0]).view(shape)

def prove(tape, loss, what: str, per_sample: bool = True) -> Reach:
    """Stage 2's entry for one loss (docs/ARCHITECTURE.md): a finite floating-point tensor that
    depends on the trace (a per-sample vector [B] where `per_sample`), covered, (a). Returns its
    :class:`Reach`, what the later stages take; the per-sample probe, (c), runs inside the loss's
    own backward (:func:`probe`, called by ``gefx.collect``) or, online, before its pieces are used."""
    tape.check_open()
    check_loss(loss, what, per_sample)
    if not tape.calls:
        raise ValueError("nothing was recorded: run the model's forward inside the gefx.trace block")
    reach = tape.graph.reach(loss, what)
    if not reach.calls:
        raise ValueError(f"{what} does not depend on any forward traced by this gefx.trace "
                         "(or on none of its counted parameters)")
    return reach


def prove_all(tape, risks) -> dict:
    """Stage 2 for a measurement's risks (name -> per-sample vector): name -> its :class:`Reach`."""
    return {name: prove(tape, risk, f"risk {name!r}") for name, risk in risks.items()}


def check_loss(loss, what: str, per_sample: bool) -> torch.Tensor:
    """A loss gefx can differentiate: a floating tensor, finite, requiring grad; per sample a vector."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(loss).__name__}")
    if per_sample and loss.dim() != 1:
        raise ValueError(f"{what} must be a per-sample vector [B] (entry k depending only on batch "
                         f"row k), got a tensor of shape {tuple(loss.shape)}"
                         + ("; a scalar loss has no per-sample split" if loss.dim() == 0 else ""))
    if not per_sample and loss.dim() not in (0, 1):
        raise ValueError(f"{what} must be a scalar or a per-sample vector, got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {loss.dtype}")
    bad = ~torch.isfinite(loss.detach())
    if bad.any():
        kind = "NaN" if torch.isnan(loss.detach()).any() else "inf"
        where = bad.nonzero().flatten().tolist()[:8] if loss.dim() else []
        raise ValueError(f"{what} contains {kind}" + (f" at entries {where}" if where else ""))
    if not loss.requires_grad:
        raise ValueError(f"{what} does not depend on the traced forward (it does not require grad; "
                         "was it computed under torch.no_grad or from detached outputs?)")
    return loss


class Graph:
    """The coverage check of one trace, (a) of the module docstring: which recorded calls a loss
    reaches and that they account for every counted parameter it reaches."""

    def __init__(self, tape):
        self._tape = weakref.ref(tape)  # no reference cycle: a closed trace frees its graph at once
        self.attribution = Attribution(self._tape)

    @property
    def tape(self):
        return self._tape()

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
        heads: set = set()
        uses: dict = {}                  # parameter -> the nodes that consume it
        sig: list = []
        seen: set = set()
        todo = [(loss.grad_fn, True)]
        while todo:
            node, direct = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            sig.append(node.name())
            calls = stops.get(node)
            if calls:
                for call in calls:
                    if direct:
                        heads.add(call)
                direct = False
            for n, _ in node.next_functions:
                if n is None or n in seen:
                    continue
                var = getattr(n, "variable", None)
                if var is not None:  # an accumulator: a leaf's gradient ends here
                    name = tape.canonical(var)
                    if name is not None:
                        uses.setdefault(name, []).append(node)
                    continue
                todo.append((n, direct))
        problems, users = self.attribution.attribute(uses, loss.shape[0] if loss.dim() == 1 else None)
        for call in users:
            if not any(e.node in seen for e in call.targets()):
                for _, name in tape.owned.get(call.module, ()):
                    problems.append((name, f"`{name}` is used in the forward of `{call.name}`, but the loss reaches "
                                     "that use other than through the call's outputs (a side channel gefx "
                                     "cannot follow); measure without it or leave the parameter out of `params`"))
            call.check_unmodified()  # (b): the recorded inputs are what the forward used
        if problems:
            lines = [text for _, text in problems]
            raise Refused(f"{what}: gefx cannot account for every counted parameter it reaches:\n  - "
                          + "\n  - ".join(lines[:6]) + (f"\n  ... and {len(lines) - 6} more" if len(lines) > 6 else ""),
                          [name for name, _ in problems])
        order = {c: k for k, c in enumerate(tape.calls)}
        sig += sorted((order[c], id(c.module), c.module.training) for c in users)
        return Reach(sorted(users, key=order.__getitem__), heads, hash(tuple(sig)), loss, what)


class Attribution:
    """Which recorded call answers for each use of a counted parameter (an autograd node consuming
    it): the innermost call whose forward created the node, lifted to an enclosing one when its rows
    are not the samples."""

    def __init__(self, tape_ref):
        self._tape = tape_ref       # a weak reference (see Graph)
        self._spans = None          # the recorded calls' node-number spans
        self._lifted: dict = {}     # module whose rows are not samples -> the enclosing module answering for it

    @property
    def tape(self):
        return self._tape()

    def _innermost(self, seq: int):
        """The innermost recorded or host call whose forward created autograd node number `seq`."""
        tape = self.tape
        key = (len(tape.calls), len(tape.hosts))
        if self._spans is None or self._spans[0] != key:
            every = list({id(c): c for c in [*tape.calls, *tape.hosts]}.values())
            # by start, the outer of two calls with the same start first (equal spans: by entry order)
            spans = sorted(((c.span[0], c.span[1], c) for c in every), key=lambda x: (x[0], -x[1], x[2].span[2]))
            parent, stack = [], []
            for k, (a, b, _) in enumerate(spans):
                while stack and spans[stack[-1]][1] <= a:
                    stack.pop()
                parent.append(stack[-1] if stack else None)
                stack.append(k)
            self._spans = (key, spans, [a for a, _, _ in spans], parent)
        _, spans, starts, parent = self._spans
        k = bisect.bisect_right(starts, seq) - 1
        while k is not None and k >= 0:
            a, b, call = spans[k]
            if a <= seq < b:
                return call
            k = parent[k]
        return None

    def _per_sample(self, call, samples: int) -> bool:
        """Every output of the call has the loss's samples as rows (one or a group each)."""
        for o in call.outputs:
            d = batch_dim(self.tape, call, o, samples) if call.module in self.tape.rules else 0
            n = o.shape[d] if o.dim() > d else None
            if not (n == samples or (d == 0 and n is not None and _grouped(call, n, samples))):
                return False
        return True

    def _lift(self, call, samples: int | None):
        """The call that answers for `call`'s parameter uses: itself, or, when its module's rows
        are not the samples (an expert loop over gathered tokens, a norm over [B*T*heads, d] rows),
        the innermost enclosing call of the host or generic module found for it, whose rows are
        (its generic rule then covers the parameters; `call`'s module is left out, for every loss
        of the trace, so that no parameter is counted by both)."""
        tape = self.tape
        outer_module = self._lifted.get(call.module)
        if outer_module is None:
            if samples is None or samples < 2 or self._per_sample(call, samples):
                return call
            outer = [c for c in [*tape.calls, *tape.hosts] if c is not call and c.module is not tape.model
                     and c.span[0] <= call.span[0] and call.span[1] <= c.span[1] and c.span[2] < call.span[2]
                     and (c not in tape.calls or tape.rules[c.module].pieces is GENERIC.pieces)
                     and self._per_sample(c, samples)]
            if not outer:
                return call  # refused by sample_view, naming it
            outer_module = self._lifted[call.module] = max(outer, key=lambda c: c.span[2]).module
        enclosing = [c for c in [*tape.calls, *tape.hosts] if c.module is outer_module
                     and c.span[0] <= call.span[0] and call.span[1] <= c.span[1]]
        return enclosing[0] if enclosing else call

    def attribute(self, uses: dict, samples: int | None = None) -> tuple[list[tuple[str, str]], set]:
        """(parameter, problem) for every use of a counted parameter not accounted for, and the
        calls the uses belong to (only their output gradients are needed). Each use
        (an autograd node consuming the parameter) belongs to the innermost module call whose
        forward created it. A recorded call's rule must cover the parameter, except that the
        generic rule, and a *host* (a module without parameters of its own, e.g. an SSM mixer
        using its conv child's weight functionally), take in their submodules' parameters used
        directly in their forward, unless a call nested inside also uses it (it would count twice).
        A use in the traced model's own forward is refused."""
        tape = self.tape
        out, users = [], set()
        for name, nodes in uses.items():
            where: dict = {}
            for node in nodes:
                call = self._innermost(node._sequence_nr())
                where.setdefault(call if call is None else self._lift(call, samples), node)
            for call, node in where.items():
                host = call is not None and call not in tape.calls
                if call is None or (host and call.module is tape.model):
                    out.append((name, _loose_message(name, node)))
                    break
                m = call.module
                if name in {c for _, c in tape.owned.get(m, ())}:
                    tape.promote(call)  # a host whose module a use in another of its calls claimed
                    users.add(call)
                    continue
                local = next((n for n, p in m.named_parameters(remove_duplicate=False)
                              if tape.canonical(p) == name), None)
                nested = [c for c in where if c is not None and c is not call
                          and call.span[0] <= c.span[0] < call.span[1]]
                generic = host or tape.rules[m].pieces is GENERIC.pieces
                if generic and local is not None and not nested and "parametrizations." not in name:
                    tape.claim(call, local, name)
                    users.add(call)
                    continue
                rule = "none: it owns no parameter" if host else tape.rules[m].name
                fix = _PARAMETRIZATION if "parametrizations." in name else (
                    f"register a rule covering it (gefx.register_rule({type(m).__name__}, gefx.rules.GENERIC, "
                    "covers='all') uses the exact generic rule), or leave it out of `params`")
                out.append((name, f"`{name}` is used inside the forward of `{call.name}` ({type(m).__name__}), "
                                  f"whose rule ({rule}) does not account for it"
                                  + (" (the parameter of a submodule, used functionally)" if local else "")
                                  + (", and also inside a call nested in it, where it would count twice"
                                     if nested else "")
                                  + f": {fix}"))
                break
        return out, users


# -- (c) the per-sample probe ---------------------------------------------------------------------
def probe(tape, reach: Reach, grads: list | None = None, split=None) -> bool:
    """Check that entry i of the proved loss depends only on the rows of sample i of every
    reached recorded output. `grads` are the gradient of ``loss.sum()`` at each of
    ``reach.slots()`` (None: computed here). The check runs two backward passes, of the loss's entries
    on a random part S of the samples (:func:`partition`) and on the rest, whose gradients sum to
    the loss's: with `split` (and no `grads`), ``split(S)`` gives (visit_s, visit_rest), and each
    pass's gradient at slot j is also handed to ``visit(j, g)`` as it comes
    (``gefx.collect.collect_each`` uses them instead of a backward of its own). Returns whether the
    passes ran (not when the structure was probed before)."""
    loss, what, slots = reach.loss, reach.what, reach.slots()
    samples = loss.shape[0]
    done = PROBED.setdefault(tape.model, set())
    want = tape.check == "full" or reach.signature not in done
    if dist.group_size() > 1:
        # the backward passes below run FSDP's hooks (collectives): every rank probes or none
        want = bool(dist.all_reduce_sum(torch.tensor([float(want)], device=loss.device)) > 0)
    elif samples < 2 or not slots:
        return False
    if not want:
        return False
    s = partition(samples, loss.device)
    also = None if split is None else split(s)
    # per slot: the largest row norm of the S part's gradient on S's rows (own) and on the others
    # (leak), the same for the complement; seen as the gradients stream by, none of them kept
    own: list = [[None, None] for _ in slots]
    leak: list = [[None, None] for _ in slots]
    loose = [1.0] * len(slots)  # a complement formed by subtraction leaks its operands' roundoff

    def note(j, part, rows, g) -> None:
        r = sample_view(tape, slots[j][0], g, samples, what).to(acc_dtype(g))
        own[j][part], leak[j][part] = _largest_row(r[rows]), _largest_row(r[~rows])

    def visit_s(j, g) -> None:
        if g is not None:
            note(j, 0, s, g)
        if grads is not None and grads[j] is not None:  # the complement from the loss's gradient at hand
            note(j, 1, ~s, grads[j] if g is None else grads[j] - g)
            loose[j] = torch.finfo(grads[j].dtype).eps / torch.finfo(acc_dtype(grads[j])).eps
        if also is not None:
            also[0](j, g)

    def visit_rest(j, g) -> None:
        if g is not None:
            note(j, 1, ~s, g)
        if also is not None:
            also[1](j, g)

    stream((loss * s.to(loss.dtype)).sum(), slots, visit_s)
    if grads is None:
        stream((loss * (~s).to(loss.dtype)).sum(), slots, visit_rest)
    leaks = _leaks(slots, own, leak, loose)
    if leaks:
        raise Refused(_leak_message(what, leaks, reach.heads))
    done.add(reach.signature)
    return True


def partition(samples: int, device) -> torch.Tensor:
    """The probe's part S of the samples (bool [samples]): random, fixed by the sample count, both
    parts non-empty (one sample: only S)."""
    gen = torch.Generator(device="cpu").manual_seed(samples)
    s = torch.rand(samples, generator=gen) < 0.5
    s[0] = True
    s[-1] = samples < 2
    return s.to(device)


def _leaks(slots: list, own: list, leak: list, loose: list) -> list:
    """[(call, relative leak)] for the slots whose gradients reach rows of other samples by more
    than roundoff (one synchronisation for all slots)."""
    at = [j for j in range(len(slots)) if own[j] != [None, None]]
    if not at:
        return []
    zero = next(x for j in at for x in own[j] if x is not None) * 0
    table = torch.stack([torch.stack([zero if x is None else x.to(zero.dtype) for x in own[j] + leak[j]])
                         for j in at]).tolist()
    out = []
    for j, (own_s, own_c, leak_s, leak_c) in zip(at, table):
        scale = max(own_s, own_c, leak_s, leak_c / loose[j])
        amount = max(leak_s, leak_c / loose[j])
        wide = own[j][0] if own[j][0] is not None else own[j][1]
        if amount > _LEAK_ROUNDOFFS * torch.finfo(wide.dtype).eps * scale:
            out.append((slots[j][0], amount / max(scale, 1e-300)))
    return out


_PARAMETRIZATION = ("it belongs to a parametrization (torch.nn.utils.parametrize); remove it while measuring "
                    "(parametrize.remove_parametrizations) or leave the parameter out of `params`")


def _largest_row(x: torch.Tensor) -> torch.Tensor:
    if not x.shape[0]:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.linalg.vector_norm(x, dim=1).max()


def _loose_message(name: str, parent) -> str:
    how = parent.name()
    if "parametrizations." in name:
        fix = _PARAMETRIZATION
    elif "CompiledFunction" in how:
        fix = ("it is used inside a torch.compile'd region, which gefx cannot look into; measure the "
               "uncompiled module (e.g. the `_orig_mod` of the compiled one)")
    else:
        fix = ("it is used in the traced model's own forward, outside its submodules' calls (e.g. "
               "F.linear(h, emb.weight)); call the module that owns it (for a tied head, an nn.Linear "
               "whose weight is the embedding's), move the use into a submodule, or leave it out of `params`")
    return f"`{name}` reaches the loss through {how} where no recorded call accounts for it: {fix}"


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
