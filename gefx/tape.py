"""`gefx.trace`: record the forward calls of a model's parameterised modules.

While the context is open, every call of a module that directly owns a counted parameter is
recorded as a :class:`Call` (the module, its inputs, its tensor outputs). Nothing is copied: the
tape keeps references to tensors the autograd graph holds anyway. Output gradients are obtained
later with ``torch.autograd.grad`` on the recorded outputs (gefx.dots), which never touches
``.grad`` and keeps the graph for the caller's own backward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .dist import check_supported


@dataclass
class Call:
    """One forward call of a recorded module."""

    module: nn.Module
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]            # flattened tensor outputs that require grad
    output_index: list[int]                # their positions in the flattened output
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # input in-place guard
    broadcast: bool = False                # output was [1, ...] and expanded to the model's batch

    def check_unmodified(self) -> None:
        for t, v in self.versions:
            if t._version != v:
                raise RuntimeError(
                    f"an input of {type(self.module).__name__} was modified in place after the "
                    "traced forward; gefx needs the activations as they were (avoid in-place ops "
                    "on layer inputs, or clone them)")


def _counted(model: nn.Module, params) -> dict[int, nn.Parameter]:
    """id -> parameter of the parameters to count (default: all with requires_grad)."""
    in_model = {id(p): p for p in model.parameters()}
    if params is None:
        chosen = [p for p in in_model.values() if p.requires_grad]
    else:
        if hasattr(params, "param_groups"):  # an optimizer
            params = params.param_groups
        chosen = []
        for item in params:
            chosen.extend(item["params"] if isinstance(item, dict) else [item])
    out = {}
    for p in chosen:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must hold tensors (or be an optimizer / param groups), got {type(p).__name__}")
        if id(p) not in in_model:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} in params is not a parameter of the traced model")
        out[id(p)] = p
    if not out:
        raise ValueError("no parameters to count: the model has no parameter with requires_grad "
                         "(or params is empty)")
    return out


class Tape:
    """What :func:`trace` returns: the recorded calls plus the parameter bookkeeping."""

    def __init__(self, model: nn.Module, params: Iterable | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"gefx.trace needs a torch.nn.Module, got {type(model).__name__}")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError("gradient checkpointing re-runs the forward inside backward, which "
                             "gefx does not trace; disable it while measuring")
        if next(model.parameters(), None) is None:
            raise ValueError(f"no parameterised module found in {type(model).__name__}")
        check_supported(model)
        self.model = model
        counted = _counted(model, params)
        # canonical names in model order; a shared parameter gets the first name it appears under
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters():
            if id(p) in counted and id(p) not in self.names:
                self.names[id(p)] = name
        self.params: dict[str, nn.Parameter] = {n: counted[i] for i, n in self.names.items()}
        # module -> [(local attribute name, canonical parameter name)] of its counted direct params
        self.owned: dict[nn.Module, list[tuple[str, str]]] = {}
        for module in model.modules():
            mine = [(local, self.names[id(p)]) for local, p in module.named_parameters(recurse=False)
                    if id(p) in self.names]
            if mine:
                self.owned[module] = mine
        if not self.owned:
            raise ValueError(f"no parameterised module found in {type(model).__name__}")
        self.module_names = {m: n for n, m in model.named_modules(remove_duplicate=False) if m in self.owned}
        self.calls: list[Call] = []
        self._handles: list = []
        self._open = False
        self._closed = False
        self._paused = 0
        self._batch: list[int] = []  # batch size of each model forward in progress

    # -- context protocol -------------------------------------------------------------------
    def __enter__(self) -> "Tape":
        if self._closed:
            raise RuntimeError("this gefx.trace was closed; open a new one")
        for module in self.owned:
            self._handles.append(module.register_forward_hook(self._record, with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(self._enter_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._leave_forward, always_call=True))
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.calls.clear()
        self._open = False
        self._closed = True

    def check_open(self) -> None:
        if not self._open:
            raise RuntimeError("this gefx.trace is closed: call grad_dots / g_effect inside the "
                               "`with gefx.trace(model) as tape:` block")

    @contextlib.contextmanager
    def paused(self):
        """Recompute module forwards (rules, fallbacks) without recording them."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def clear(self) -> None:
        """Forget the calls recorded so far (frees their activations for the next batch)."""
        self.calls.clear()

    # -- recording ---------------------------------------------------------------------------
    def _enter_forward(self, model, args, kwargs) -> None:
        first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
        self._batch.append(first.shape[0] if first is not None else 0)

    def _leave_forward(self, model, args, output) -> None:
        if self._batch:
            self._batch.pop()

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self._paused or not torch.is_grad_enabled():
            return None
        batch = self._batch[-1] if self._batch else 0
        broadcast = (isinstance(output, torch.Tensor) and output.dim() >= 2 and output.shape[0] == 1
                     and batch > 1 and output.requires_grad)
        if broadcast:
            # An output shared by every row of the batch (e.g. GPT-2's position embeddings, computed
            # for positions [1, T]): expand it, a value-identical view, so that its gradient keeps
            # one row per sample instead of their sum.
            output = output.expand(batch, *output.shape[1:])
        flat, _ = tree_flatten(output)
        index = [k for k, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not index:
            return None
        versions = [(t, t._version) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self.calls.append(Call(module, args, kwargs, [flat[k] for k in index], index, versions, broadcast))
        return output if broadcast else None


def trace(model: nn.Module, params: Iterable | None = None) -> Tape:
    """Record the forward calls of `model` while the returned context is open.

    Args:
        model: any ``nn.Module`` (plain PyTorch or Hugging Face). Batch is dimension 0 of every
            recorded input and output.
        params: the parameters whose gradients count: an iterable of parameters, a list of param
            groups, or an optimizer (its ``param_groups``; e.g. LoRA or RMU-style partial
            training). Default: every parameter with ``requires_grad``. A parameter shared by
            several modules (tied embeddings) counts once, with the gradient of all its uses.

    Use :func:`gefx.grad_dots` and :func:`gefx.g_effect` inside the block; the tape is emptied
    and its hooks removed when the block ends. Forwards run under ``torch.no_grad`` are not
    recorded. Gradient checkpointing is not supported.
    """
    return Tape(model, params)
