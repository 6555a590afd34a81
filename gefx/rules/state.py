"""The conditions a rule's verdict holds under (issue 24): what gefx can see of a module's behaviour
and of a call's inputs, and what changed between two states."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..dist import shape as full_shape


# A rule verified on one call is trusted on another only if everything gefx can see that the
# module's computation may depend on is the same: the module's state (module_state) and the call's
# inputs and context. What it cannot see: globals, closures and other objects the forward reads
# (e.g. a config object's fields), tensor values beyond small buffers and attributes.
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_SMALL = 16  # tensor attributes and buffers up to this many elements count by value
_INTERNALS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (training: a part of its own)
_ENGINES = ("ds_", "applied_pre_backward")  # DeepSpeed ZeRO-3's per-module counters, set around each call


def _plain(v):
    """A hashable stand-in for a value that may steer a forward: plain values as they are, tuples
    and lists of them as tuples, small tensors by value, other tensors by shape and dtype; None
    for anything else (not seen)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return tuple(v)
    if isinstance(v, torch.Tensor):
        meta = (tuple(v.shape), v.dtype)
        return (*meta, tuple(v.detach().flatten().tolist())) if v.numel() <= _SMALL and not v.is_meta else meta
    return None


def _hashable(f):
    try:
        hash(f)
        return f
    except TypeError:
        return id(f)


def module_state(m: nn.Module, skip=()) -> tuple:
    """What gefx can see of a module's behaviour, as named parts: its class, the forward bound at
    call time (replaced on the instance or on the class: the function and its code), its forward
    hooks, its training flag, its plain attributes (flags, sizes, epsilons, small tensors; on the
    instance, and on its classes below nn.Module), its own parameters' full shapes and its buffers
    (shape and dtype; small ones by value). `skip`: the handle ids of gefx's own hooks."""
    forward = vars(m).get("forward") or type(m).forward
    func = getattr(forward, "__func__", forward)
    hooks = tuple(_hashable(h) for d in (m._forward_pre_hooks, m._forward_hooks) for k, h in d.items() if k not in skip)
    attrs = tuple(sorted((k, x) for k, v in vars(m).items()
                         if k not in _INTERNALS and not k.startswith(_ENGINES) and (x := _plain(v)) is not None))
    classwide = tuple((k, x) for cls in type(m).__mro__[:type(m).__mro__.index(nn.Module)]
                      for k, v in vars(cls).items() if not k.startswith("__") and (x := _plain(v)) is not None)
    # parameters by their full shape only: sharding (ZeRO-3, FSDP2) and mixed precision swap them
    tensors = (tuple((n, tuple(full_shape(t))) for n, t in m.named_parameters(recurse=False))
               + tuple((n, _plain(t)) for n, t in m.named_buffers(recurse=False)))
    return (("its class", type(m)), ("its forward", (_hashable(forward), _hashable(getattr(func, "__code__", None)))),
            ("its forward hooks", hooks), ("its training flag", m.training), ("its attributes", attrs),
            ("its class's attributes", classwide),
            ("its parameters and buffers", tensors))


def conditions(m: nn.Module, args, kwargs, autocast, skip=()) -> tuple:
    """Everything a recorded call's computation may depend on that gefx can see: the module's
    state, the call's inputs (tensors by shape and dtype, plain values as they are, keyword
    names) and the autocast state."""
    inputs = tuple(_seen(x) for x in tree_flatten((args, kwargs))[0])
    return module_state(m, skip), (inputs, tuple(kwargs), tuple(autocast))


def _seen(x):
    """An input as the conditions see it: a tensor by shape and dtype, a plain value as it is."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype
    plain = _plain(x)
    return type(x) if plain is None else plain


def changed(before: tuple, now: tuple) -> str:
    """What differs between two module states ("" if nothing), named for a refusal."""
    for (part, a), (_, b) in zip(before, now):
        if a != b:
            if part in ("its attributes", "its class's attributes"):
                da, db = dict(a), dict(b)
                keys = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
                return f"{part} {', '.join(repr(k) for k in keys)}"
            return part
    return ""
