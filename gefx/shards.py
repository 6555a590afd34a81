"""Parameters sharded across the ranks (FSDP2's ``fully_shard``, DeepSpeed ZeRO-3): the dense-side
products of ``gefx.pieces`` done one shard at a time, never with a whole weight.

A sharded parameter of full shape S is held flat and row-major, rank k owning the flat range
``Layout.ranges[k]`` (FSDP2: whole rows of dimension 0, ``torch.chunk`` sizes; ZeRO-3: equal flat
partitions, the last one short). With P_i the per-sample gradient pieces of a rank's own samples:

    aggregate:  rank k gets sum over ranks and samples of grad_i restricted to its range: every rank
                forms its samples' sum on range k from the rows the range touches
                (``pieces.dense_range``) and reduces it to rank k; k = 0..world-1 in turn.
                Sent per rank: the parameter's size (world-1)/world, as a reduce-scatter.
    contract:   <grad_i, m> for a sharded m: rank k broadcasts its range of m, every rank
                contracts its samples' pieces with it (``pieces.contract_range``) and adds up.
                Received per rank: the parameter's size (world-1)/world, as an all-gather.

Memory: besides this rank's shard of the objective's aggregate (as the engine keeps its gradient
shard), one range of one parameter in flight, its products formed in row blocks of ~16 MiB
(``pieces.dense_range`` / ``contract_range``), never the whole weight. Every rank must run the same
products in the same order (each is collective); gefx's callers iterate over the traced parameters
in model order, and contract every risk against one broadcast of each shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .pieces import Piece, contract, contract_range, dense_range
from .precision import acc_dtype, sq_sum


@dataclass(frozen=True)
class Layout:
    shape: torch.Size                   # the parameter's full shape
    ranges: tuple[tuple[int, int], ...]  # flat [start, end) owned by each rank of `group`
    group: object                        # the process group it is sharded over (None: the world)
    me: int                              # this rank's index in `group`

    def src(self, k: int) -> int:
        """Global rank of the group's k-th member (collectives name global ranks)."""
        return k if self.group is None else dist.get_global_rank(self.group, k)


@dataclass
class Sharded:
    """A tensor of a sharded parameter's full shape of which this rank holds `local`, its flat
    range ``layout.ranges[layout.me]`` (e.g. FSDP2's reduce-scattered ``.grad``)."""

    local: torch.Tensor
    layout: Layout

    @property
    def shape(self) -> torch.Size:
        return self.layout.shape


def layout(p: torch.Tensor, name: str = "a parameter") -> Layout | None:
    """How `p` is sharded, or None where every rank holds it whole. Refuses tensor parallelism."""
    if hasattr(p, "ds_id") and hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3
        group = getattr(p, "ds_process_group", None)
        world, part, numel = dist.get_world_size(group), p.ds_tensor.ds_numel, p.ds_numel
        ranges = tuple((min(k * part, numel), min((k + 1) * part, numel)) for k in range(world))
        return Layout(torch.Size(p.ds_shape), ranges, group, dist.get_rank(group))
    placements = getattr(p, "placements", None)
    if placements is None:
        return None
    kinds = {type(x).__name__ for x in placements}
    if kinds == {"Replicate"}:
        return None
    if len(placements) != 1 or kinds != {"Shard"} or placements[0].dim != 0:
        raise ValueError(f"{name} is a DTensor placed {tuple(placements)}: gefx contracts parameters sharded "
                         "along dimension 0 over one mesh dimension (FSDP2's fully_shard), not tensor-parallel "
                         "or multi-dimensional (HSDP) layouts; use fully_shard on a 1-D mesh, or DDP")
    group = p.device_mesh.get_group()
    world, rows = dist.get_world_size(group), p.shape[0]
    per_row = p.numel() // max(rows, 1)
    chunk = -(-rows // world)
    ranges = tuple((min(k * chunk, rows) * per_row, min((k + 1) * chunk, rows) * per_row) for k in range(world))
    return Layout(p.shape, ranges, group, dist.get_rank(group))


def check(model) -> None:
    for name, p in model.named_parameters():
        layout(p, repr(name))


def sharded(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor | Sharded:
    """`value` (a tensor of p's full shape, or of its local shard) as gefx reads it: a Sharded
    for a sharded p, whose values this rank owns, else the tensor itself."""
    lay = layout(p)
    if lay is None:
        return value.full_tensor() if hasattr(value, "full_tensor") else value
    start, end = lay.ranges[lay.me]
    local = value.to_local() if hasattr(value, "to_local") else value
    if local.numel() == lay.shape.numel() and end - start != local.numel():  # given whole
        local = local.flatten()[start:end]
    local = local.flatten()[:end - start]  # ZeRO-3 pads the last partition
    if local.numel() != end - start:
        raise ValueError(f"a value of shape {tuple(value.shape)} is neither the full tensor {tuple(lay.shape)} "
                         f"nor this rank's shard ({end - start} elements)")
    return Sharded(local.detach(), lay)


def aggregate(P: list[Piece] | None, p: torch.Tensor, lay: Layout, device) -> Sharded:
    """The ranks' summed gradient of pieces P (None: none on this rank), this rank's range of it;
    `device`: where the forward computed (ZeRO-3 may keep the partitions elsewhere, offloaded)."""
    dt = acc_dtype(p)
    mine = None
    for k, (start, end) in enumerate(lay.ranges):
        part = (dense_range(P, lay.shape, start, end) if P else
                torch.zeros(end - start, dtype=dt, device=device))
        dist.reduce(part, dst=lay.src(k), op=dist.ReduceOp.SUM, group=lay.group)
        if k == lay.me:
            mine = part
    return Sharded(mine, lay)


def contract_with(sets: list, m) -> list:
    """For each piece list P in `sets` (None: no pieces on this rank), [batch] <grad_i, m> for m a
    tensor or a Sharded (collective: each shard is broadcast once, for all sets; None where P is)."""
    if not isinstance(m, Sharded):
        return [contract(P, m) if P else None for P in sets]
    lay, out = m.layout, [None] * len(sets)
    for k, (start, end) in enumerate(lay.ranges):
        buf = m.local if k == lay.me else torch.empty(end - start, dtype=m.local.dtype, device=m.local.device)
        dist.broadcast(buf, src=lay.src(k), group=lay.group)
        for j, P in enumerate(sets):
            if P:
                v = contract_range(P, buf, lay.shape, start, end)
                out[j] = v if out[j] is None else out[j] + v
    return out


def finite(m) -> bool:
    """Whether every entry of a tensor or a Sharded is finite (the same answer on every rank)."""
    if not isinstance(m, Sharded):
        return bool(torch.isfinite(m).all())
    bad = (~torch.isfinite(m.local)).sum().to(torch.float64)
    dist.all_reduce(bad, group=m.layout.group)
    return not bool(bad > 0)


def sq_norm(m) -> torch.Tensor:
    """||m||^2 of a tensor or a Sharded (summed over its ranks)."""
    if not isinstance(m, Sharded):
        return sq_sum(m)
    s = sq_sum(m.local)
    dist.all_reduce(s, group=m.layout.group)
    return s



def engine_grads(model) -> dict:
    """The training step's gradient as the engine holds it after its backward, keyed by parameter,
    for ``gefx.prepare(...).against`` or ``g_effect(tape, grads, ...)``: ``p.grad`` (DDP: the
    ranks' mean; FSDP2: this rank's shard of it, a DTensor), DeepSpeed ZeRO-3: this rank's partition
    of the reduced gradient (``deepspeed.utils.safe_get_local_grad``, no gather), ZeRO-1/2:
    ``safe_get_full_grad`` (whole, as every rank holds the parameters whole). DeepSpeed reduces the
    mean over the ranks of loss / gradient_accumulation_steps. Collective under DeepSpeed: every
    rank calls it, after ``engine.backward`` and before ``engine.step``."""
    out = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_local_grad  # noqa: PLC0415 - only under DeepSpeed

            g = safe_get_local_grad(p)
            out[p] = None if g is None else sharded(p, g)
        elif hasattr(p, "_hp_mapping"):
            from deepspeed.utils import safe_get_full_grad  # noqa: PLC0415

            try:
                out[p] = safe_get_full_grad(p)
            except ValueError as exc:  # mid-accumulation or after the step
                raise ValueError(f"DeepSpeed ZeRO-1/2 does not give its reduced gradient here ({exc}): it is "
                                 "readable after the backward of an accumulation boundary's micro-batch, before "
                                 "engine.step (gefx.before_engine_step); elsewhere measure before the step "
                                 "(g_effect of the loss)") from exc
        else:
            out[p] = p.grad
    return out
