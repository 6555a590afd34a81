"""Stage 3 of a measurement, *pieces* (docs/ARCHITECTURE.md): a loss's gradient at the recorded
layer outputs, turned by each module's rule (``gefx.rules``) into per-parameter, per-sample gradient
pieces (``gefx.pieces``), after the loss's graph has been proved sound (``gefx.soundness``).

``collect`` takes them from one ``torch.autograd.grad`` call on the recorded layer outputs: no
weight-gradient GEMM runs and ``.grad`` is untouched. ``collect_each`` does the same for a
per-sample loss but hands each parameter's pieces on while the loss's backward runs
(``gefx.streaming``), so that a layer's output gradients are dropped once used: what g_effect uses
for its risks. ``pieces_from`` makes pieces from output gradients at hand (the step's own, online).

Memory: besides the recorded activations, one output gradient per recorded output (the same as a
backward keeps); with ``collect_each`` a layer's at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.utils._pytree import tree_map

from . import dist, soundness
from .pieces import Piece, merge, restricted
from .rules import Refused, checked_rule, ready
from .soundness import Reach, batch_dim, sample_view
from .streaming import stream
from .tape import Tape


@dataclass
class Grads:
    """Per-sample gradients of one loss, as pieces per canonical parameter name."""

    pieces: dict[str, list[Piece]]
    batch: int


def probed(tape: Tape, reach: Reach) -> Reach:
    """The per-sample probe of a proved loss, without keeping its gradients (the online mode's
    check of a loss whose gradients come from the step's backward)."""
    with dist.engine_hooks_off(tape):
        soundness.probe(tape, reach)
    return reach


def collect(tape: Tape, loss: torch.Tensor, *, per_sample: bool, what: str = "loss", probe: bool = True) -> Grads:
    """Gradient pieces of `loss` for every counted parameter. A per-sample loss keeps its batch;
    otherwise the loss is summed and read as one sample (the aggregated gradient). The loss is
    proved first (``gefx.soundness.prove``), and a per-sample loss probed (unless `probe` is
    False: already probed)."""
    reach = soundness.prove(tape, loss, what, per_sample)
    with dist.engine_hooks_off(tape):
        return _collect(tape, reach, per_sample, probe)


def _collect(tape: Tape, reach: Reach, per_sample: bool, probe: bool) -> Grads:
    loss, what, slots = reach.loss, reach.what, reach.slots()
    try:
        got = torch.autograd.grad(loss.sum(), [e for *_, e in slots], retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        raise RuntimeError(f"could not differentiate {what} through the traced forward: {exc} "
                           "(was its graph freed by a backward without retain_graph=True?)") from exc
    got = [c.as_output(k, g) for (c, k, _), g in zip(slots, got)]
    if per_sample and probe:
        soundness.probe(tape, reach, got)
    at = {(id(c), k): g for (c, k, _), g in zip(slots, got)}
    grads = [at.get((id(c), k)) for c in tape.calls for k in range(len(c.edges))]
    return pieces_from(tape, reach, grads, per_sample=per_sample)


def pieces_from(tape: Tape, reach: Reach, grads, *, per_sample: bool) -> Grads:
    """Gradient pieces of the proved loss from its output gradients `grads` (one entry, or None
    where the loss does not reach, per recorded output edge in tape order), for the calls whose
    forwards use the counted parameters it reaches (``Reach.calls``)."""
    samples, what = reach.loss.shape[0] if per_sample else 1, reach.what
    pieces: dict[str, list[Piece]] = {}
    users = set(reach.calls)
    k = 0
    for call in tape.calls:
        gs = grads[k:k + len(call.edges)]
        k += len(call.edges)
        if call in users:
            for name, piece in _call_pieces(tape, call, gs, samples if per_sample else None, what):
                pieces.setdefault(name, []).extend(piece)
    return Grads({n: merge(ps) for n, ps in pieces.items()}, samples)


def _call_pieces(tape: Tape, call, gs: list, samples: int | None, what: str) -> list[tuple[str, list[Piece]]]:
    """[(canonical name, pieces)] of one recorded call from the gradients at its outputs (None
    where the loss does not reach); `samples` None: the loss is summed (one sample)."""
    if all(g is None for g in gs):
        return []
    if samples is not None:
        for g in gs:
            if g is not None:
                sample_view(tape, call, g, samples, what)  # the rows are the loss's samples, or refused
    call.check_unmodified()
    first = next(g for g in gs if g is not None)
    view = replace(call, samples=samples or 1,
                   batch_dim=batch_dim(tape, call, first, samples) if samples is not None else 0)
    if call.broadcast:  # its inputs are shared by all rows too: expand them like the output
        b = call.outputs[0].shape[0]
        expand = lambda x: x.expand(b, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1 else x  # noqa: E731
        view = replace(view, args=tree_map(expand, call.args), kwargs=tree_map(expand, call.kwargs))
    owned = dict(tape.owned[call.module])
    try:
        rule = checked_rule(tape, view)
        gs = _direct(call, gs)
        gs = [torch.zeros_like(o) if g is None else g for o, g in zip(call.outputs, gs)]
        got = rule.pieces(tape, view, gs)
    except Refused as exc:
        exc.names = exc.names or list(owned.values())
        raise
    return [(owned[local], piece if isinstance(piece, list) else [piece])
            for local, piece in got.items() if local in owned]


def collect_each(tape: Tape, reach: Reach, take, *, probe: bool = True) -> int:
    """``collect(tape, loss, per_sample=True)`` for the proved per-sample loss of `reach`, handed
    over parameter by parameter: ``take(name, pieces)`` for every counted parameter the loss
    reaches, as soon as its pieces are complete (once, or twice on the loss's first use: then each
    call gives a part of the samples, zeros for the others, and `take` must add up what it makes of
    them), while the loss's backward is still running (``gefx.streaming``): the output gradients of
    a layer are dropped once its parameters are taken, so no set of them for the whole model is
    ever alive. Calls whose rule needs more than its own output gradient (verification on first
    use, autograd inside the rule, several outputs) are kept and handled after the backward.
    Returns the number of samples."""
    tape.check_open()
    loss, what = reach.loss, reach.what
    with dist.engine_hooks_off(tape):
        for call in reach.calls:  # verified before the backward (once per module), so that it streams
            checked_rule(tape, call)
        # on first use the per-sample probe's two passes (the loss's entries on a part of the
        # samples, then on the rest) are the backward: pieces are linear in the output gradients,
        # and each sample's come whole from one pass, zeros from the other
        feeds: list = []

        def split(part):  # each probe pass brings the pieces of its own part of the samples
            feeds.extend(_Feed(tape, reach.calls, loss.shape[0], what, take, rows) for rows in (part, ~part))
            return feeds[0].arrived, feeds[1].arrived
        try:
            if not (probe and soundness.probe(tape, reach, split=split)):
                feeds = [_Feed(tape, reach.calls, loss.shape[0], what, take)]
                stream(loss.sum(), reach.slots(), feeds[0].arrived)
        except RuntimeError as exc:
            if "backward through the graph a second time" not in str(exc) and "freed" not in str(exc):
                raise
            raise RuntimeError(f"could not differentiate {what} through the traced forward: {exc} "
                               "(was its graph freed by a backward without retain_graph=True?)") from exc
        for feed in feeds:
            feed.finish()
    return loss.shape[0]


def follow(tape: Tape, reach: Reach, take) -> "_Feed":
    """A feed for the proved per-sample loss's gradients at its recorded outputs as another
    backward brings them (the step's, rescaled: ``gefx.step.Serving.serve``): ``feed.arrived_at(call, k,
    g)`` for each, ``take(name, pieces)`` for each parameter as soon as its pieces are complete,
    ``feed.close()`` once that backward is over (returns the number of samples). The per-sample
    probe (``probed``) is the caller's, before what the feed gives is used."""
    tape.check_open()
    for call in reach.calls:  # verified now, so that the pieces can be formed inside the backward
        checked_rule(tape, call)
    return _Feed(tape, reach.calls, reach.loss.shape[0], reach.what, take)


# -- the feeds of a measurement's risks: feed(take) calls take(name, pieces) per parameter, returns B --
def streamed(tape: Tape, proofs: dict) -> dict:
    """name -> feed of each proved per-sample loss's pieces, streamed out of its own backward when
    its turn comes (:func:`collect_each`: no set of output gradients for the whole model is held)."""
    return {name: partial(collect_each, tape, reach) for name, reach in proofs.items()}


def after_step(tape: Tape, serving, proofs: dict, live: dict) -> dict:
    """name -> feed of each proved risk's pieces after the step's backward (`serving`:
    ``gefx.step.Serving``), the risks the step served first (their gradients are then released
    before the others run): a risk served live has had its products made during the backward
    (`live`: name -> its feed, which only closes), a risk served from captured gradients makes its
    pieces from them, the others stream out of their own backward. A served risk is probed here,
    before its products are reported."""
    def feed(name: str, reach: Reach, take) -> int:
        if not serving.reused(name):
            serving.forgo(name)
            return collect_each(tape, reach, take)
        probed(tape, reach)
        if name in live:
            return live[name].close()
        return held(tape, pieces_from(tape, reach, serving.risk_grads(name), per_sample=True))(take)

    order = sorted(proofs, key=lambda name: not serving.reused(name))
    return {name: partial(feed, name, proofs[name]) for name in order}


def held(tape: Tape, g: Grads):
    """The feed of pieces at hand, in tape order."""
    def feed(take) -> int:
        for n in tape.params:
            if g.pieces.get(n):
                take(n, g.pieces[n])
        return g.batch
    return feed


class _Feed:
    """Gradients arriving slot by slot (in ``Reach.slots()`` order) turned into each call's pieces
    when the call's outputs are all in, and handed to `take` parameter by parameter when every call
    using the parameter is done."""

    def __init__(self, tape: Tape, calls: list, samples: int, what: str, take, rows=None):
        self.tape, self.samples, self.what, self.take = tape, samples, what, take
        self.rows = rows  # a probe pass's samples (bool [samples]): pieces restricted to them, handed on with them
        self.at = [(c, k) for c in calls for k in range(len(c.edges))]
        self.index = {(id(c), k): j for j, (c, k) in enumerate(self.at)}
        self.seen: set = set()
        self.gs = {c: [None] * len(c.edges) for c in calls}
        self.left = {c: len(c.edges) for c in calls}
        self.users = {}  # canonical name -> calls still to come
        for c in calls:
            for _, name in tape.owned[c.module]:
                self.users[name] = self.users.get(name, 0) + 1
        self.order = {c: i for i, c in enumerate(calls)}
        self.pieces: dict[str, list] = {}  # name -> [(call's position, its pieces)]
        self.later: list = []  # calls handled after the backward

    def arrived(self, j: int, g) -> None:
        if j in self.seen:
            return
        self.seen.add(j)
        call, k = self.at[j]
        self.gs[call][k] = g
        self.left[call] -= 1
        if self.left[call] == 0:
            if len(call.edges) == 1 and ready(self.tape, call):
                self._done(call)
            else:
                self.later.append(call)

    def arrived_at(self, call, k: int, g) -> None:
        """Output k of `call` (ignored if not one of the fed calls')."""
        j = self.index.get((id(call), k))
        if j is not None:
            self.arrived(j, g)

    def close(self) -> int:
        """The backward is over: the slots it did not reach count zero; the calls left are done."""
        for j in range(len(self.at)):
            self.arrived(j, None)
        self.finish()
        return self.samples

    def finish(self) -> None:
        later = set(self.later)
        for call in self.tape.calls:  # tape order
            if call in later:
                self._done(call)
        self.later = []

    def _done(self, call) -> None:
        gs, self.gs[call] = self.gs[call], None
        for name, piece in _call_pieces(self.tape, call, gs, self.samples, self.what):
            self.pieces.setdefault(name, []).append((self.order[call], piece))
        for _, name in self.tape.owned[call.module]:
            self.users[name] -= 1
            if self.users[name] == 0 and name in self.pieces:  # merged in tape order, as collect does
                merged = merge([p for _, ps in sorted(self.pieces.pop(name), key=lambda x: x[0]) for p in ps])
                if self.rows is None:
                    self.take(name, merged)
                else:
                    self.take(name, [restricted(p, self.rows) for p in merged], self.rows)


def _downstream(call) -> list[list[int]]:
    """For each output j of a call, the outputs computed from it inside the call (e.g. a router's
    scores from its logits); walked once per call."""
    memo = call.memo.get("downstream")
    if memo is None:
        nodes = [e.node for e in call.targets()]
        memo = []
        for j in range(len(nodes)):
            memo.append([k for k in range(len(nodes)) if k != j and nodes[j] in _upstream_of(nodes[k], call)])
        call.memo["downstream"] = memo
    return memo


def _upstream_of(node, call) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n in call.input_nodes:
            continue
        seen.add(n)
        todo.extend(m for m, _ in n.next_functions if m is not None)
    return seen


def _direct(call, gs: list) -> list:
    """Output gradients as rules read them: the loss's gradient through each output's own uses.
    Autograd's gradient at an output also holds what reaches it through the call's other outputs
    computed from it; that part is taken out (downstream outputs first), or a rule would count
    it twice."""
    if len(gs) < 2:
        return gs
    down = _downstream(call)
    if not any(down):
        return gs
    targets = call.targets()
    if any(t is not e for t, e in zip(targets, call.edges)):
        raise Refused(f"{call.name}: an output computed from another of its outputs was changed in place "
                      "after the forward; gefx cannot separate their gradients")
    done, out = set(), list(gs)
    while len(done) < len(gs):
        for j in range(len(gs)):
            if j in done or any(k not in done for k in down[j]):
                continue
            users = [k for k in down[j] if out[k] is not None]
            if out[j] is not None and users:
                (via,) = torch.autograd.grad([targets[k] for k in users], [targets[j]],
                                             [out[k] for k in users], retain_graph=True, allow_unused=True)
                if via is not None:
                    out[j] = out[j] - via
            done.add(j)
    return out
