"""``gefx.grad_dots``: per-sample gradient inner products of losses computed from traced forwards
(norms, against a scalar loss or a gradient, pair matrices), per parameter group and in total: the
engine's pipeline (docs/ARCHITECTURE.md) with the pieces of ``gefx.collect`` and the products of
``gefx.products``, for other libraries (DP clipping, data attribution).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from . import dist
from .collect import Grads, collect
from .groups import group_sums
from .pieces import PerSample
from .precision import acc_dtype
from .products import aggregated, contract_all, dense_gradients, marginals, pair_matrix, self_norms
from .tape import Tape


@dataclass
class Dots:
    """Result of :func:`grad_dots`: `total` summed over all counted parameters, `per_group` the
    same restricted to each group (in the order of `groups`), `per_param` per parameter name."""

    total: torch.Tensor
    per_group: dict[str, torch.Tensor]
    per_param: dict[str, torch.Tensor] = field(repr=False)

    @property
    def groups(self) -> list[str]:
        return list(self.per_group)


def grad_dots(tape: Tape, a: torch.Tensor, b=None, *, groups="module", process_group=None) -> Dots:
    """Per-sample gradient inner products, per parameter group and in total.

    Args:
        tape: an open :func:`gefx.trace`.
        a: per-sample loss vector [Ba] (entry k depends only on batch row k of one traced
            forward; e.g. ``gefx.losses.sequence_nll``).
        b: None -> squared norms ||grad a_i||^2, shape [Ba];
           a scalar tensor -> <grad a_i, grad b>, shape [Ba] (b may span several forwards);
           a per-sample vector [Bb] (same or another forward, any batch size and length) ->
           the matrix <grad a_i, grad b_j>, shape [Ba, Bb];
           a mapping {parameter or name: tensor of its shape} (e.g. ``{n: p.grad}``) ->
           <grad a_i, m>, shape [Ba] (parameters missing from it count zero).
        groups: "param", "module", "block", "paper", "reference" or a callable name -> group
            (see ``gefx.groups``).
        process_group: under torch.distributed with more than one process (DDP, FSDP2, DeepSpeed
            ZeRO), the ranks that each traced their own micro-batch (default: the world): `a` and
            a per-sample `b` are the ranks' vectors concatenated in rank order, a scalar `b` the
            sum of the ranks' scalars, a mapping `b` the same on every rank; every rank gets the
            result of one process running the concatenated batch. A per-sample `b` sends each
            rank's gradient pieces (its samples' layer inputs and output gradients) to the others.
    """
    ga = collect(tape, a, per_sample=True, what="a")
    many = dist.group_size(process_group) > 1
    if b is None:
        shape = (ga.batch,)
        per_param = {n: self_norms(P) for n, P in ga.pieces.items()}
    elif isinstance(b, Mapping):
        shape = (ga.batch,)
        per_param = contract_all([ga.pieces], dense_gradients(tape, b, what="b"))[0]
    elif isinstance(b, torch.Tensor) and b.dim() == 0:
        gb = collect(tape, b, per_sample=False, what="b")
        shape = (ga.batch,)
        if many:
            per_param = contract_all([ga.pieces], aggregated(tape, gb, process_group))[0]
        else:
            per_param = {n: marginals(P, gb.pieces[n], dist.shape(tape.params[n]), need_cols=False)[0]
                         for n, P in ga.pieces.items() if n in gb.pieces}
    else:
        gb = collect(tape, b, per_sample=True, what="b")
        if many:
            per_param, cols = _pairs_across(tape, ga, gb, process_group)
            shape = (ga.batch, cols)
        else:
            shape = (ga.batch, gb.batch)
            per_param = {n: pair_matrix(P, gb.pieces[n]) for n, P in ga.pieces.items() if n in gb.pieces}
    if many:  # every rank's rows, in rank order
        per_param, shape = _gather_rows(tape, per_param, shape, process_group)
    per_group = group_sums(tape, per_param, groups, shape)
    total = sum(per_group.values())
    return Dots(total, per_group, per_param)


def _pairs_across(tape: Tape, ga: Grads, gb: Grads, group) -> tuple[dict, int]:
    """({name: [Ba, Bb of all ranks]}, Bb of all ranks): pair matrices of this rank's `ga` with
    every rank's `gb`, whose pieces each rank broadcasts in turn (pickled, by way of the CPU)."""
    world, me = dist.group_size(group), torch.distributed.get_rank(group)
    blocks: dict[str, list] = {n: [] for n in tape.params}
    batches = []
    for k in range(world):
        src = k if group is None else torch.distributed.get_global_rank(group, k)
        box = [(_moved(gb.pieces, "cpu"), gb.batch) if k == me else None]
        torch.distributed.broadcast_object_list(box, src=src, group=group)
        theirs, batch = box[0]
        theirs = gb.pieces if k == me else _moved(theirs, next(iter(tape.params.values())).device)
        batches.append(batch)
        for n in tape.params:
            P, Q = ga.pieces.get(n), theirs.get(n)
            blocks[n].append(pair_matrix(P, Q) if P and Q else None)
    out = {}
    for n, vs in blocks.items():
        known = [v for v in vs if v is not None]
        if known:
            out[n] = torch.cat([torch.zeros(ga.batch, b, dtype=known[0].dtype, device=known[0].device)
                                if v is None else v for v, b in zip(vs, batches)], 1)
    return out, sum(batches)


def _moved(pieces: dict, device) -> dict:
    def move(p):
        if isinstance(p, PerSample):
            return PerSample(p.grad.to(device))
        return replace(p, left=p.left.to(device), right=p.right.to(device),
                       mask=None if p.mask is None else p.mask.to(device))
    return {n: [move(p) for p in P] for n, P in pieces.items()}


def _gather_rows(tape: Tape, per_param: dict, shape: tuple, group) -> tuple[dict, tuple]:
    """Per-parameter results [B_rank, ...] of every rank, concatenated in rank order along the
    first axis; parameters no rank has a value for stay absent."""
    p0 = next(iter(tape.params.values()))
    dt = acc_dtype(*tape.params.values())
    dev = next(iter(per_param.values())).device if per_param else p0.device
    names = list(tape.params)
    x = torch.stack([per_param[n].to(dt) if n in per_param else torch.zeros(shape, dtype=dt, device=dev) for n in names])
    present = dist.all_reduce_sum(torch.tensor([float(n in per_param) for n in names], device=dev), group)
    rest = x.shape[2:]
    cols = x.movedim(1, -1).reshape(-1, shape[0])               # [P * rest, B_rank]
    cols = dist.gather_columns(cols, group)                      # [P * rest, B_all]
    x = cols.reshape(len(names), *rest, -1).movedim(-1, 1)       # [P, B_all, *rest]
    return {n: x[i] for i, n in enumerate(names) if present[i] > 0}, (x.shape[1], *rest)
