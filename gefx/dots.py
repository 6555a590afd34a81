"""Per-sample gradient inner products of losses computed from traced forwards.

``collect`` turns a loss into per-parameter gradient pieces (gefx.rules) from one
``torch.autograd.grad`` call on the recorded layer outputs: no weight-gradient GEMM runs and
``.grad`` is untouched. The products between two sets of pieces never form a per-sample gradient
of a matrix parameter:

    pair_matrix(P, Q)      [Bp, Bq]  ghost (Gram-Hadamard) form
    self_norms(P)          [Bp]      symmetric ghost form
    marginals(P, Q)        row sums [Bp] (and column sums [Bq]) of pair_matrix(P, Q), by the ghost
                           form or by the dense form (one aggregated gradient per parameter, then
                           one GEMM-shaped contraction), whichever needs fewer flops for that
                           parameter and call (see ``_costs``)

``collect_each`` does what ``collect`` does for a per-sample loss, but hands each parameter's
pieces on while the loss's backward runs (``gefx.streaming``), so that a layer's output gradients
are dropped once used: what g_effect uses for its risks.

Memory: besides the recorded activations and one output gradient per recorded output (the same
as a backward keeps; with ``collect_each`` a layer's at a time), the ghost forms use at most two
Gram tiles of GEFX_TILE_MB MiB each (torch backend) and the dense form one float32 tensor the size
of the parameter.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch.utils._pytree import tree_map

from . import dist, ops, shards
from .backends import dispatch
from .groups import resolve
from .pieces import Factored, PerSample, Piece, contract, dense, masked, merge
from .precision import acc_dtype
from .rules import Refused, checked_rule, ready
from .soundness import batch_dim, sample_view
from .streaming import stream
from .tape import Tape


@dataclass
class Grads:
    """Per-sample gradients of one loss, as pieces per canonical parameter name."""

    pieces: dict[str, list[Piece]]
    batch: int


# -- collecting output gradients ----------------------------------------------------------------
def check_graph(tape: Tape, loss: torch.Tensor, what: str):
    """Coverage and the per-sample probe for a per-sample loss, without keeping its gradients
    (the online mode checks its losses before the step's backward touches ``.grad``). Returns the
    loss's :class:`gefx.soundness.Reach`."""
    reach = tape.graph.reach(loss, what)
    with dist.engine_hooks_off(tape):
        tape.graph.probe(loss, reach, reach.slots(), None, what)
    return reach


def _check_loss(loss, what: str, per_sample: bool) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(loss).__name__}")
    if per_sample and loss.dim() != 1:
        raise ValueError(f"{what} must be a per-sample vector [B] (entry k depending only on batch "
                         f"row k), got a tensor of shape {tuple(loss.shape)}"
                         + ("; a scalar loss has no per-sample split" if loss.dim() == 0 else ""))
    if not per_sample and loss.dim() not in (0, 1):
        raise ValueError(f"{what} must be a scalar or a per-sample vector, got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {loss.dtype}")
    bad = ~torch.isfinite(loss.detach())
    if bad.any():
        kind = "NaN" if torch.isnan(loss.detach()).any() else "inf"
        where = bad.nonzero().flatten().tolist()[:8] if loss.dim() else []
        raise ValueError(f"{what} contains {kind}" + (f" at entries {where}" if where else ""))
    if not loss.requires_grad:
        raise ValueError(f"{what} does not depend on the traced forward (it does not require grad; "
                         "was it computed under torch.no_grad or from detached outputs?)")
    return loss


def collect(tape: Tape, loss: torch.Tensor, *, per_sample: bool, what: str = "loss", probe: bool = True) -> Grads:
    """Gradient pieces of `loss` for every counted parameter. A per-sample loss keeps its batch;
    otherwise the loss is summed and read as one sample (the aggregated gradient). The loss's
    graph is checked first (``gefx.soundness``): coverage always, the per-sample probe for a
    per-sample loss (unless `probe` is False: already probed)."""
    tape.check_open()
    _check_loss(loss, what, per_sample)
    with dist.engine_hooks_off(tape):
        return _collect(tape, loss, per_sample, what, probe)


def _reached(tape: Tape, loss: torch.Tensor, what: str):
    """The loss's :class:`gefx.soundness.Reach` and its slots (refused if it reaches nothing)."""
    if not tape.calls:
        raise ValueError("nothing was recorded: run the model's forward inside the gefx.trace block")
    reach = tape.graph.reach(loss, what)
    slots = reach.slots()
    if not slots:
        raise ValueError(f"{what} does not depend on any forward traced by this gefx.trace "
                         "(or on none of its counted parameters)")
    return reach, slots


def _collect(tape: Tape, loss: torch.Tensor, per_sample: bool, what: str, probe: bool) -> Grads:
    reach, slots = _reached(tape, loss, what)
    try:
        got = torch.autograd.grad(loss.sum(), [e for *_, e in slots], retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        raise RuntimeError(f"could not differentiate {what} through the traced forward: {exc} "
                           "(was its graph freed by a backward without retain_graph=True?)") from exc
    got = [c.as_output(k, g) for (c, k, _), g in zip(slots, got)]
    if per_sample and probe:
        tape.graph.probe(loss, reach, slots, got, what)
    at = {(id(c), k): g for (c, k, _), g in zip(slots, got)}
    grads = [at.get((id(c), k)) for c in tape.calls for k in range(len(c.edges))]
    return pieces_from(tape, loss, grads, per_sample=per_sample, what=what, users=reach.calls)


def pieces_from(tape: Tape, loss: torch.Tensor, grads, *, per_sample: bool, what: str = "loss",
                users=None) -> Grads:
    """Gradient pieces from the output gradients `grads` of `loss` (one entry, or None where the
    loss does not reach, per recorded output edge in tape order), for the calls in `users` (those
    whose forwards use the counted parameters the loss reaches, ``Reach.calls``; None: all)."""
    samples = loss.shape[0] if per_sample else 1
    pieces: dict[str, list[Piece]] = {}
    users = None if users is None else set(users)
    k = 0
    for call in tape.calls:
        gs = grads[k:k + len(call.edges)]
        k += len(call.edges)
        if users is None or call in users:
            for name, piece in _call_pieces(tape, call, gs, samples if per_sample else None, what):
                pieces.setdefault(name, []).extend(piece)
    return Grads({n: merge(ps) for n, ps in pieces.items()}, samples)


def _call_pieces(tape: Tape, call, gs: list, samples: int | None, what: str) -> list[tuple[str, list[Piece]]]:
    """[(canonical name, pieces)] of one recorded call from the gradients at its outputs (None
    where the loss does not reach); `samples` None: the loss is summed (one sample)."""
    if all(g is None for g in gs):
        return []
    if samples is not None:
        for g in gs:
            if g is not None:
                sample_view(tape, call, g, samples, what)  # the rows are the loss's samples, or refused
    call.check_unmodified()
    first = next(g for g in gs if g is not None)
    view = replace(call, samples=samples or 1,
                   batch_dim=batch_dim(tape, call, first, samples) if samples is not None else 0)
    if call.broadcast:  # its inputs are shared by all rows too: expand them like the output
        b = call.outputs[0].shape[0]
        expand = lambda x: x.expand(b, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1 else x  # noqa: E731
        view = replace(view, args=tree_map(expand, call.args), kwargs=tree_map(expand, call.kwargs))
    owned = dict(tape.owned[call.module])
    try:
        rule = checked_rule(tape, view)
        gs = _direct(call, gs)
        gs = [torch.zeros_like(o) if g is None else g for o, g in zip(call.outputs, gs)]
        got = rule.pieces(tape, view, gs)
    except Refused as exc:
        exc.names = exc.names or list(owned.values())
        raise
    return [(owned[local], piece if isinstance(piece, list) else [piece])
            for local, piece in got.items() if local in owned]


def collect_each(tape: Tape, loss: torch.Tensor, take, *, what: str = "loss", probe: bool = True) -> int:
    """``collect(tape, loss, per_sample=True)`` handed over parameter by parameter: ``take(name,
    pieces)`` for every counted parameter the loss reaches, as soon as its pieces are complete
    (once, or twice on the loss's first use: then each call gives a part of the samples, zeros for
    the others, and `take` must add up what it makes of them),
    while the loss's backward is still running (``gefx.streaming``): the output gradients of a
    layer are dropped once its parameters are taken, so no set of them for the whole model is ever
    alive. Calls whose rule needs more than its own output gradient (verification on first use,
    autograd inside the rule, several outputs) are kept and handled after the backward. Returns
    the number of samples."""
    tape.check_open()
    _check_loss(loss, what, True)
    with dist.engine_hooks_off(tape):
        reach, slots = _reached(tape, loss, what)
        for call in reach.calls:  # verified before the backward (once per module), so that it streams
            checked_rule(tape, call)
        # on first use the per-sample probe's two passes (the loss's entries on a part of the
        # samples, then on the rest) are the backward: pieces are linear in the output gradients,
        # and each sample's come whole from one pass, zeros from the other
        feeds = [_Feed(tape, reach.calls, loss.shape[0], what, take) for _ in range(2)]
        try:
            if not (probe and tape.graph.probe(loss, reach, slots, None, what,
                                               also=(feeds[0].arrived, feeds[1].arrived))):
                feeds = feeds[:1]
                stream(loss.sum(), slots, feeds[0].arrived)
        except RuntimeError as exc:
            if "backward through the graph a second time" not in str(exc) and "freed" not in str(exc):
                raise
            raise RuntimeError(f"could not differentiate {what} through the traced forward: {exc} "
                               "(was its graph freed by a backward without retain_graph=True?)") from exc
        for feed in feeds:
            feed.finish()
    return loss.shape[0]


class _Feed:
    """Gradients arriving slot by slot (in ``Reach.slots()`` order) turned into each call's pieces
    when the call's outputs are all in, and handed to `take` parameter by parameter when every call
    using the parameter is done."""

    def __init__(self, tape: Tape, calls: list, samples: int, what: str, take):
        self.tape, self.samples, self.what, self.take = tape, samples, what, take
        self.at = [(c, k) for c in calls for k in range(len(c.edges))]
        self.gs = {c: [None] * len(c.edges) for c in calls}
        self.left = {c: len(c.edges) for c in calls}
        self.users = {}  # canonical name -> calls still to come
        for c in calls:
            for _, name in tape.owned[c.module]:
                self.users[name] = self.users.get(name, 0) + 1
        self.order = {c: i for i, c in enumerate(calls)}
        self.pieces: dict[str, list] = {}  # name -> [(call's position, its pieces)]
        self.later: list = []  # calls handled after the backward

    def arrived(self, j: int, g) -> None:
        call, k = self.at[j]
        self.gs[call][k] = g
        self.left[call] -= 1
        if self.left[call] == 0:
            if len(call.edges) == 1 and ready(self.tape, call):
                self._done(call)
            else:
                self.later.append(call)

    def finish(self) -> None:
        later = set(self.later)
        for call in self.tape.calls:  # tape order
            if call in later:
                self._done(call)
        self.later = []

    def _done(self, call) -> None:
        gs, self.gs[call] = self.gs[call], None
        for name, piece in _call_pieces(self.tape, call, gs, self.samples, self.what):
            self.pieces.setdefault(name, []).append((self.order[call], piece))
        for _, name in self.tape.owned[call.module]:
            self.users[name] -= 1
            if self.users[name] == 0 and name in self.pieces:  # merged in tape order, as collect does
                self.take(name, merge([p for _, ps in sorted(self.pieces.pop(name), key=lambda x: x[0]) for p in ps]))


def _downstream(call) -> list[list[int]]:
    """For each output j of a call, the outputs computed from it inside the call (e.g. a router's
    scores from its logits); walked once per call."""
    memo = call.memo.get("downstream")
    if memo is None:
        nodes = [e.node for e in call.targets()]
        memo = []
        for j in range(len(nodes)):
            memo.append([k for k in range(len(nodes)) if k != j and nodes[j] in _upstream_of(nodes[k], call)])
        call.memo["downstream"] = memo
    return memo


def _upstream_of(node, call) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n in call.input_nodes:
            continue
        seen.add(n)
        todo.extend(m for m, _ in n.next_functions if m is not None)
    return seen


def _direct(call, gs: list) -> list:
    """Output gradients as rules read them: the loss's gradient through each output's own uses.
    Autograd's gradient at an output also holds what reaches it through the call's other outputs
    computed from it; that part is taken out (downstream outputs first), or a rule would count
    it twice."""
    if len(gs) < 2:
        return gs
    down = _downstream(call)
    if not any(down):
        return gs
    targets = call.targets()
    if any(t is not e for t, e in zip(targets, call.edges)):
        raise Refused(f"{call.name}: an output computed from another of its outputs was changed in place "
                      "after the forward; gefx cannot separate their gradients")
    done, out = set(), list(gs)
    while len(done) < len(gs):
        for j in range(len(gs)):
            if j in done or any(k not in done for k in down[j]):
                continue
            users = [k for k in down[j] if out[k] is not None]
            if out[j] is not None and users:
                (via,) = torch.autograd.grad([targets[k] for k in users], [targets[j]],
                                             [out[k] for k in users], retain_graph=True, allow_unused=True)
                if via is not None:
                    out[j] = out[j] - via
            done.add(j)
    return out


# -- products between pieces --------------------------------------------------------------------
def _factored_vs_dense(p: Factored, grads: torch.Tensor) -> torch.Tensor:
    """[Bp, J]: <sum_t left_t (x) right_t, grads[j]> for explicit gradients grads [J, D0, D1]."""
    dt = acc_dtype(p.right, grads)
    right = masked(p.right, p.mask, dt)
    g = (grads if p.block is None else grads[:, p.block]).to(dt)
    if p.ids:
        return torch.einsum("jbtd,btd->bj", g[:, p.left], right)
    return torch.einsum("btl,jlr,btr->bj", p.left.to(dt), g, right)


def _pp(p: Piece, q: Piece) -> torch.Tensor:
    """[Bp, Bq] inner products between the per-sample gradients of two pieces."""
    if isinstance(p, PerSample) and isinstance(q, PerSample):
        dt = acc_dtype(p.grad, q.grad)
        return p.grad.flatten(1).to(dt) @ q.grad.flatten(1).to(dt).T
    if isinstance(p, PerSample):
        return _pp(q, p).T
    if isinstance(q, PerSample):
        return _factored_vs_dense(p, q.grad)
    if p.block != q.block:  # different experts' slices of a stacked parameter
        return torch.zeros(p.batch, q.batch, dtype=acc_dtype(p.right, q.right), device=p.right.device)
    if p.ids and q.ids:
        return ops.embedding_pairwise(p.left, p.right, q.left, q.right, p.mask, q.mask)
    if p.ids:
        return dispatch("embedding_linear_pairwise", p.left, p.right, q.left, q.right, p.mask, q.mask)
    if q.ids:
        return _pp(q, p).T
    return ops.pairwise(p.right, p.left, q.right, q.left, p.mask, q.mask)


def _sample(p: Piece, i: int) -> Piece:
    if isinstance(p, PerSample):
        return PerSample(p.grad[i:i + 1])
    return Factored(p.left[i:i + 1], p.right[i:i + 1], None if p.mask is None else p.mask[i:i + 1], p.block)


def _self(p: Piece) -> torch.Tensor:
    if isinstance(p, PerSample):
        g = p.grad.flatten(1).to(acc_dtype(p.grad))
        return (g * g).sum(1)
    if p.ids:
        return ops.embedding_self_norms(p.left, p.right, p.mask)
    return ops.self_norms(p.right, p.left, p.mask)


def pair_matrix(P: list[Piece], Q: list[Piece]) -> torch.Tensor:
    return sum(_pp(p, q) for p in P for q in Q)


def self_norms(P: list[Piece]) -> torch.Tensor:
    """||sum_k piece_k||^2 = sum_k self(piece_k) + 2 sum_{k<l} <piece_k, piece_l> (same sample)."""
    out = sum(_self(p) for p in P)
    for k in range(len(P)):
        for q in P[k + 1:]:
            out = out + 2 * torch.stack([_pp(_sample(P[k], i), _sample(q, i))[0, 0] for i in range(P[k].batch)])
    return out


def _size(p: Piece) -> tuple[int, int, int]:
    """(rows: tokens or samples, D0, D1) for the cost model; ids count D0 = 1 in Grams."""
    if isinstance(p, PerSample):
        return p.batch, 1, p.grad[0].numel()
    return p.tokens, (0 if p.ids else p.left.shape[-1]), p.right.shape[-1]


def _costs(P: list[Piece], Q: list[Piece], need_cols: bool) -> tuple[int, int]:
    """Flop counts of (ghost, dense) for the marginals of <P, Q>."""
    ghost = 0
    for p in P:
        for q in Q:
            (n, d0, d1), (m, e0, e1) = _size(p), _size(q)
            if isinstance(p, PerSample) or isinstance(q, PerSample):
                ghost += n * m * max(d0 * d1, e0 * e1)
            else:
                ghost += n * m * ((d0 if d0 and e0 else 1) + d1)

    def gemm(pieces):  # build the aggregate, or contract against one: same count
        return sum(n * max(d0, 1) * d1 for n, d0, d1 in map(_size, pieces))

    dense_cost = gemm(P) + gemm(Q)
    return ghost, dense_cost * 2 if need_cols else dense_cost


def marginals(P: list[Piece], Q: list[Piece], shape: torch.Size, need_cols: bool, memo: dict | None = None):
    """(rows [Bp], cols [Bq] or None) of the pair matrix <P_i, Q_j>, by the cheaper form.
    `memo` keeps Q's aggregated gradient for reuse against further P (several risks, one
    objective). GEFX_DOT_FORM=ghost|dense forces one form (for tests and benchmarks)."""
    form = os.environ.get("GEFX_DOT_FORM", "").strip().lower()
    if form not in ("", "auto", "ghost", "dense"):
        raise ValueError(f"GEFX_DOT_FORM={form!r} must be ghost, dense or auto")
    if form in ("", "auto"):
        ghost, dense_cost = _costs(P, Q, need_cols)
        form = "ghost" if ghost <= dense_cost else "dense"
    if form == "ghost":
        k = pair_matrix(P, Q)
        return k.sum(1), (k.sum(0) if need_cols else None)
    memo = {} if memo is None else memo
    if "q" not in memo:
        memo["q"] = dense(Q, shape)
    rows = contract(P, memo["q"])
    return rows, (contract(Q, dense(P, shape)) if need_cols else None)


# -- the public entry point ---------------------------------------------------------------------
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


def group_sums(tape: Tape, per_param: dict[str, torch.Tensor], groups, shape) -> dict[str, torch.Tensor]:
    """Sum per-parameter values into groups (every group present, zeros where nothing reached)."""
    mapping, order = resolve(tape, groups)
    p0 = next(iter(tape.params.values()))
    dt = acc_dtype(*tape.params.values())
    out = {g: torch.zeros(shape, dtype=dt, device=p0.device) for g in order}
    for name, v in per_param.items():
        out[mapping[name]] += v.to(dt)
    return out


def dense_gradients(tape: Tape, grads: Mapping, what: str = "objective") -> dict:
    """{canonical name: tensor, or shards.Sharded for a sharded parameter} from a mapping keyed by
    counted parameters or their names (None values and absent parameters count zero), with shapes
    checked. Values: tensors of the parameter's full shape, DTensors (FSDP2's ``.grad``: only this
    rank's shard is read) or ``shards.Sharded`` (``gefx.engine_grads``)."""
    out = {}
    for key, value in grads.items():
        name = key if isinstance(key, str) else tape.canonical(key)
        if name not in tape.params:
            raise ValueError(f"{what} names a parameter that this trace does not count: {_path(tape, key)} "
                             "(a gradient for it, e.g. of a parameter outside the optimizer's that still has "
                             "requires_grad); give the counted parameters' gradients only, or count it "
                             "(gefx.trace(model, params=...))")
        if value is None:
            continue
        full_shape = tuple(dist.shape(tape.params[name]))
        if tuple(value.shape) != full_shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(value.shape)}, the parameter {full_shape}")
        out[name] = value if isinstance(value, shards.Sharded) else shards.sharded(tape.params[name], value.detach())
    return out


def _path(tape: Tape, key) -> str:
    """A parameter's name in the traced model (its shape if it is not one of the model's)."""
    if isinstance(key, str):
        return repr(key)
    found = next((n for n, p in tape.model.named_parameters(remove_duplicate=False) if p is key), None)
    return f"`{found}`" if found is not None else f"a tensor of shape {tuple(key.shape)} (not a parameter of the model)"


def contract_all(pieces: list[Mapping], m: Mapping) -> list[dict[str, torch.Tensor]]:
    """For each piece set, {name: [batch] <grad_i, m[name]>} over its parameters among m's, in m's
    order: every rank runs the same (collective, for sharded parameters: each shard sent once for
    all sets) products, pieces or not."""
    out = [{} for _ in pieces]
    for n, value in m.items():
        for k, v in enumerate(shards.contract_with([P.get(n) for P in pieces], value)):
            if v is not None:
                out[k][n] = v
    return out


class Aggregates(Mapping):
    """The summed gradient of collected pieces, dense per counted parameter, formed when read:
    where the loss reached, or (`every`, and always under torch.distributed with `group` of more
    than one process: the same parameters on every rank) each counted parameter, zeros where it
    did not; summed over the ranks of `group` (sharded parameters: this rank's shard only,
    ``gefx.shards``). Nothing is kept: iterating forms one parameter's sum at a time, so no more
    than one parameter-sized tensor is alive at once beyond what the caller holds on to. Under
    torch.distributed each read is a collective: read in the same order on every rank."""

    def __init__(self, tape: Tape, grads: Grads, group=None, every: bool = False):
        self.tape, self.grads, self.group = tape, grads, group
        self.many = dist.group_size(group) > 1
        self.device = next((o.device for c in tape.calls for o in c.outputs), None)  # where the forward ran
        self.names = [n for n in tape.params if grads.pieces.get(n) or every or self.many]

    def __getitem__(self, n: str):
        if n not in self.names:
            raise KeyError(n)
        p, P, group = self.tape.params[n], self.grads.pieces.get(n), self.group
        lay = shards.layout(p) if self.many else None
        if lay is not None:  # this rank's shard only (gefx.shards)
            if len(lay.ranges) != dist.group_size(group):
                raise ValueError(f"parameter {n!r} is sharded over {len(lay.ranges)} ranks, the measurement's "
                                 f"process group has {dist.group_size(group)}: pass the data-parallel group the "
                                 "parameters are sharded over as process_group")
            return shards.aggregate(P, p, lay, self.device)
        shape = dist.shape(p)
        m = dense(P, shape) if P else torch.zeros(shape, dtype=acc_dtype(p), device=p.device)
        return dist.all_reduce_sum(m, group) if self.many else m

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def aggregated(tape: Tape, grads: Grads, group=None, every: bool = False) -> Aggregates:
    """:class:`Aggregates` of `grads` (formed lazily, one parameter at a time)."""
    return Aggregates(tape, grads, group, every)


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
