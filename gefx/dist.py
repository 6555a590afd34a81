"""torch.distributed support for g_effect: data parallelism across processes.

Each rank traces its own micro-batch. The G-effect of the global objective (the sum of the
ranks' objectives) on the global risk (the ranks' risk vectors concatenated in rank order) is
exact when every rank holds the objective's aggregated gradient: per parameter it is formed
locally in the dense form and summed across ranks with one all-reduce (the same traffic as DDP's
gradient reduction), then contracted with the local per-sample pieces. Per-instance values are
gathered in rank order; totals and groups are sums of them. The result on every rank equals a
single-process run on the concatenated batch.

Supported: DistributedDataParallel (or plain replicated modules) on any backend, and FSDP2
(``fully_shard``) whose DTensor parameters are read with ``full_tensor()`` where a rule needs
them. Refused with a clear error: FSDP1 (``FullyShardedDataParallel`` flat parameters) and
DeepSpeed (ZeRO-3 partitioned parameters; ZeRO-1/2 gradient hooks, which fire on gefx's partial
backward passes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def group_size(group=None) -> int:
    """World size of `group` when torch.distributed is initialised, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def check_supported(model: nn.Module) -> None:
    """Raise for parallel set-ups whose parameters gefx cannot see whole."""
    for m in model.modules():
        name = type(m).__name__
        if name == "FullyShardedDataParallel":
            raise ValueError("FSDP1 (FullyShardedDataParallel) flattens parameters and is not "
                             "supported; use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP")
        if name == "DeepSpeedEngine":
            raise ValueError("DeepSpeed engines are not supported (ZeRO-3 partitions parameters "
                             "outside torch); use DDP or FSDP2")
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for p in model.parameters()):
        raise ValueError("DeepSpeed ZeRO-3 partitioned parameters are not supported; use DDP or FSDP2")
    if any(hasattr(p, "_hp_mapping") for p in model.parameters()):
        # ZeRO-1/2 hook every parameter's gradient accumulation and run their reduction epilogue at
        # the end of any backward, including gefx's partial ones to layer outputs (which then fail
        # inside DeepSpeed and may leave its gradient buffers half-reduced)
        raise ValueError("DeepSpeed ZeRO-1/2 (deepspeed.initialize) is not supported: its gradient hooks run on "
                         "gefx's partial backward passes; use DDP or FSDP2, or measure on a copy of the model "
                         "outside the engine")


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2 / tensor parallel), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def gather_columns(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate [G, B_rank] tensors of every rank along dim 1, in rank order."""
    world = group_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[1]], device=x.device), group=group)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros(x.shape[0], most, dtype=x.dtype, device=x.device)
    padded[:, :x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :int(s.item())] for p, s in zip(parts, sizes)], dim=1)
