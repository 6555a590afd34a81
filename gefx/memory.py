"""What a measurement costs in memory on a given model (``gefx check`` reports it).

:class:`LiveBytes` counts, through torch's dispatcher, the bytes of every tensor allocated while
it is active and still alive (by storage: views and in-place results of existing tensors are not
new memory), and their peak. :func:`footprint` runs a plain step (forwards of two batches, the
backward of a gradient-ascent objective) and the same step measured online
(``g_effect(..., backward=True)`` with both batches' NLL as risks), twice each, and returns the
peaks: the extra of the first measurement includes the one-time checks, the second is the steady
state. Tensors only: allocator caching and fragmentation are not counted (on a GPU,
``torch.cuda.max_memory_allocated`` tells the rest).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensors of at least `min_numel` elements allocated while active."""

    def __init__(self, min_numel: int = 1):
        super().__init__()
        self.min_numel = min_numel
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel:
                key = _storage(t)
                if key is not None and key not in self.live and key not in inputs:  # new memory
                    self.live[key] = t.untyped_storage().nbytes()
                    self.now += self.live[key]
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._free, key)
        return out


def _storage(t: torch.Tensor) -> int | None:
    """The address of a tensor's memory; None for tensors without their own (meta tensors, the
    wrappers of torch.func's transforms: what they wrap is counted where it is made)."""
    if t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def footprint(model: nn.Module, a: dict, b: dict) -> dict[str, int]:
    """Peak bytes allocated by a plain step and by an online measurement of it (first, steady) on
    batches `a` (forget: the objective is -NLL(a)) and `b` (retain), with the largest counted
    parameter's size; the model's ``.grad`` is left as it was."""
    from .geffect import g_effect  # the engine, imported here: gefx.memory stays importable on its own
    from .losses import sequence_nll
    from .tape import trace

    def nll(batch):
        return sequence_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])

    def step(measure: bool) -> int:
        with LiveBytes() as meter:
            with trace(model) as tape:
                f, r = nll(a), nll(b)
                if measure:
                    g_effect(tape, -f, {"forget": f, "retain": r}, backward=True)
                else:
                    (-f).sum().backward()
        model.zero_grad(set_to_none=True)
        return meter.peak

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        model.zero_grad(set_to_none=True)
        first = step(True)
        plain = step(False)
        steady = step(True)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    largest = max(p.numel() * p.element_size() for p in params)
    return {"plain": plain, "first": first, "steady": steady, "largest_param": largest,
            "params": sum(p.numel() * p.element_size() for p in params)}
