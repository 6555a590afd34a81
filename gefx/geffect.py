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
from .dots import _check_loss, aggregated, check_graph, collect, dense_gradients, group_sums, marginals, pieces_from
from .pieces import contract
from .step import StepBackward
from .tape import Tape


@dataclass
class RiskEffect:
    """G-effects of one objective on one risk."""

    risk: str
    groups: list[str]
    per_instance_group: torch.Tensor                     # [n_groups, B_risk]
    per_objective_instance_group: torch.Tensor | None    # [n_groups, B_objective] or None

    @property
    def per_instance(self) -> torch.Tensor:
        return self.per_instance_group.sum(0)

    @property
    def per_objective_instance(self) -> torch.Tensor | None:
        g = self.per_objective_instance_group
        return None if g is None else g.sum(0)

    @property
    def per_group(self) -> dict[str, float]:
        return {g: float(v) for g, v in zip(self.groups, self.per_instance_group.sum(1))}

    @property
    def total(self) -> float:
        return float(self.per_instance_group.sum())

    def to_dict(self) -> dict:
        poi = self.per_objective_instance
        return {"risk": self.risk, "total": self.total, "per_group": self.per_group,
                "per_instance": self.per_instance.tolist(),
                "per_instance_group": {g: row.tolist() for g, row in zip(self.groups, self.per_instance_group)},
                "per_objective_instance": None if poi is None else poi.tolist()}


class GEffect(dict):
    """risk name -> :class:`RiskEffect`, in the order the risks were given."""

    @property
    def groups(self) -> list[str]:
        return next(iter(self.values())).groups

    def to_dict(self) -> dict:
        return {name: eff.to_dict() for name, eff in self.items()}

    def rows(self, **keys) -> list[dict]:
        """Long-format rows {**keys, risk, group, value}, one per risk and group plus group
        "total" (e.g. ``effects.rows(objective="ga", step=10)``), for CSV files and plots."""
        out = []
        for name, eff in self.items():
            for group, value in [*eff.per_group.items(), ("total", eff.total)]:
                out.append({**keys, "risk": name, "group": group, "value": value})
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{n}: total={e.total:.6g}" for n, e in self.items())
        return f"GEffect({body})"


def g_effect(tape: Tape, objective, risks: Mapping[str, torch.Tensor], *,
             groups="block", process_group=None, backward: bool = False) -> GEffect:
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
        process_group: under torch.distributed with more than one process (DDP, FSDP2), the
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

    Every product is exact (no per-sample gradient of a matrix parameter is formed), in float32
    or better (with ``backward=True``, against ``.grad`` in its dtype). Unless `backward` is set,
    ``.grad`` is untouched and the graph is kept for the caller's own backward; on an error it is
    always left as it was.
    """
    if not isinstance(risks, Mapping) or not risks:
        raise TypeError("risks must be a non-empty dict name -> per-sample risk vector")
    if isinstance(objective, Mapping):
        if backward:
            raise ValueError("backward=True needs the objective as a tensor (the loss to backpropagate), "
                             "not a mapping of gradients")
        return _against(tape, dense_gradients(tape, objective), risks, groups, process_group)
    if not isinstance(objective, torch.Tensor) or objective.dim() > 1:
        raise ValueError("objective must be a scalar tensor or a per-sample vector [B]; got "
                         + (f"shape {tuple(objective.shape)}" if isinstance(objective, torch.Tensor)
                            else type(objective).__name__))
    vector = objective.dim() == 1
    if backward:
        return _with_step(tape, objective, risks, groups, process_group)
    g_obj = collect(tape, objective, per_sample=vector, what="objective")
    if dist.group_size(process_group) > 1:
        dist.check_supported(tape.model)
        return _against(tape, aggregated(tape, g_obj, process_group), risks, groups, process_group,
                        g_obj if vector else None)
    result = GEffect()
    memo: dict[str, dict] = {}  # the objective's aggregated gradient per parameter, shared by the risks
    for name, risk in risks.items():
        g_risk = collect(tape, risk, per_sample=True, what=f"risk {name!r}")
        rows, cols = {}, {}
        for n, P in g_risk.pieces.items():
            if n in g_obj.pieces:
                rows[n], cols[n] = marginals(P, g_obj.pieces[n], tape.params[n].shape, need_cols=vector,
                                             memo=memo.setdefault(n, {}))
        per_group = group_sums(tape, rows, groups, (g_risk.batch,))
        obj_group = group_sums(tape, cols, groups, (g_obj.batch,)) if vector else None
        names = list(per_group)
        result[name] = RiskEffect(name, names, torch.stack([per_group[g] for g in names]),
                                  torch.stack([obj_group[g] for g in names]) if vector else None)
    return result


class Prepared:
    """Risks' per-sample gradient pieces, collected before a backward gefx does not run, to be
    contracted with that backward's ``.grad`` afterwards: the online mode for training loops that
    own their backward (a Hugging Face Trainer's ``accelerator.backward``). See :func:`prepare`."""

    def __init__(self, tape: Tape, risks: Mapping[str, torch.Tensor], groups, process_group):
        if not isinstance(risks, Mapping) or not risks:
            raise TypeError("risks must be a non-empty dict name -> per-sample risk vector")
        self.tape, self.groups, self.process_group = tape, groups, process_group
        self.pieces = {name: collect(tape, risk, per_sample=True, what=f"risk {name!r}") for name, risk in risks.items()}

    def against(self, grads: Mapping) -> GEffect:
        """The G-effects of the objective whose gradient `grads` is ({parameter or name: tensor},
        e.g. ``{p: p.grad for p in model.parameters()}`` after the step's backward)."""
        return _against(self.tape, dense_gradients(self.tape, grads), self.pieces, self.groups,
                        self.process_group, risk_pieces=lambda name, risk, what: self.pieces[name])


def prepare(tape: Tape, risks: Mapping[str, torch.Tensor], *, groups="block", process_group=None) -> Prepared:
    """Collect the risks' pieces now (inside the trace, before the step's backward frees the graph);
    ``.against(grads)`` gives the G-effects against the step's own gradient later, the trace closed
    or not. One partial backward per risk, none for the objective (as ``backward=True`` without the
    reuse), and the step's backward untouched: what the Trainer mixin uses."""
    return Prepared(tape, risks, groups, process_group)


def _with_step(tape: Tape, objective: torch.Tensor, risks, groups, group) -> GEffect:
    """g_effect with backward=True: the step's backward, then everything against its .grad."""
    vector = objective.dim() == 1
    _check_loss(objective, "objective", per_sample=vector)
    for name, risk in risks.items():  # before the backward: a bad risk leaves .grad untouched
        _check_loss(risk, f"risk {name!r}", per_sample=True)
    if dist.group_size(group) > 1:
        dist.check_supported(tape.model)
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

        return _against(tape, dense_gradients(tape, step.grads), risks, groups, group, g_obj, risk_pieces)


def _against(tape: Tape, m_obj: dict[str, torch.Tensor], risks, groups, group, g_obj=None,
             risk_pieces=None) -> GEffect:
    """G-effects against the objective's aggregated gradient given densely (per parameter name),
    gathering per-instance values across ranks under torch.distributed."""
    many = dist.group_size(group) > 1
    result = GEffect()
    for name, risk in risks.items():
        what = f"risk {name!r}"
        g_risk = (risk_pieces(name, risk, what) if risk_pieces is not None
                  else collect(tape, risk, per_sample=True, what=what))
        rows = {n: contract(P, m_obj[n]) for n, P in g_risk.pieces.items() if n in m_obj}
        per_group = group_sums(tape, rows, groups, (g_risk.batch,))
        names = list(per_group)
        per_instance = torch.stack([per_group[g] for g in names])
        per_obj = None
        if g_obj is not None:
            m_risk = aggregated(tape, g_risk, group)
            cols = {n: contract(P, m_risk[n]) for n, P in g_obj.pieces.items() if n in m_risk}
            obj_group = group_sums(tape, cols, groups, (g_obj.batch,))
            per_obj = torch.stack([obj_group[g] for g in names])
        if many:
            per_instance = dist.gather_columns(per_instance, group)
            per_obj = None if per_obj is None else dist.gather_columns(per_obj, group)
        result[name] = RiskEffect(name, names, per_instance, per_obj)
    return result
