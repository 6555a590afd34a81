"""The G-effect (Wang et al., ICLR 2025): e = grad R(D)^T grad L, per instance, per group, in total.

For an objective L (what the unlearning step minimises) and a risk R given as a per-sample vector
r (R = sum_i r_i):

    per_instance[i]            = <grad r_i, grad L>            one entry per risk instance
    per_objective_instance[s]  = <grad R, grad l_s>            one entry per objective term
                                 (the paper's PG-effect), when L is given as a vector l
    per_group[g]               = <grad_g R, grad_g L>          restricted to the group's parameters
    total                      = <grad R, grad L> = sum(per_instance) = sum(per_group)

Reading (docs/METHOD.md §1): one SGD step theta -= lr * grad L changes R by about -lr * e, so a
negative unlearning G-effect (risk = NLL on the forget data) means removal, a negative retaining
G-effect means damage. No learning rate, sign or normalisation is applied.

The aggregate risk is the *sum* of the risk vector. With ``gefx.losses.sequence_nll`` that is the
summed per-sequence mean NLL; the paper's mean risk over B instances is r / B, whose G-effects are
these divided by B (``gefx.losses.token_mean_nll`` gives the reference code's token-mean risk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from . import dist, shards
from .collect import after_step, collect, held, pieces_from, probed, streamed
from .effects import GEffect, reported
from .products import Against, ByMarginals, against, aggregated, contracted, dense_gradients
from .soundness import check_loss, prove, prove_all
from .step import Serving, StepBackward, _all_zero, _walk
from .tape import Tape
from .update import updates, updates_as_they_come


def g_effect(tape: Tape, objective, risks: Mapping[str, torch.Tensor], *, groups="block", process_group=None,
             backward: bool = False, optimizer=None, direction: Mapping | None = None,
             norms: bool = False, objective_instances: bool = False) -> GEffect:
    """G-effects of `objective` on each risk in `risks`.

    Args:
        tape: an open :func:`gefx.trace` that recorded the forwards the losses come from.
        objective: the unlearning objective being minimised, as a scalar, or as a per-sample
            vector whose sum is the objective (per-objective-instance effects with
            `objective_instances`),
            or its gradient as a mapping {parameter or name: tensor} ("online mode": e.g. the
            training step's own ``{n: p.grad}`` after ``loss.backward(retain_graph=True)``;
            parameters missing from it count zero; under DDP ``p.grad`` is the ranks' mean).
        risks: name -> per-sample risk vector [B] (entry k depends only on batch row k of one
            traced forward), e.g. ``{"forget": sequence_nll(logits_f, labels_f),
            "retain": sequence_nll(logits_r, labels_r)}``. The risk is the vector's sum.
        groups: a preset of ``gefx.groups`` ("block" by default) or a callable name -> group.
        process_group: under torch.distributed with more than one process (DDP, FSDP2, DeepSpeed ZeRO), the
            group whose ranks each traced their own micro-batch (default: the world). The
            objective is then the sum of the ranks' objectives and each risk the ranks' vectors
            concatenated in rank order; every rank gets the same result, equal to one process
            running the concatenated batch (see ``gefx.dist``). Every rank must call g_effect
            with the same risk names.
        backward: also run the training step's backward of `objective` (a tensor), exactly
            ``objective.sum().backward()`` as far as ``.grad`` is concerned (accumulated onto
            gradients already there), and reuse it: ``.grad`` serves as the objective's
            gradient (the online mode, in the parameters' dtype; under DDP the ranks' mean) and
            the step's own layer-output gradients serve as the objective's per-sample pieces
            and, where they are a per-sample multiple of a risk's (GA, NPO, GradDiff terms; see
            ``gefx.step``), as that risk's, which then needs no backward at all. The graph is
            kept (``retain_graph=True``) until the caller drops its tensors. Mid gradient
            accumulation (a nonzero ``.grad`` before the step, one process, no sharded
            parameter) the G-effects are measured as without `backward` (against the
            objective's gradient formed from its pieces, in float32 or better) and then the plain
            ``objective.sum().backward()`` accumulates in place, so that no second set of
            gradients is formed.
        optimizer: the optimizer whose next ``step()`` will apply this gradient: each risk's
            ``predicted_change`` is then <grad r_i, delta_theta> for exactly the change that step
            makes (``gefx.update``: SGD, Adam, AdamW in closed form from their state, others by
            stepping a throw-away copy; the optimizer and the parameters are untouched). With
            ``backward=True`` the update follows from ``.grad`` after the step's backward (mid-accumulation
            as without, to the rounding of the sum); without,
            from ``.grad`` (earlier micro-batches) plus the objective's gradient, as the caller's
            ``objective.sum().backward()`` will leave it (single process only: under
            torch.distributed use ``backward=True``).
        direction: instead of `optimizer`, any direction {parameter or name: tensor}: each risk's
            ``predicted_change`` is <grad r_i, direction> (missing parameters count zero).
        norms: also give ||grad r_i||, ||grad L|| and their cosines per group (``risk_norm``,
            ``objective_norm``, ``cosine``: see ``gefx.effects``), from the same pieces (no
            extra backward, but a per-sample self product per risk and layer: about 13% more
            time for an online measurement of a 10M Llama at B = 16, T = 128, hence opt-in).
        objective_instances: with a per-sample objective vector, also give each risk's
            ``per_objective_instance`` (the paper's PG-effect <grad R, grad l_s>). Opt-in: it
            costs the risk's aggregated gradient (one GEMM per parameter, formed and dropped one
            parameter at a time) or a ghost product per layer, and, online, keeps the step's
            output gradients for the objective's pieces.

    Every product is exact (no per-sample gradient of a matrix parameter is formed), in float32
    or better (with ``backward=True``, against ``.grad`` in its dtype). Unless `backward` is set,
    ``.grad`` is untouched and the graph is kept for the caller's own backward; on an error it is
    always left as it was.

    Memory: besides the step's own tensors, a risk's output gradients only a layer at a time
    (each risk's backward is streamed: ``gefx.collect.collect_each``; on a risk's first use the
    per-sample probe's two passes are that backward), the objective's output gradients before the
    step (one set, summed over samples), online those of the step that serve a risk (GA's, NPO's
    forget NLL: one set, released when that risk is done), of an aggregated gradient (the dense
    form's, or a risk's for `objective_instances`) or a 16-bit ``.grad`` converted for its products
    at most 2^22 float32 entries at a time (``gefx.pieces.column_blocks``, ``gefx.ops.dense_dot``;
    a parameter that does not split, a stacked expert's, whole), and with `optimizer` one
    parameter's update at a time (two parameter-sized temporaries in float32, three in 16-bit);
    online, ``.grad`` is contracted in place (mid-accumulation the measurement is made before the
    step instead; nonzero earlier gradients wait aside as one copy only under torch.distributed or
    with sharded parameters). Under torch.distributed every risk's pieces are held at once; with
    ``optimizer=`` before the step the update (from ``.grad`` and the objective's aggregate) is
    formed a parameter at a time each time a risk reads it. See
    bench/RESULTS.md ("Memory of large runs").
    """
    if not isinstance(risks, Mapping) or not risks:
        raise TypeError("risks must be a non-empty dict name -> per-sample risk vector")
    if optimizer is not None and direction is not None:
        raise ValueError("give optimizer= (its next update) or direction=, not both")
    if optimizer is not None and not backward and dist.group_size(process_group) > 1:
        raise ValueError("g_effect(optimizer=...) under torch.distributed needs backward=True: the update "
                         "follows from .grad as the data-parallel backward leaves it")
    vector = isinstance(objective, torch.Tensor) and objective.dim() == 1
    if objective_instances and not vector:
        raise ValueError("objective_instances=True needs the objective as a per-sample vector [B] (its "
                         "per-sample terms are what per_objective_instance reports)")
    opts = _Options(groups, process_group, norms, _direction(tape, direction))
    if isinstance(objective, Mapping):
        if backward:
            raise ValueError("backward=True needs the objective as a tensor (the loss to backpropagate), "
                             "not a mapping of gradients")
        m_obj = dense_gradients(tape, objective)
        opts = opts.along(_pending_update(tape, optimizer, m_obj))
        measured = against(tape, m_obj, streamed(tape, prove_all(tape, risks)), direction=opts.direction,
                           squares=opts.squares(), group=opts.process_group)
        return reported(tape, measured, opts.groups, opts.process_group)
    if not isinstance(objective, torch.Tensor) or objective.dim() > 1:
        raise ValueError("objective must be a scalar tensor or a per-sample vector [B]; got "
                         + (f"shape {tuple(objective.shape)}" if isinstance(objective, torch.Tensor)
                            else type(objective).__name__))
    if not backward:
        return _before_step(tape, objective, prove_all(tape, risks), opts, optimizer, objective_instances)
    _can_step(tape, objective, opts.process_group)
    proofs = prove_all(tape, risks)  # before the backward: a bad risk leaves .grad untouched
    zero = _no_earlier_gradient(tape, opts.process_group)
    if zero is not False:
        return _with_step(tape, objective, proofs, opts, optimizer, objective_instances, zero)
    # mid gradient accumulation: measured before the step, then the plain backward accumulates into
    # the earlier gradients in place (online, they would wait aside as a second set)
    result = _before_step(tape, objective, proofs, opts, optimizer, objective_instances)
    objective.sum().backward(retain_graph=True)
    return result


# -- the modes: what the risks are contracted against, and whether the step's backward runs ------
def _before_step(tape: Tape, objective: torch.Tensor, proofs: dict, opts: "_Options", optimizer,
                 instances: bool) -> GEffect:
    """g_effect without backward=True: against the objective's gradient formed from its pieces."""
    # the objective's pieces: per sample only where its instances are asked for (else its sum)
    g_obj = collect(tape, objective, per_sample=instances, what="objective")
    obj_batch = g_obj.batch if instances else None
    if dist.group_size(opts.process_group) > 1:  # (optimizer= is refused there before the step)
        dist.check_supported(tape.model)
        measured = against(tape, aggregated(tape, g_obj, opts.process_group), streamed(tape, proofs),
                           direction=opts.direction, squares=opts.squares(), g_obj=g_obj if instances else None,
                           group=opts.process_group)
        return reported(tape, measured, opts.groups, opts.process_group, obj_batch)
    if optimizer is not None:
        # the update, from .grad plus the objective's aggregate, formed per parameter as each risk
        # reads it (an aggregate per parameter and risk) instead of holding every risk's pieces
        opts = opts.along(_pending_update(tape, optimizer, aggregated(tape, g_obj, opts.process_group)))
    # each product by the cheaper of the ghost and dense forms, the objective's aggregate formed only
    # where the dense form wins (or for its norm), a parameter at a time: once per risk, one GEMM per
    # parameter and extra risk, traded for holding no risk's output gradients beyond a layer's
    sq = opts.squares()
    measured = contracted(streamed(tape, proofs), lambda: ByMarginals(tape, g_obj, instances, opts.direction, sq))
    return reported(tape, measured, opts.groups, opts.process_group, obj_batch)


def _with_step(tape: Tape, objective: torch.Tensor, proofs: dict, opts: "_Options", optimizer, instances: bool,
               zero: bool | None) -> GEffect:
    """g_effect with backward=True (no earlier gradient, or several processes or sharded
    parameters: `zero` None): the step's backward, serving the risks it can, then everything
    against its .grad."""
    # every risk's coverage is proved before the step's backward touches .grad (and the objective's
    # per-sample contract probed when its instances are asked for); each risk's per-sample probe
    # runs after it, on the risk's turn (gefx.collect.after_step); a refusal then restores .grad,
    # as any error inside StepBackward does
    sq = opts.squares()
    products_for = None if instances else _live_products(tape, sq, opts.direction, optimizer)
    obj_reach = probed(tape, prove(tape, objective, "objective")) if instances else None
    serving = Serving(tape, objective, {name: reach.loss for name, reach in proofs.items()}, keep_all=instances)
    step = StepBackward(serving, zero)
    live = {} if products_for is None else serving.serve(step, proofs, products_for)
    with step:
        g_obj = pieces_from(tape, obj_reach, serving.captured, per_sample=True) if instances else None
        opts = opts.along(_step_update(tape, optimizer))
        feeds = after_step(tape, serving, proofs, {name: feed for name, (_, feed) in live.items()})
        measured = against(tape, dense_gradients(tape, step.grads), feeds, direction=opts.direction, squares=sq,
                           g_obj=g_obj, group=opts.process_group,
                           made={name: products for name, (products, _) in live.items()})
        return reported(tape, {name: measured[name] for name in proofs}, opts.groups, opts.process_group,
                        None if g_obj is None else g_obj.batch)


def _can_step(tape: Tape, objective: torch.Tensor, group) -> None:
    """What g_effect(backward=True) needs before it may touch .grad (besides proved risks)."""
    check_loss(objective, "objective", per_sample=objective.dim() == 1)
    if dist.group_size(group) > 1:
        dist.check_supported(tape.model)
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in tape.params.values()):
        raise ValueError("g_effect(backward=True) runs the step's loss.backward() itself, but under DeepSpeed the "
                         "engine owns the backward: call gefx.prepare(tape, risks) before engine.backward(loss) "
                         "and .against(gefx.engine_grads(model)) after it (or g_effect without backward=True "
                         "before the step)")


def _no_earlier_gradient(tape: Tape, group) -> bool | None:
    """Whether every counted parameter's ``.grad`` is None or zero; None (not decided here) under
    torch.distributed or with sharded parameters, where the step keeps earlier gradients aside."""
    if dist.group_size(group) > 1 or any(shards.layout(p) is not None for p in tape.params.values()):
        return None
    return _all_zero([p.grad for p in tape.params.values() if p.grad is not None])


def _live_products(tape: Tape, squares, direction, optimizer):
    """What a risk the step serves is contracted into as the step's backward finishes each
    ``.grad`` (``Serving.serve``): ``Against`` the ``.grad`` at hand, along `direction`, or with
    `optimizer` along its update, each parameter's formed from its finished ``.grad``. None (no
    risk is served live: the step captures what serves) under torch.distributed, with sharded
    parameters, or for an optimizer without a closed form."""
    if dist.group_size() > 1 or any(shards.layout(p) is not None for p in tape.params.values()):
        return None
    if optimizer is not None:
        deltas = updates_as_they_come(optimizer)
        if deltas is None:
            return None
        direction = _Named(tape, deltas)
    return lambda: Against(tape, _GradNow(tape), None, direction, squares)


class _GradNow(Mapping):
    """{name: .grad as it is now} for the counted parameters that have one."""

    def __init__(self, tape: Tape):
        self.params = tape.params

    def __getitem__(self, name):
        g = self.params[name].grad
        if g is None:
            raise KeyError(name)
        return g.detach()

    def __contains__(self, name) -> bool:
        return name in self.params and self.params[name].grad is not None

    def __iter__(self):
        return (n for n, p in self.params.items() if p.grad is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# -- prepare: pieces now, contracted against a backward gefx does not run -------------------------
class Prepared:
    """Risks' per-sample gradient pieces, collected before a backward gefx does not run, to be
    contracted with that backward's ``.grad`` afterwards: the online mode for training loops that
    own their backward (a DeepSpeed engine's ``engine.backward``). See :func:`prepare`."""

    def __init__(self, tape: Tape, risks: Mapping[str, torch.Tensor], groups, process_group, norms: bool,
                 objective: torch.Tensor | None):
        if not isinstance(risks, Mapping) or not risks:
            raise TypeError("risks must be a non-empty dict name -> per-sample risk vector")
        self.tape, self.opts = tape, _Options(groups, process_group, norms, None)
        later = _untouched(tape, objective, risks)
        # differentiated in .against(), streamed (their graphs kept until then): proved now
        self.later = prove_all(tape, {name: risk for name, risk in risks.items() if name in later})
        # held until .against(): .grad does not exist yet (the probe reuses the loss's gradients)
        self.pieces = {name: collect(tape, risk, per_sample=True, what=f"risk {name!r}")
                       for name, risk in risks.items() if name not in later}
        self.order = list(risks)

    def against(self, grads: Mapping, *, optimizer=None, direction: Mapping | None = None) -> GEffect:
        """The G-effects of the objective whose gradient `grads` is ({parameter or name: tensor},
        e.g. ``{p: p.grad for p in model.parameters()}`` after the step's backward, or under DeepSpeed
        and FSDP2 ``gefx.engine_grads(model)``: each rank's gradient shard, never gathered); with
        `optimizer`, each risk's predicted change along its next update (from ``.grad``), or along
        `direction`."""
        if optimizer is not None and direction is not None:
            raise ValueError("give optimizer= (its next update) or direction=, not both")
        if self.later:
            self.tape.check_open()  # the risks left for now are differentiated through the trace
        opts = self.opts.along(_direction(self.tape, direction) if direction is not None
                               else _step_update(self.tape, optimizer))
        later = self.later
        feeds = {**{name: held(self.tape, g) for name, g in self.pieces.items()}, **streamed(self.tape, later)}
        try:
            measured = against(self.tape, dense_gradients(self.tape, grads), feeds, direction=opts.direction,
                               squares=opts.squares(), group=opts.process_group)
        except RuntimeError as exc:
            if not later or "graph freed" not in str(exc):
                raise
            raise RuntimeError(f"the risks {sorted(later)} were left for .against() because the objective given to "
                               "prepare(objective=...) does not reach their graphs, but the backward run since "
                               "freed them: name the loss that backward differentiates") from exc
        return reported(self.tape, {name: measured[name] for name in self.order}, opts.groups, opts.process_group)


def prepare(tape: Tape, risks: Mapping[str, torch.Tensor], *, groups="block", process_group=None,
            norms: bool = False, objective: torch.Tensor | None = None) -> Prepared:
    """Collect the risks' pieces now (inside the trace, before the step's backward frees the graph);
    ``.against(grads)`` gives the G-effects against the step's own gradient later, the trace closed
    or not. One partial backward per risk, none for the objective (as ``backward=True`` without the
    reuse), and the step's backward untouched.

    With `objective`, the loss your backward will differentiate: a risk whose graph that backward
    does not touch (a forward of its own, e.g. the retain NLL under GA) is not collected now but
    differentiated in ``.against``, streamed against the gradient (``g_effect``'s memory: no set of
    its output gradients is held through your backward; its graph is kept until then, and
    ``.against`` must then run inside the trace). Not under DeepSpeed ZeRO-3, whose partitioned
    weights a backward after the engine's cannot use."""
    return Prepared(tape, risks, groups, process_group, norms, objective)


def _untouched(tape: Tape, objective, risks: Mapping) -> set:
    """The risks whose autograd graph shares no node with the objective's but the parameters'
    accumulators (so the objective's backward frees nothing they need)."""
    if objective is None or any(hasattr(p, "ds_id") for p in tape.params.values()):
        return set()
    if not isinstance(objective, torch.Tensor) or objective.grad_fn is None:
        raise ValueError("prepare(objective=...) must be the loss tensor your backward differentiates")
    touched = {n for n in _walk(objective.grad_fn, set()) if not hasattr(n, "variable")}
    return {name for name, risk in risks.items() if isinstance(risk, torch.Tensor) and risk.grad_fn is not None
            and not _walk(risk.grad_fn, touched) & touched}


# -- what the risks are measured along: options, directions, updates -----------------------------
@dataclass
class _Options:
    groups: object
    process_group: object
    norms: bool
    direction: dict[str, torch.Tensor] | None

    def along(self, direction) -> "_Options":
        return self if direction is None else _Options(self.groups, self.process_group, self.norms, direction)

    def squares(self) -> dict | None:
        """A fresh dict for the objective's squared norms where `norms` are asked (else None)."""
        return {} if self.norms else None


def _direction(tape: Tape, direction) -> dict[str, torch.Tensor] | None:
    if direction is None:
        return None
    if not isinstance(direction, Mapping):
        raise TypeError("direction must be a mapping {parameter or name: tensor of its shape}")
    out = dense_gradients(tape, direction, what="direction")
    bad = [n for n, t in out.items() if not shards.finite(t)]
    if bad:
        raise ValueError(f"direction has NaN or inf entries for {', '.join(bad[:3])}")
    return out


class _Named(Mapping):
    """{canonical name: delta} for the counted parameters among an optimizer's updates `deltas`
    (as `deltas` has them when asked; each formed when read; FSDP2's DTensor updates read
    shard-wise)."""

    def __init__(self, tape: Tape, deltas: Mapping[torch.Tensor, torch.Tensor]):
        self.params, self.deltas = tape.params, deltas

    def __getitem__(self, name):
        if name not in self:
            raise KeyError(name)
        p = self.params[name]
        return shards.sharded(p, self.deltas[p].detach())

    def __contains__(self, name) -> bool:
        return name in self.params and self.params[name] in self.deltas

    def __iter__(self):
        return (n for n, p in self.params.items() if p in self.deltas)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _pending_update(tape: Tape, optimizer, m_obj: Mapping[str, torch.Tensor]):
    """The update `optimizer` will make once the caller's backward has added the objective's
    gradient `m_obj` to ``.grad`` (None without an optimizer), one parameter at a time."""
    if optimizer is None:
        return None

    def grad_of(p):
        name = tape.names.get(id(p))
        add = m_obj[name] if name in m_obj else None
        return p.grad if add is None else add.to(p.dtype) if p.grad is None else p.grad + add.to(p.dtype)

    return _Named(tape, updates(optimizer, grad_of, has_grad=lambda p: p.grad is not None or tape.names.get(id(p)) in m_obj))


def _step_update(tape: Tape, optimizer):
    """The update `optimizer` makes from ``.grad`` now (FSDP2: DTensor updates, read shard-wise)."""
    if optimizer is None:
        return None
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in tape.params.values()):
        raise ValueError("optimizer= is not supported under DeepSpeed (its optimizer steps flat partitions that "
                         "gefx.update cannot replay); pass the update as direction= instead")
    return _Named(tape, updates(optimizer))
