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

from . import dist
from . import shards
from .dots import (_check_loss, aggregated, check_graph, collect, contract_all, dense_gradients, group_sums,
                   marginals, pieces_from, self_norms)
from .effects import GEffect, RiskEffect
from .groups import resolve
from .pieces import dense
from .step import StepBackward
from .tape import Tape
from .update import update


def g_effect(tape: Tape, objective, risks: Mapping[str, torch.Tensor], *, groups="block", process_group=None,
             backward: bool = False, optimizer=None, direction: Mapping | None = None,
             norms: bool = False) -> GEffect:
    """G-effects of `objective` on each risk in `risks`.

    Args:
        tape: an open :func:`gefx.trace` that recorded the forwards the losses come from.
        objective: the unlearning objective being minimised, as a scalar, or as a per-sample
            vector whose sum is the objective (then per-objective-instance effects are reported),
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
            kept (``retain_graph=True``) until the caller drops its tensors.
        optimizer: the optimizer whose next ``step()`` will apply this gradient: each risk's
            ``predicted_change`` is then <grad r_i, delta_theta> for exactly the change that step
            makes (``gefx.update``: SGD, Adam, AdamW in closed form from their state, others by
            stepping a throw-away copy; the optimizer and the parameters are untouched). With
            ``backward=True`` the update follows from ``.grad`` after the step's backward; without,
            from ``.grad`` (earlier micro-batches) plus the objective's gradient, as the caller's
            ``objective.sum().backward()`` will leave it (single process only: under
            torch.distributed use ``backward=True``).
        direction: instead of `optimizer`, any direction {parameter or name: tensor}: each risk's
            ``predicted_change`` is <grad r_i, direction> (missing parameters count zero).
        norms: also give ||grad r_i||, ||grad L|| and their cosines per group (``risk_norm``,
            ``objective_norm``, ``cosine``: see ``gefx.effects``), from the same pieces (no
            extra backward, but a per-sample self product per risk and layer: about 13% more
            time for an online measurement of a 10M Llama at B = 16, T = 128, hence opt-in).

    Every product is exact (no per-sample gradient of a matrix parameter is formed), in float32
    or better (with ``backward=True``, against ``.grad`` in its dtype). Unless `backward` is set,
    ``.grad`` is untouched and the graph is kept for the caller's own backward; on an error it is
    always left as it was.
    """
    if not isinstance(risks, Mapping) or not risks:
        raise TypeError("risks must be a non-empty dict name -> per-sample risk vector")
    if optimizer is not None and direction is not None:
        raise ValueError("give optimizer= (its next update) or direction=, not both")
    if optimizer is not None and not backward and dist.group_size(process_group) > 1:
        raise ValueError("g_effect(optimizer=...) under torch.distributed needs backward=True: the update "
                         "follows from .grad as the data-parallel backward leaves it")
    opts = _Options(groups, process_group, norms, _direction(tape, direction))
    if isinstance(objective, Mapping):
        if backward:
            raise ValueError("backward=True needs the objective as a tensor (the loss to backpropagate), "
                             "not a mapping of gradients")
        m_obj = dense_gradients(tape, objective)
        return _against(tape, m_obj, risks, opts.along(_pending_update(tape, optimizer, m_obj)))
    if not isinstance(objective, torch.Tensor) or objective.dim() > 1:
        raise ValueError("objective must be a scalar tensor or a per-sample vector [B]; got "
                         + (f"shape {tuple(objective.shape)}" if isinstance(objective, torch.Tensor)
                            else type(objective).__name__))
    vector = objective.dim() == 1
    if backward:
        return _with_step(tape, objective, risks, opts, optimizer)
    g_obj = collect(tape, objective, per_sample=vector, what="objective")
    if dist.group_size(process_group) > 1 or optimizer is not None:
        if dist.group_size(process_group) > 1:
            dist.check_supported(tape.model)
        m_obj = aggregated(tape, g_obj, process_group)
        return _against(tape, m_obj, risks, opts.along(_pending_update(tape, optimizer, m_obj)),
                        g_obj if vector else None)
    return _by_marginals(tape, g_obj, risks, opts, vector)


@dataclass
class _Options:
    groups: object
    process_group: object
    norms: bool
    direction: dict[str, torch.Tensor] | None

    def along(self, direction) -> "_Options":
        return self if direction is None else _Options(self.groups, self.process_group, self.norms, direction)


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


def _named(tape: Tape, delta: Mapping[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{canonical name: delta} for the counted parameters among an optimizer's updates."""
    return {tape.names[id(p)]: d for p, d in delta.items() if id(p) in tape.names}


def _pending_update(tape: Tape, optimizer, m_obj: dict[str, torch.Tensor]):
    """The update `optimizer` will make once the caller's backward has added the objective's
    gradient `m_obj` to ``.grad`` (None without an optimizer)."""
    if optimizer is None:
        return None
    grads = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            add = m_obj.get(tape.names.get(id(p)))
            g = p.grad if add is None else add.to(p.dtype) if p.grad is None else p.grad + add.to(p.dtype)
            if g is not None:
                grads[p] = g
    return _named(tape, update(optimizer, grads))


def _step_update(tape: Tape, optimizer):
    """The update `optimizer` makes from ``.grad`` now (FSDP2: DTensor updates, read shard-wise)."""
    if optimizer is None:
        return None
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in tape.params.values()):
        raise ValueError("optimizer= is not supported under DeepSpeed (its optimizer steps flat partitions that "
                         "gefx.update cannot replay); pass the update as direction= instead")
    return dense_gradients(tape, _named(tape, update(optimizer)), what="the optimizer's update")


def _by_marginals(tape: Tape, g_obj, risks, opts: _Options, vector: bool) -> GEffect:
    """Before the step, one process: each product by the cheaper of the ghost and dense forms,
    the objective's aggregated gradient formed only where the dense form wins (or for its norm)."""
    result = GEffect()
    memo: dict[str, dict] = {}  # the objective's aggregated gradient per parameter, shared by the risks
    obj_sq = None
    if opts.norms:
        sq = {}
        for n, Q in g_obj.pieces.items():
            m = dense(Q, dist.shape(tape.params[n]))
            sq[n] = m.pow(2).sum()
        obj_sq = group_sums(tape, sq, opts.groups, ())
    for name, risk in risks.items():
        g_risk = collect(tape, risk, per_sample=True, what=f"risk {name!r}")
        rows, cols = {}, {}
        for n, P in g_risk.pieces.items():
            if n in g_obj.pieces:
                rows[n], cols[n] = marginals(P, g_obj.pieces[n], dist.shape(tape.params[n]), need_cols=vector,
                                             memo=memo.setdefault(n, {}))
        result[name] = _effect(tape, name, g_risk, rows, opts, obj_sq, cols if vector else None,
                               g_obj.batch if vector else None)
    return result


def _effect(tape: Tape, name: str, g_risk, rows: dict, opts: _Options, obj_sq, cols=None,
            obj_batch=None) -> RiskEffect:
    """One risk's RiskEffect from its per-parameter products with the objective (`rows`, and
    `cols` for the PG-effect), plus norms and the direction's products from its pieces; per
    instance values gathered across ranks under torch.distributed."""
    def per_group(per_param, batch):
        sums = group_sums(tape, per_param, opts.groups, (batch,))
        return torch.stack([sums[g] for g in names])

    names = resolve(tape, opts.groups)[1]
    B = g_risk.batch
    values = {"per_instance_group": per_group(rows, B),
              "per_objective_instance_group": None if cols is None else per_group(cols, obj_batch)}
    if opts.norms:
        values["risk_norm_group"] = per_group({n: self_norms(P) for n, P in g_risk.pieces.items()}, B)
    if opts.direction is not None:
        values["predicted_change_group"] = per_group(contract_all([g_risk.pieces], opts.direction)[0], B)
    if dist.group_size(opts.process_group) > 1:
        values = {k: None if v is None else dist.gather_columns(v, opts.process_group) for k, v in values.items()}
    if "risk_norm_group" in values:
        values["risk_norm_group"] = values["risk_norm_group"].clamp(min=0).sqrt()
    obj_norm = None if obj_sq is None else torch.stack([obj_sq[g] for g in names]).clamp(min=0).sqrt()
    return RiskEffect(name, names, objective_norm_group=obj_norm, **values)


class Prepared:
    """Risks' per-sample gradient pieces, collected before a backward gefx does not run, to be
    contracted with that backward's ``.grad`` afterwards: the online mode for training loops that
    own their backward (a Hugging Face Trainer's ``accelerator.backward``). See :func:`prepare`."""

    def __init__(self, tape: Tape, risks: Mapping[str, torch.Tensor], groups, process_group, norms: bool):
        if not isinstance(risks, Mapping) or not risks:
            raise TypeError("risks must be a non-empty dict name -> per-sample risk vector")
        self.tape, self.opts = tape, _Options(groups, process_group, norms, None)
        self.pieces = {name: collect(tape, risk, per_sample=True, what=f"risk {name!r}") for name, risk in risks.items()}

    def against(self, grads: Mapping, *, optimizer=None, direction: Mapping | None = None) -> GEffect:
        """The G-effects of the objective whose gradient `grads` is ({parameter or name: tensor},
        e.g. ``{p: p.grad for p in model.parameters()}`` after the step's backward, or under DeepSpeed
        and FSDP2 ``gefx.engine_grads(model)``: each rank's gradient shard, never gathered); with
        `optimizer`, each risk's predicted change along its next update (from ``.grad``), or along
        `direction`."""
        if optimizer is not None and direction is not None:
            raise ValueError("give optimizer= (its next update) or direction=, not both")
        opts = self.opts.along(_direction(self.tape, direction) if direction is not None
                               else _step_update(self.tape, optimizer))
        return _against(self.tape, dense_gradients(self.tape, grads), self.pieces, opts,
                        risk_pieces=lambda name, risk, what: self.pieces[name])


def prepare(tape: Tape, risks: Mapping[str, torch.Tensor], *, groups="block", process_group=None,
            norms: bool = False) -> Prepared:
    """Collect the risks' pieces now (inside the trace, before the step's backward frees the graph);
    ``.against(grads)`` gives the G-effects against the step's own gradient later, the trace closed
    or not. One partial backward per risk, none for the objective (as ``backward=True`` without the
    reuse), and the step's backward untouched: what the Trainer mixin uses."""
    return Prepared(tape, risks, groups, process_group, norms)


def _with_step(tape: Tape, objective: torch.Tensor, risks, opts: _Options, optimizer) -> GEffect:
    """g_effect with backward=True: the step's backward, then everything against its .grad."""
    vector = objective.dim() == 1
    _check_loss(objective, "objective", per_sample=vector)
    for name, risk in risks.items():  # before the backward: a bad risk leaves .grad untouched
        _check_loss(risk, f"risk {name!r}", per_sample=True)
    if dist.group_size(opts.process_group) > 1:
        dist.check_supported(tape.model)
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in tape.params.values()):
        raise ValueError("g_effect(backward=True) runs the step's loss.backward() itself, but under DeepSpeed the "
                         "engine owns the backward: call gefx.prepare(tape, risks) before engine.backward(loss) "
                         "and .against(gefx.engine_grads(model)) after it (or g_effect without backward=True "
                         "before the step)")
    tape.check_open()
    # every graph is checked before the step's backward touches .grad
    obj_reach = check_graph(tape, objective, "objective") if vector else None
    reaches = {name: check_graph(tape, risk, f"risk {name!r}") for name, risk in risks.items()}
    with StepBackward(tape, objective, risks) as step:
        if not step.grads:
            raise ValueError("the objective's backward reached none of the counted parameters")
        g_obj = pieces_from(tape, objective, step.captured, per_sample=True, what="objective",
                            users=obj_reach.calls) if vector else None

        def risk_pieces(name, risk, what):
            grads = step.risk_grads(name, risk, what)
            if grads is None:
                return collect(tape, risk, per_sample=True, what=what, probe=False)
            return pieces_from(tape, risk, grads, per_sample=True, what=what, users=reaches[name].calls)

        opts = opts.along(_step_update(tape, optimizer))
        return _against(tape, dense_gradients(tape, step.grads), risks, opts, g_obj, risk_pieces)


def _against(tape: Tape, m_obj: dict[str, torch.Tensor], risks, opts: _Options, g_obj=None,
             risk_pieces=None) -> GEffect:
    """G-effects against the objective's aggregated gradient given densely (per parameter name;
    under torch.distributed already summed over the ranks; sharded parameters as shards.Sharded)."""
    obj_sq = group_sums(tape, {n: shards.sq_norm(m) for n, m in m_obj.items()}, opts.groups, ()) if opts.norms else None

    def pieces_of(name):
        what = f"risk {name!r}"
        return (risk_pieces(name, risks[name], what) if risk_pieces is not None
                else collect(tape, risks[name], per_sample=True, what=what))

    rows_of = {}
    if any(isinstance(m, shards.Sharded) for m in m_obj.values()):
        # each shard is broadcast once for all risks (their pieces held together meanwhile)
        held = {name: pieces_of(name) for name in risks}
        rows_of = dict(zip(held, contract_all([g.pieces for g in held.values()], m_obj)))
        pieces_of = held.__getitem__
    result = GEffect()
    for name in risks:
        g_risk = pieces_of(name)
        rows = rows_of[name] if name in rows_of else contract_all([g_risk.pieces], m_obj)[0]
        cols = None
        if g_obj is not None:
            cols = contract_all([g_obj.pieces], aggregated(tape, g_risk, opts.process_group))[0]
        result[name] = _effect(tape, name, g_risk, rows, opts, obj_sq, cols, None if g_obj is None else g_obj.batch)
    return result
