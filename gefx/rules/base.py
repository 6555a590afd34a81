"""The common base of the module rules: a rule, the registry, the errors, and the helpers every
kind uses to read a recorded call (its rows, its inputs, a re-run of its forward)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_map


class Refused(ValueError):
    """gefx cannot give an exact number for this model or input, and says why and what to do.
    `names` lists the counted parameters concerned (empty: the loss or the model as a whole)."""

    def __init__(self, message: str, names=()):
        super().__init__(message)
        self.names = list(names)


@dataclass(frozen=True)
class Rule:
    name: str
    pieces: Callable             # (tape, call, grads) -> {local parameter name: Piece}
    covers: Callable[[nn.Module], list[str]]
    batch_dim: Callable[[nn.Module], int] | None = None   # None: found per call (gefx.soundness.batch_dim)
    exact: bool = False          # exact by construction (autograd of the module itself): not verified
    streams: bool = False        # forms pieces from the recorded tensors alone (inside a streamed backward)
    stock: Callable[[nn.Module], bool] | None = None  # the module is exactly the class this rule is
                                 # exact for by construction (see gefx.rules.verify.stock)
    note: Callable | None = None  # (tape, call, outs, leaves) -> extra Verdict fields, after a verification


_RULES: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def own_params(m: nn.Module) -> list[str]:
    """The module's own parameters and those of its parameter containers (ParameterDict/List),
    which have no forward of their own (e.g. PEFT's lora_embedding_A)."""
    names = [n for n, _ in m.named_parameters(recurse=False)]
    for child_name, child in m.named_children():
        if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
            names += [f"{child_name}.{n}" for n, _ in child.named_parameters(recurse=False)]
    return names


def all_params(m: nn.Module) -> list[str]:
    return [n for n, _ in m.named_parameters(remove_duplicate=False)]


def register_rule(predicate: Callable[[nn.Module], bool] | type, rule: Callable | Rule, *,
                  covers: Callable[[nn.Module], list[str]] | str | None = None,
                  batch_dim: Callable[[nn.Module], int] | int | None = None) -> None:
    """Register `rule(tape, call, grads) -> {local parameter name: Piece or [Piece, ...]}` for
    modules accepted by `predicate` (a callable, or a class matched with isinstance).

    `grads` aligns with ``call.outputs`` (zeros where a loss does not reach an output); the rows
    of every recorded tensor group into ``call.samples`` samples (use ``rows(call, x, d)``).
    `covers` names the parameters the rule accounts for: "own" (the default: the module's own and
    its parameter containers'), "all" (every parameter below the module: its submodules are then not
    recorded separately, e.g. ``register_rule(MyBlock, gefx.rules.GENERIC, covers="all")``) or a
    callable module -> local names. `batch_dim` is the dimension of the module's inputs and outputs
    that holds the batch (default: found per call, 0 or 1). A rule other than GENERIC is verified
    against autograd on the first call of each module; if it does not fit, the generic rule is
    used for that module. `rule` may also be a :class:`Rule` (covers and batch_dim then override
    its own when given).
    """
    pred = (lambda m, cls=predicate: isinstance(m, cls)) if isinstance(predicate, type) else predicate
    cov = {"own": own_params, "all": all_params}.get(covers, covers) if isinstance(covers, str) else covers
    if cov is not None and not callable(cov):
        raise ValueError(f"covers must be 'own', 'all' or a callable, got {covers!r}")
    dim = (lambda m, d=batch_dim: d) if isinstance(batch_dim, int) else batch_dim
    if isinstance(rule, Rule):
        rule = replace(rule, covers=cov or rule.covers, batch_dim=dim if dim is not None else rule.batch_dim)
    else:
        rule = Rule(getattr(rule, "__name__", "custom"), rule, cov or own_params, dim)
    _RULES.insert(0, (pred, rule))


def rule_for(module: nn.Module) -> Rule:
    return next(rule for pred, rule in _RULES if pred(module))


# -- helpers ------------------------------------------------------------------------------------
def _input(call) -> torch.Tensor:
    x = call.args[0] if call.args else next(iter(call.kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(call.module).__name__}: first input is not a tensor")
    return x


def rows(call, x: torch.Tensor, d: int | None = None) -> torch.Tensor:
    """x read as [samples, T, d] (or [samples, T] ids for d=None): the rows of x's batch
    dimension grouped into ``call.samples`` samples, the rest flattened."""
    if x.dim() < 1:
        raise Refused(f"{type(call.module).__name__}: a recorded tensor of shape {tuple(x.shape)} "
                      "has no batch dimension")
    x = x.movedim(call.batch_dim, 0) if call.batch_dim else x
    return x.reshape(call.samples, -1) if d is None else x.reshape(call.samples, -1, d)


def _copied(tree):
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _cast(tree, dt):
    return tree_map(lambda x: x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


@contextlib.contextmanager
def _replay(call, seen: dict | None = None):
    """The random-number and autocast state the module's forward ran under; the global RNG state
    is restored afterwards. `seen["drew"]` tells whether the re-run drew random numbers."""
    devices = [d for d in call.rng if d != "cpu"]
    with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
        torch.set_rng_state(call.rng["cpu"])
        for d in devices:
            torch.cuda.set_rng_state(call.rng[d], d)
        for device_type, dtype in call.autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield
        if seen is not None:
            seen["drew"] = not torch.equal(torch.get_rng_state(), call.rng["cpu"]) or any(
                not torch.equal(torch.cuda.get_rng_state(d), call.rng[d]) for d in devices)


def recompute(tape, call, params: dict[str, torch.Tensor], args=None, kwargs=None, seen: dict | None = None):
    """Re-run ``call.module.forward`` (not its hooks: the recorded inputs are those after its
    pre-hooks and the recorded outputs those before its other forward hooks) on copies of the
    recorded inputs, with `params` substituted, on copies of the module's buffers (a forward that
    updates statistics or its inputs in place leaves the model's untouched), with its plain
    tensor attributes as the call saw them (a recurrent state it rebinds), under the recorded RNG
    and autocast state, with gefx's hooks paused."""
    m = call.module
    args = _copied(call.args) if args is None else args
    kwargs = _copied(call.kwargs) if kwargs is None else kwargs
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    now = {k: v for k, v in vars(m).items() if k in call.state}
    vars(m).update(call.state)  # plain attributes as the call saw them (a recurrent state)
    try:
        with tape.paused(), torch.enable_grad(), _replay(call, seen), _reparametrize_module(m, {**buffers, **params}):
            return m.forward(*args, **kwargs)
    finally:
        vars(m).update(now)


def _outputs(call, out) -> list[torch.Tensor]:
    flat, _ = tree_flatten(out)
    if call.broadcast:
        b = call.outputs[0].shape[0]
        flat = [x.expand(b, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
                for x in flat]
    try:
        return [flat[k] for k in call.output_index]
    except (IndexError, TypeError) as exc:
        raise Refused(f"re-running {call.name} gives a different output structure than its recorded "
                      "call; gefx cannot handle this module") from exc
