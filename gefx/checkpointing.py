"""Gradient (activation) checkpointing under :func:`gefx.trace`: exact, or refused by name.

Non-reentrant checkpoints (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, the
default of transformers' ``gradient_checkpointing_enable()`` and of the Trainer's
``gradient_checkpointing=True``) build the ordinary autograd graph in the forward, with the saved
tensors replaced by handles: gefx records the calls inside a segment, their inputs, outputs and
output edges, as without checkpointing. Every backward that needs a saved tensor of the segment
(the step's, and each partial backward gefx runs) re-runs the segment's function under the RNG and
autocast state of the forward; the modules' forward hooks fire again there, inside autograd's
backward. gefx's hooks record nothing while a backward runs in the thread (:func:`in_backward`), so
the tape holds the forward's calls only, and the recomputed values are those of the forward (the
same function on the same inputs with the same random numbers; torch checks shapes and dtypes).

Reentrant checkpoints (``use_reentrant=True``) run the segment under ``torch.no_grad`` and
differentiate it in a separate graph inside the backward: nothing inside is visible to gefx, and
``torch.autograd.grad`` (every partial backward) is refused by torch there. While a trace is open,
a reentrant call whose tensor inputs require grad runs the non-reentrant implementation instead
(:func:`_reentrant`). That is exact: both run the same function on the same inputs, with the RNG
(and autocast) state of the forward restored for the recompute as asked, so the forward's values
are the same; both differentiate the segment by the same backward formulas on the same recomputed
values, and (some input requiring grad) both give the parameters inside their gradient.
The user's ``.grad`` is bit-identical to an untraced reentrant step's (tested on Llama and GPT-2,
float32, dropout; a parameter used in several segments could only differ in the order its
contributions are summed). A reentrant call with no input that requires grad stays reentrant:
its parameters get no gradient in the user's training (torch's known pitfall), and gefx counts
none either (the loss's graph does not reach them).

gefx's own re-runs of a module (``gefx.rules.recompute``: the generic rule, norm rules, the rule
check) run any checkpoint inside the module plainly (:func:`plain`): same values, an ordinary graph.

Memory: inside a segment the graph keeps no activation, so what the tape references stays alive
for gefx alone: the recorded calls' inputs (the layers' activations the rules need), and their
outputs except those of stock ``nn.Linear`` / ``nn.Embedding`` / ``Conv1D`` layers whose outputs
are not views (``gefx.tape``: stand-ins of their shape; no rule reads those values).

Refused, by name of the checkpointed function or module, with the way out (:func:`_refuse`):
``context_fn`` (selective activation checkpointing caches values for one backward only; other
contexts may change what the recompute computes), ``preserve_rng_state=False`` on a segment that
draws random numbers (its recompute would draw other dropout masks than the forward), a
reentrant checkpoint nested inside another checkpointed segment (the outer segment's recompute,
after the trace, would run it reentrantly and save other tensors than the traced forward), and
(``gefx.tape``) an embedding looked up once for the whole batch ([1, T, d]) inside a segment.

The patches (``torch.utils.checkpoint.CheckpointFunction.apply`` and the non-reentrant generator
that ``checkpoint`` calls by its module-global name, so whatever name the caller imported
``checkpoint`` under) are installed when the first trace opens and removed when the last one
closes, even on error; they act process-wide meanwhile (a checkpoint outside the traced model is
routed the same way, with the same values). :func:`rerouted` installs them around other code
(``gefx.check``'s per-sample oracle).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import nn

from .rules import Refused

_lock = threading.Lock()
_open: list = []          # the open tapes (while non-empty, the patches are installed)
_saved: dict = {}         # what the patches replaced
_state = threading.local()


def in_backward() -> bool:
    """Whether autograd is running a backward in this thread: a checkpointed segment's recompute
    runs its modules' forwards there, and gefx records nothing then."""
    return torch._C._current_graph_task_id() != -1


def _get(name: str) -> int:
    return getattr(_state, name, 0)


@contextlib.contextmanager
def _count(name: str):
    setattr(_state, name, _get(name) + 1)
    try:
        yield
    finally:
        setattr(_state, name, _get(name) - 1)


def depth() -> int:
    """How many checkpointed segments' forwards this thread is inside (while a trace is open)."""
    return _get("depth")


def plain():
    """While gefx re-runs a module on its recorded inputs, checkpoints inside it run their
    function plainly (same values; an ordinary graph, local to the re-run)."""
    return _count("plain")


# -- installing --------------------------------------------------------------------------------
def install(tape) -> None:
    """Route reentrant checkpoints and check non-reentrant ones while `tape` is open."""
    import torch.utils.checkpoint as cp

    with _lock:
        if not _open:
            _saved["apply"] = vars(cp.CheckpointFunction).get("apply")
            _saved["generator"] = cp._checkpoint_without_reentrant_generator
            _saved["original_apply"] = cp.CheckpointFunction.apply
            cp.CheckpointFunction.apply = staticmethod(functools.partial(_reentrant, _saved["original_apply"]))
            cp._checkpoint_without_reentrant_generator = functools.partial(_non_reentrant, _saved["generator"])
        _open.append(tape)


@contextlib.contextmanager
def rerouted():
    """The same routing outside a trace (e.g. around a forward that an oracle differentiates with
    ``torch.autograd.grad``, which torch refuses through reentrant checkpoints)."""
    token = object()
    install(token)
    try:
        yield
    finally:
        uninstall(token)


def uninstall(tape) -> None:
    import torch.utils.checkpoint as cp

    with _lock:
        if tape not in _open:
            return
        _open.remove(tape)
        if not _open:
            if _saved["apply"] is None:
                del cp.CheckpointFunction.apply
            else:
                cp.CheckpointFunction.apply = _saved["apply"]
            cp._checkpoint_without_reentrant_generator = _saved["generator"]
            _saved.clear()


# -- the patches -------------------------------------------------------------------------------
def _reentrant(original, function, preserve_rng_state, *args):
    """``CheckpointFunction.apply`` while a trace is open."""
    if _get("plain"):
        return function(*args)
    grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if not grad or in_backward():
        return original(function, preserve_rng_state, *args)
    if _get("depth"):
        _refuse(function, "is a reentrant checkpoint (use_reentrant=True) nested inside another checkpointed "
                "segment: gefx runs reentrant checkpoints non-reentrantly while a trace is open, which the outer "
                "segment's recompute after the trace would not repeat",
                "use use_reentrant=False for the inner checkpoint (or checkpoint only the outer segment)")
    import torch.utils.checkpoint as cp

    return cp.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)


def _non_reentrant(original, fn, preserve_rng_state, context_fn, *rest, **kwargs):
    """``torch.utils.checkpoint._checkpoint_without_reentrant_generator(fn, preserve_rng_state,
    context_fn, determinism_check, debug, [early_stop,] *args, **kwargs)`` while a trace is open (a
    generator: ``checkpoint`` advances it once before running `fn` and once after)."""
    import torch.utils.checkpoint as cp

    if _get("plain"):
        yield
        return
    inner = original(fn, preserve_rng_state, context_fn, *rest, **kwargs)
    if not torch.is_grad_enabled() or in_backward():
        yield from inner
        return
    if context_fn is not cp.noop_context_fn:
        inner.close()
        _refuse(fn, "has a context_fn (e.g. selective activation checkpointing, which keeps its saved values "
                "for one backward only, while gefx's partial backward passes and the step's own each recompute "
                "the segment; other contexts may change what the recompute computes)",
                "checkpoint it without context_fn (plain checkpointing is exact under gefx), or measure "
                "without checkpointing")
    before = None if preserve_rng_state else _rng_states(rest)
    with _count("depth"):
        yield from inner
    if before is not None and _rng_states(rest) != before:
        _refuse(fn, "draws random numbers (dropout) and is checkpointed with preserve_rng_state=False: its "
                "recompute draws other masks than the forward, so the gradients of every backward differ "
                "from the traced forward's",
                "keep preserve_rng_state=True (the default), or measure in eval mode")


def _rng_states(args) -> list:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = sorted({a.device.index for a in args if isinstance(a, torch.Tensor) and a.is_cuda
                          and a.device.index is not None} | {torch.cuda.current_device()})
        states += [torch.cuda.get_rng_state(d) for d in devices]
    return [s.tolist() for s in states]


def _refuse(fn, problem: str, fix: str):
    what, names = _describe(fn)
    raise Refused(f"the checkpointed segment {what} {problem}; gefx cannot measure it exactly: {fix}", names)


def _describe(fn) -> tuple[str, list[str]]:
    """The checkpointed module's path in a traced model (HF layers pass ``partial(forward, layer,
    ...)``; a bound method: its module and name), else the function's name; and the counted
    parameters below that module."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.args[0] if target.args and isinstance(target.args[0], nn.Module) else target.func
    method = getattr(target, "__name__", None) if isinstance(getattr(target, "__self__", None), nn.Module) else None
    target = getattr(target, "__self__", target)
    if not isinstance(target, nn.Module):
        return f"`{getattr(target, '__qualname__', None) or type(target).__name__}`", []
    how = f".{method}" if method not in (None, "forward", "__call__", "_wrapped_call_impl", "_call_impl") else ""
    for tape in list(_open):
        model = getattr(tape, "model", None)
        for name, m in (model.named_modules() if isinstance(model, nn.Module) else ()):
            if m is target:
                names = [tape.names[id(p)] for p in m.parameters() if id(p) in tape.names]
                return f"`{(name or type(model).__name__) + how}` ({type(target).__name__})", names
    return f"`{type(target).__name__}{how}`", []
