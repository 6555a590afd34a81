"""`gefx.trace`: record the forward calls of the modules whose rules cover the counted parameters.

While the context is open, every call of such a module (see ``gefx.rules``: by default a module
that directly owns a counted parameter) is recorded as a :class:`Call`: the module, its inputs,
its tensor outputs and the autograd edges they had when the module produced them. Nothing is
copied: the tape keeps references to tensors the autograd graph holds anyway. gefx's hooks run
before any other forward hook of the module (a hook that rewrites the output acts downstream of
what gefx records), and output gradients are taken at the recorded edges, i.e. with respect to
the values the module produced even if they are changed in place later. Before anything is
contracted, ``gefx.soundness`` proves on the autograd graph that the losses reach the counted
parameters only through recorded calls whose rules account for them, and checks the per-sample
contract.

Gradient checkpointing (``gefx.checkpointing``): the forward of a checkpointed segment is recorded
as any other; its recompute, which every backward through the segment runs (the step's and each
of gefx's partial ones), runs inside autograd's backward, where nothing is recorded
(``in_backward``). Reentrant checkpoints run non-reentrantly while the trace is open. Inside a
segment the graph keeps no activation, so the tape is what keeps the recorded calls' inputs and
outputs alive: the outputs of stock ``nn.Linear`` / ``nn.Embedding`` / ``Conv1D`` layers, whose
rules never read them, are replaced there by stand-ins of their shape (one element, stride 0).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

from . import checkpointing, shards
from .checkpointing import in_backward
from .dist import check_engine, check_supported, hook_managers
from .rules import GENERIC, Refused, Rule, conditions, own_params, rule_for, stock
from .soundness import Graph


@dataclass(eq=False)
class Call:
    """One forward call of a recorded module."""

    module: nn.Module
    name: str                              # the module's path in the model
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]            # flattened tensor outputs that require grad (stand-ins of their
                                           # shape inside a checkpointed segment where no rule reads them)
    output_index: list[int]                # their positions in the flattened output
    edges: list                            # their autograd edges when the module returned them
    out_versions: list[int]                # their version counters then
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # inputs, for the in-place guard
    input_nodes: set = field(default_factory=set)   # autograd nodes of the inputs that require grad
    broadcast: bool = False                # output was [1, ...] and expanded to the model's batch
    batch: int = 0                         # batch size of the model forward the call ran in
    length: int = 0                        # its sequence length (dimension 1 of its first input)
    rng: dict = field(default_factory=dict)         # RNG states before the call ("cpu", cuda devices)
    autocast: list = field(default_factory=list)    # [(device type, dtype)] autocast active at the call
    bases: list = field(default_factory=list)       # per output: (base edge, size, stride, offset) of a view
    state: dict = field(default_factory=dict)       # plain tensor (or None) attributes before the call
    span: tuple = (0, 0, 0)                # autograd node numbers created during the call [start, end),
                                           # and the call's entry order (inner calls after outer ones)
    conditions: tuple | None = None        # what its rule's verdict is keyed on (gefx.rules.conditions);
                                           # None for stock modules and exact rules
    # set per loss by gefx.collect.pieces_from before a rule runs:
    samples: int = 0                       # how many samples the batch rows group into (1: summed)
    batch_dim: int = 0
    memo: dict = field(default_factory=dict)        # per-call values shared by the losses of a trace

    def targets(self) -> list:
        """The autograd edges at which each output's gradient is taken now: the output's own edge,
        or, for a view output changed in place since (autograd then drops the view's node), the
        edge its base had when the module returned it (see :meth:`as_output`)."""
        return [b[0] if b is not None and o._version != v else e
                for o, v, e, b in zip(self.outputs, self.out_versions, self.edges, self.bases)]

    def as_output(self, k: int, g: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient taken at ``targets()[k]`` as the gradient of output k as recorded."""
        b = self.bases[k]
        if g is None or b is None or self.outputs[k]._version == self.out_versions[k]:
            return g
        _, size, stride, offset = b
        return g.contiguous().as_strided(size, stride, offset)

    def check_unmodified(self) -> None:
        for t, v in self.versions:
            if t._version != v:
                raise Refused(f"an input of {self.name} ({type(self.module).__name__}) was modified in place "
                              "after the traced forward; gefx needs the activations as they were (avoid "
                              "in-place ops on layer inputs, or clone them)")


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


def _claims(model: nn.Module, names: dict[int, str]):
    """module -> [(local name, canonical name)] of the counted parameters its rule covers, and
    module -> rule. A parameter an ancestor's rule covers as a submodule's (nn.MultiheadAttention's
    out_proj) is not claimed again below it; one an ancestor holds itself and a submodule holds too
    (a tied bias, BERT's decoder.bias = bias) is claimed by the submodule, whose forward uses it;
    one shared by separate modules (tied embeddings) is claimed by each."""
    parent: dict[nn.Module, nn.Module] = {}
    for m in model.modules():
        for child in m.children():
            parent.setdefault(child, m)

    def ancestor(a, m):
        while m in parent:
            m = parent[m]
            if m is a:
                return True
        return False

    holders: dict[int, list[tuple]] = {}  # parameter id -> [(module, local, held by the module itself)]
    claims: dict[nn.Module, list[tuple[str, str]]] = {}
    for m in model.modules():
        if isinstance(m, (nn.ParameterDict, nn.ParameterList)):  # no forward: its parent claims them
            continue
        rule = rule_for(m)
        own = set(own_params(m))
        for local in rule.covers(m):
            p = m.get_parameter(local)
            if id(p) not in names:
                continue
            above = [h for h in holders.get(id(p), ()) if ancestor(h[0], m)]
            if any(not itself for _, _, itself in above):
                continue
            for h in above:  # tied: the inner module uses it
                claims[h[0]].remove((h[1], names[id(p)]))
                holders[id(p)].remove(h)
            claims.setdefault(m, []).append((local, names[id(p)]))
            holders.setdefault(id(p), []).append((m, local, local in own))
    owned = {m: c for m, c in claims.items() if c}
    # modules below a rule that covers its submodules' parameters ("all"): neither claimants nor hosts
    absorbed = {d for m in owned if any(not itself for h in holders.values() for mm, _, itself in h if mm is m)
                for d in m.modules() if d is not m}
    return owned, {m: rule_for(m) for m in owned}, absorbed


def _tensors(obj):
    """The tensors in nested tuples, lists and dicts (a call's inputs; faster than a pytree
    flatten of the objects HF passes along, such as caches, which hold no input)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _node_number() -> int:
    """The number the next autograd node created in this thread gets (nodes are numbered in
    creation order): the span of a module's forward tells which nodes its forward created."""
    peek = getattr(torch._C._autograd, "_get_sequence_nr", None)
    if peek is not None:
        return peek()
    return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


def _base(o: torch.Tensor):
    """(edge, size, stride, offset) of a view output's contiguous base, to take the output's
    gradient from if the view is changed in place later; None for a non-view."""
    base = o._base
    if base is None or not base.requires_grad or not base.is_contiguous():
        return None
    return get_gradient_edge(base), o.size(), o.stride(), o.storage_offset() - base.storage_offset()


class Counted:
    """The parameter bookkeeping of a trace: which parameters are counted and under which
    canonical names, which recorded module owns each (``owned``) and which rule covers it
    (``rules``), and the *hosts* (modules with counted parameters below them and no claim of their
    own). :class:`Tape` records calls on top of it."""

    def __init__(self, model: nn.Module, params: Iterable | None = None):
        if next(model.parameters(), None) is None:
            raise ValueError(f"no parameterised module found in {type(model).__name__}")
        self.model = model
        counted = _counted(model, params)
        # canonical names in model order; a shared parameter gets the first name it appears under
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters():
            if id(p) in counted and id(p) not in self.names:
                self.names[id(p)] = name
        self.params: dict[str, nn.Parameter] = {n: counted[i] for i, n in self.names.items()}
        # parameter path -> canonical name, and the tensors a forward uses in their place (FSDP2
        # swaps in unsharded copies during the forward): id -> canonical name, see canonical()
        self._paths = {path: self.names[id(p)] for path, p in model.named_parameters(remove_duplicate=False)
                       if id(p) in self.names}
        self._aliases: dict[int, str] = {}
        self.owned, self.rules, absorbed = _claims(model, self.names)  # module -> [(local, canonical)] / Rule
        if not self.owned:
            raise ValueError(f"no parameterised module found in {type(model).__name__}")
        counted_ids = set(self.names)
        # hosts: modules with counted parameters below them and no claim of their own; their calls
        # are recorded too, so that a parameter a host's forward uses functionally (a child's conv
        # weight in an SSM mixer) can be attributed to it (gefx.soundness) and handled there
        self.hosts_of = [m for m in model.modules() if m not in self.owned and m not in absorbed
                         and not isinstance(m, (nn.ParameterDict, nn.ParameterList))
                         and any(id(p) in counted_ids for p in m.parameters())]
        self.module_names = {m: n for n, m in model.named_modules(remove_duplicate=False)
                             if m in self.owned or m in self.hosts_of}
        self.calls: list[Call] = []
        self.group_cache: dict = {}  # groups preset -> resolved groups (gefx.groups.resolve)

    def rule(self, module: nn.Module) -> Rule:
        return self.rules[module]

    def canonical(self, tensor) -> str | None:
        """The canonical name of a counted parameter, or of the tensor a forward used in its place
        (FSDP2's unsharded parameters, seen by the recorded calls); None for anything else."""
        return self.names.get(id(tensor)) or self._aliases.get(id(tensor))

    def promote(self, call: Call) -> None:
        """A host's call becomes a recorded call, handled by the generic rule."""
        if call not in self.calls:
            self.calls.append(call)
            self.rules.setdefault(call.module, GENERIC)
            self.owned.setdefault(call.module, [])

    def claim(self, call: Call, local: str, name: str) -> None:
        """Let the generic rule of `call`'s module cover parameter `name` (`local` below the module),
        which gefx.soundness found used functionally in its forward."""
        self.promote(call)
        self.owned[call.module].append((local, name))
        self.group_cache.clear()


class Recorder(Counted):
    """The forward hooks of a trace: each forward of a claimed module (or of a host) becomes a
    :class:`Call` in ``calls`` (``hosts``), with what its rule and the checks need later: inputs,
    outputs and the autograd edges they had, RNG and autocast state, the node-number span of its
    forward, the conditions its rule's verdict is keyed on."""

    def __init__(self, model: nn.Module, params: Iterable | None = None):
        super().__init__(model, params)
        self.hosts: list[Call] = []  # calls of host modules (promoted into calls when needed)
        self.hook_ids: set = set()   # gefx's own hooks (not part of a module's state)
        self.engine_hooks: list = []  # DeepSpeed's hooks on the traced engine's outputs (gefx.dist.engine_hooks_off)
        self._paused = 0
        self._batch: list[tuple] = []  # (batch, length) of each model forward in progress
        self._before: dict[nn.Module, tuple] = {}  # RNG state, node number and entry order at the pre-hook
        self._zeros: dict = {}  # (dtype, device) -> a zero scalar, expanded into stand-ins (see _record)
        self._entered = 0

    @contextlib.contextmanager
    def paused(self):
        """Recompute module forwards (rules, fallbacks) without recording them; checkpoints inside
        them run plainly (gefx.checkpointing.plain)."""
        self._paused += 1
        try:
            with checkpointing.plain():
                yield
        finally:
            self._paused -= 1

    # -- recording ---------------------------------------------------------------------------
    def _enter_forward(self, model, args, kwargs) -> None:
        if in_backward():  # the model's forward re-run by a checkpoint's recompute
            return
        first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
        self._batch.append(tuple(first.shape[:2]) if first is not None else (0, 0))

    def _leave_forward(self, model, args, output) -> None:
        if in_backward():
            return
        if self._batch:
            self._batch.pop()
        self.engine_hooks.extend(hook_managers(model, output))

    def _note_stand_ins(self, module: nn.Module) -> None:
        """Map the tensors a wrapper put in place of counted parameters for this forward (FSDP2's
        unsharded parameters) to their canonical names: a claimed module's own parameters always,
        a host's whole subtree once a stand-in has been seen."""
        prefix = self.module_names.get(module, "")
        if module in self.owned:
            items = [(local, module.get_parameter(local)) for local, _ in self.owned[module]]
        elif self._aliases:
            items = module.named_parameters(remove_duplicate=False)
        else:
            return
        for local, p in items:
            if id(p) not in self.names:
                canon = self._paths.get(f"{prefix}.{local}" if prefix else local)
                if canon is not None:
                    self._aliases[id(p)] = canon

    def _rng(self, module: nn.Module, args) -> None:
        """The RNG state before the forward, so that a rule re-running the module draws the same
        random numbers (dropout masks)."""
        if self._paused or not torch.is_grad_enabled() or in_backward():
            return None
        state = {"cpu": torch.get_rng_state()}
        p = next(module.parameters(), None)
        if p is not None and p.device.type == "cuda":
            state[p.device] = torch.cuda.get_rng_state(p.device)
        self._entered += 1
        # attributes a stateful forward rebinds (e.g. a recurrent state), so that a re-run sees them
        # as this call did
        attrs = {k: v for k, v in vars(module).items() if v is None or isinstance(v, torch.Tensor)}
        self._before[module] = (state, _node_number(), self._entered, attrs)
        return None

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        # a checkpointed segment's recompute re-runs its modules inside a backward: the calls of the
        # forward are recorded already, and the recomputed values are theirs (gefx.checkpointing)
        if self._paused or not torch.is_grad_enabled() or in_backward():
            return None
        rng, start, order, attrs = self._before.pop(module, None) or ({"cpu": torch.get_rng_state()}, _node_number(), 0, {})
        batch, length = self._batch[-1] if self._batch else (0, 0)
        broadcast = (isinstance(module, nn.Embedding) and isinstance(output, torch.Tensor) and output.dim() == 3
                     and output.shape[:2] == (1, length) and batch > 1 and output.requires_grad)
        if broadcast and checkpointing.depth():
            raise Refused(f"{self.module_names.get(module, type(module).__name__)} ({type(module).__name__}) is "
                          "looked up once for the whole batch ([1, T, d], e.g. position embeddings) inside a "
                          "checkpointed segment: gefx expands its output per sample in the forward, which the "
                          "segment's recompute would not repeat; checkpoint the blocks after it, or pass "
                          "position_ids of shape [B, T]", [c for _, c in self.owned.get(module, ())])
        if broadcast:
            # An embedding looked up once for the whole batch (e.g. GPT-2's position embeddings, computed
            # for positions [1, T]): expand it, a value-identical view, so that its gradient keeps
            # one row per sample instead of their sum.
            output = output.expand(batch, *output.shape[1:])
        flat, _ = tree_flatten(output)
        index = [k for k, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not index:
            return None
        outs = [flat[k] for k in index]
        self._note_stand_ins(module)
        inputs = list(_tensors((args, kwargs)))
        autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        edges = [get_gradient_edge(o) for o in outs]
        bases = [None if broadcast else _base(o) for o in outs]
        if checkpointing.depth() and not broadcast and module in self.owned and stock(module, self.rules[module]):
            # inside a checkpointed segment nothing else keeps these outputs alive, and no rule reads
            # their values: keep their shape, dtype and device only (views keep their value)
            outs = [o if b is not None else self._stand_in(o) for o, b in zip(outs, bases)]
        rule = self.rules.get(module)
        verified = module in self.owned and not rule.exact and not stock(module, rule)
        (self.calls if module in self.owned else self.hosts).append(Call(
            module, self.module_names.get(module, type(module).__name__), args, kwargs, outs, index,
            edges, [o._version for o in outs],
            [(t, t._version) for t in inputs], {get_gradient_edge(t).node for t in inputs if t.requires_grad},
            broadcast, batch, length, rng, autocast, bases, attrs, (start, _node_number(), order),
            conditions(module, args, kwargs, autocast, self.hook_ids) if verified else None))
        return output if broadcast else None

    def _stand_in(self, o: torch.Tensor) -> torch.Tensor:
        """A tensor of o's shape, dtype and device that holds one element (stride 0)."""
        key = (o.dtype, o.device)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros((), dtype=o.dtype, device=o.device)
        return self._zeros[key].expand(o.shape)


class Tape(Recorder):
    """What :func:`trace` returns: the recorded calls (:class:`Recorder`) and the parameter
    bookkeeping (:class:`Counted`) of one trace, with its checks (``graph``, gefx.soundness); open
    while the ``with`` block runs."""

    def __init__(self, model: nn.Module, params: Iterable | None = None, check: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"gefx.trace needs a torch.nn.Module, got {type(model).__name__}")
        if check not in ("auto", "full"):
            raise ValueError(f"check={check!r}: use 'auto' (the per-sample probe once per graph "
                             "structure) or 'full' (on every loss)")
        if next(model.parameters(), None) is None:
            raise ValueError(f"no parameterised module found in {type(model).__name__}")
        check_supported(model)
        check_engine(model)
        shards.check(model)
        super().__init__(model, params)
        self.check = check
        self.graph = Graph(self)
        self._handles: list = []
        self._open = False
        self._closed = False

    # -- context protocol -------------------------------------------------------------------
    def __enter__(self) -> "Tape":
        if self._closed:
            raise RuntimeError("this gefx.trace was closed; open a new one")
        if getattr(nn.modules.module, "_global_forward_hooks", None):
            raise Refused("a global forward hook is registered (torch.nn.modules.module."
                          "register_module_forward_hook); it runs before gefx's hooks and may rewrite "
                          "the outputs gefx records; remove it while measuring")
        # torch.compile'd regions run the hooks eagerly (a graph break) instead of tracing them
        rng, record = torch.compiler.disable(self._rng), torch.compiler.disable(self._record)
        for module in [*self.owned, *self.hosts_of]:
            self._handles.append(module.register_forward_pre_hook(rng, prepend=True))
            self._handles.append(module.register_forward_hook(record, with_kwargs=True, prepend=True))
        self._handles.append(self.model.register_forward_pre_hook(
            torch.compiler.disable(self._enter_forward), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(
            torch.compiler.disable(self._leave_forward), always_call=True))
        self.hook_ids = {h.id for h in self._handles}  # not part of a module's state (gefx.rules.module_state)
        checkpointing.install(self)  # reentrant checkpoints run non-reentrantly while the trace is open
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        checkpointing.uninstall(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.calls.clear()
        self.hosts.clear()
        self.engine_hooks.clear()
        self._aliases.clear()
        self.graph = Graph(self)  # drops what the checks held of this trace's calls
        self._before.clear()
        self._zeros.clear()
        self._open = False
        self._closed = True

    def check_open(self) -> None:
        if not self._open:
            raise RuntimeError("this gefx.trace is closed: call grad_dots / g_effect inside the "
                               "`with gefx.trace(model) as tape:` block")


def trace(model: nn.Module, params: Iterable | None = None, *, check: str = "auto") -> Tape:
    """Record the forward calls of `model` while the returned context is open.

    Args:
        model: any ``nn.Module`` (plain PyTorch or Hugging Face). Batch is dimension 0 of every
            recorded input and output (``nn.MultiheadAttention`` with ``batch_first=False``: 1), one
            row per sample or consecutive groups of rows per sample ([B*T, H] in OPT and MoE blocks).
        params: the parameters whose gradients count: an iterable of parameters, a list of param
            groups, or an optimizer (its ``param_groups``; e.g. LoRA or RMU-style partial
            training). Default: every parameter with ``requires_grad``. A parameter shared by
            several modules (tied embeddings) counts once, with the gradient of all its uses.
        check: how often the per-sample contract is probed (``gefx.soundness``): "auto" (default)
            the first time a loss's autograd graph has a given structure in this process, "full"
            for every loss. The coverage proof on the autograd graph runs for every loss either way.

    Use :func:`gefx.grad_dots` and :func:`gefx.g_effect` inside the block; the tape is emptied
    and its hooks removed when the block ends. Forwards run under ``torch.no_grad`` are not
    recorded. Gradient checkpointing (``model.gradient_checkpointing_enable()``, reentrant or not,
    the Trainer's ``gradient_checkpointing=True``, ``torch.utils.checkpoint.checkpoint`` in your
    code) gives the same numbers as without it; what cannot be exact under it (``context_fn``,
    ``preserve_rng_state=False`` with dropout, a reentrant checkpoint nested in another segment) is
    refused by name (``gefx.checkpointing``).
    """
    return Tape(model, params, check)
