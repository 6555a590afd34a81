"""torch.distributed support for g_effect: data parallelism across processes.

Each rank traces its own micro-batch. The G-effect of the global objective (the sum of the
ranks' objectives) on the global risk (the ranks' risk vectors concatenated in rank order) is
exact when every rank holds the objective's aggregated gradient: per parameter it is formed
locally in the dense form and summed across ranks with one all-reduce (the same traffic as DDP's
gradient reduction), then contracted with the local per-sample pieces. Per-instance values are
gathered in rank order; totals and groups are sums of them. The result on every rank equals a
single-process run on the concatenated batch.

Supported: DistributedDataParallel (or plain replicated modules) on any backend; FSDP2
(``fully_shard``) and DeepSpeed ZeRO-3, whose sharded parameters are contracted shard by shard
(``gefx.shards``: no whole weight is gathered for a product; a rule that needs a weight whole,
such as a norm's, gathers that module's parameters alone and releases them); DeepSpeed ZeRO-1/2,
whose parameters are whole on every rank. DeepSpeed's engine hooks the outputs of its forward to
start its gradient reduction on any backward through them: gefx's partial backward passes run with
those hooks switched off (:func:`engine_hooks_off`). Refused with a clear error: FSDP1
(``FullyShardedDataParallel`` flat parameters), ZeRO-3 with parameters offloaded to NVMe, and
tensor parallelism (a DTensor sharded along another dimension or a multi-dimensional mesh).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn


def group_size(group=None) -> int:
    """World size of `group` when torch.distributed is initialised, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def check_supported(model: nn.Module) -> None:
    """Raise for parallel set-ups whose parameters gefx cannot read or contract exactly."""
    for m in model.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            raise ValueError("FSDP1 (FullyShardedDataParallel) flattens parameters and is not "
                             "supported; use FSDP2 (torch.distributed.fsdp.fully_shard), DeepSpeed ZeRO or DDP")
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    for name, m in model.named_modules() if zero3 else ():
        if hasattr(m, "is_transposed") and hasattr(m, "has_gate") and isinstance(getattr(m, "down_proj", None), nn.Parameter):
            # found on 2 gloo processes (Mixtral, Qwen3-MoE from configs): the backward through the stacked
            # experts of a partial pass meets ZeRO-3's released partitions (size 0), and DeepSpeed's
            # own backward after a measurement fails its bucket assertion
            raise ValueError(f"{name} is a mixture-of-experts block with stacked expert weights: gefx does not "
                             "support it under DeepSpeed ZeRO-3; use ZeRO-1/2 (parameters whole on every rank)")
    for name, p in model.named_parameters():
        where = getattr(getattr(p, "ds_tensor", None), "final_location", None)
        if where is not None and str(getattr(where, "value", where)) == "nvme":
            raise ValueError(f"parameter {name!r} is offloaded to NVMe by DeepSpeed ZeRO-3 (offload_param.device "
                             "= nvme), which gefx does not read; offload to cpu or keep parameters on the device")


def shape(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape (DeepSpeed ZeRO-3 keeps an empty tensor outside its forward)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: a DTensor's (FSDP2), a DeepSpeed ZeRO-3 parameter's gathered
    (collective: every rank of its group must call it for the same parameter), or the tensor."""
    if hasattr(t, "ds_id") and t.numel() != t.ds_numel:
        import deepspeed  # noqa: PLC0415 - only under DeepSpeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def engine_hooks_off(tape):
    """Switch off, for gefx's own partial backward passes, the hooks DeepSpeed's engine puts on the
    outputs of its forward (``OutputBackwardHookManager``, deepspeed 0.16+): on any backward through
    those outputs they start the engine's backward (its gradient reduction runs when the graph
    finishes) and divide the gradient by the accumulation steps. ``tape.engine_hooks`` holds the
    managers of the traced engine's forwards (see :func:`hook_managers`). A no-op without DeepSpeed."""
    saved = [(m, m.preprocess_done, m.preprocess_per_tensor_fn) for m in tape.engine_hooks]
    for m, _, _ in saved:
        m.preprocess_done, m.preprocess_per_tensor_fn = True, None
    try:
        yield
    finally:
        for m, done, per_tensor in saved:
            m.preprocess_done, m.preprocess_per_tensor_fn = done, per_tensor


def hook_managers(model: nn.Module, output) -> list:
    """DeepSpeed's backward-hook managers on the tensors of an engine forward's output (none for
    another model). An engine that runs torch-style backward hooks but left none gefx can see
    (a DeepSpeed version that hooks its outputs differently) is refused: its hooks would run on
    gefx's partial backward passes."""
    if type(model).__name__ != "DeepSpeedEngine":
        return []
    from torch.utils._pytree import tree_flatten  # noqa: PLC0415

    items = list(output.values()) if isinstance(output, dict) else output
    tensors = [t for t in tree_flatten(items)[0] if isinstance(t, torch.Tensor)]
    found = [m for t in tensors for m in getattr(t, "_backward_hook_managers", ())]
    if not found and getattr(model, "_support_torch_style_backward", False) and any(t.grad_fn for t in tensors):
        raise ValueError("this DeepSpeed engine's forward left no backward-hook manager gefx knows "
                         "(_backward_hook_managers on its outputs, as deepspeed 0.19 leaves them): gefx cannot keep the engine's hooks "
                         "off its own gradient passes with this DeepSpeed version; measure without DeepSpeed "
                         "(DDP, FSDP2) or with a tested version")
    return found


@contextlib.contextmanager
def before_engine_step(model: nn.Module, fn):
    """Run ``fn()`` exactly once: just before a DeepSpeed engine's ``step()`` if the block steps it
    (accelerate's ``accelerator.backward`` does, at an accumulation boundary), else when the block
    ends. So ``fn`` (e.g. ``prepared.against(gefx.engine_grads(engine))``) reads the gradient the
    backward left, before the step clips it and (ZeRO-1/2) releases it. Yields a list that holds
    fn's result afterwards. For another model, fn runs when the block ends."""
    done: list = []
    stepping = type(model).__name__ == "DeepSpeedEngine"
    if stepping:
        real = model.step

        def step(*args, **kwargs):
            if not done:
                done.append(fn())
            return real(*args, **kwargs)

        model.step = step
    try:
        yield done
        if not done:
            done.append(fn())
    finally:
        if stepping:
            del model.step  # the class's own step again


def check_engine(model: nn.Module) -> None:
    """Under DeepSpeed, the engine (what deepspeed.initialize, accelerate and the Trainer hand out)
    must be traced, not its module: the engine hooks the outputs of its own forward, which gefx
    must see to keep its hooks off gefx's partial backward passes."""
    if type(model).__name__ == "DeepSpeedEngine":
        return
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in model.parameters()):
        raise ValueError(f"{type(model).__name__}'s parameters belong to a DeepSpeed engine: trace the engine "
                         "(gefx.trace(engine), the model deepspeed.initialize / accelerate return), not its module, "
                         "so that gefx can keep the engine's backward hooks off its own gradient passes")


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
