"""Stage 4 of a measurement, *contract* (docs/ARCHITECTURE.md): products of gradient pieces with
each other and with dense gradients, never forming a per-sample gradient of a matrix parameter:

    pair_matrix(P, Q)      [Bp, Bq]  ghost (Gram-Hadamard) form
    self_norms(P)          [Bp]      symmetric ghost form
    marginals(P, Q)        row sums [Bp] (and column sums [Bq]) of pair_matrix(P, Q), by the ghost
                           form or by the dense form (one aggregated gradient per parameter, then
                           one GEMM-shaped contraction), whichever needs fewer flops for that
                           parameter and call (see ``_costs``)
    contract_all(P, m)     [Bp]      against dense gradients m ({name: tensor}: ``.grad``, an
                           update, an aggregate), sharded ones included (``gefx.shards``)

and, for a measurement's risks, each risk's feed of pieces (``gefx.collect``) run into its products
(``Against`` a dense gradient, ``ByMarginals`` the objective's pieces): :func:`against`,
:func:`contracted` (one risk at a time), :func:`together` (every risk's pieces held at once).

The engine's ops behind them (``gefx.ops``) run on the chosen backend (``gefx.backends``).
Memory: the ghost forms use at most two Gram tiles of GEFX_TILE_MB MiB each (torch backend), the
dense form one float32 tensor the size of the parameter.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import dist, ops, shards
from .backends import dispatch
from .collect import Grads
from .pieces import Factored, PerSample, Piece, column_blocks, contract, dense, dense_square, masked, merge, widened
from .precision import acc_dtype, sq_sum
from .tape import Tape


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
    objective), unless it is formed a block of columns at a time (a matrix of more than 2^22
    entries: ``gefx.pieces.column_blocks``; then nothing is kept). GEFX_DOT_FORM=ghost|dense forces
    one form (for tests and benchmarks)."""
    form = os.environ.get("GEFX_DOT_FORM", "").strip().lower()
    if form not in ("", "auto", "ghost", "dense"):
        raise ValueError(f"GEFX_DOT_FORM={form!r} must be ghost, dense or auto")
    if form in ("", "auto"):
        ghost, dense_cost = _costs(P, Q, need_cols)
        form = "ghost" if ghost <= dense_cost else "dense"
    if form == "ghost":
        k = pair_matrix(P, Q)
        return k.sum(1), (k.sum(0) if need_cols else None)
    blocks = column_blocks(P + Q, shape)
    if blocks is not None:  # the aggregates a block of columns at a time (a 16-bit head: not 2x its size)
        rows = sum(contract(P, dense(Q, shape, c), c) for c in blocks)
        return rows, (sum(contract(Q, dense(P, shape, c), c) for c in blocks) if need_cols else None)
    memo = {} if memo is None else memo
    if "q" not in memo:
        memo["q"] = dense(Q, shape)
    rows = contract(P, memo["q"])
    return rows, (contract(Q, dense(P, shape)) if need_cols else None)


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


# -- one risk's products, parameter by parameter as its pieces come ------------------------------
@dataclass
class Values:
    """One risk's per-parameter products ({name: [B]}): with the objective (`rows`), its
    per-objective-instance transpose (`cols`), along a direction (`pred`), its self products
    (`norms`); None where not asked."""

    rows: dict = field(default_factory=dict)
    cols: dict | None = None
    pred: dict | None = None
    norms: dict | None = None

    @staticmethod
    def add(to: dict, n: str, x) -> None:
        """A parameter's pieces may come in parts (``gefx.collect.collect_each``): their products add."""
        if x is not None:
            to[n] = x if n not in to else to[n] + x


class _Products:
    """The contract stage for one risk: ``take(name, pieces)`` for each parameter its pieces
    reach, as they come; ``values`` then holds its products. `direction` ({name: tensor} or None):
    also the products along it; `squares` (a dict, or None): filled with the objective's squared
    norm per parameter (shared by the risks: each parameter's formed once).

    On a risk's first use each of the probe's two passes brings the pieces of its own part of the
    samples only (``gefx.collect.collect_each``, with their `rows`), so the two passes' products
    cost one backward's, not two."""

    def __init__(self, tape: Tape, instances: bool, direction, squares):
        self.tape, self.direction, self.squares = tape, direction, squares
        self.values = Values({}, {} if instances else None, None if direction is None else {},
                             None if squares is None else {})

    def take(self, n: str, P, rows=None) -> None:
        """Products of pieces P; with `rows` (bool [batch]), P are those samples' only (a probe
        pass's part), their per-sample products spread back over the batch."""
        self._take(n, P, lambda x: x if rows is None or x is None else _spread(x, rows))

    def extras(self, n: str, P, spread) -> None:
        """What does not depend on the objective: the direction's product, the self products."""
        v = self.values
        if v.pred is not None and n in self.direction:
            v.add(v.pred, n, spread(shards.contract_with([P], self.direction[n])[0]))
        if v.norms is not None:
            v.add(v.norms, n, spread(self_norms(P)))


def _spread(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-sample values of the samples where `rows` is True, as [batch, ...] (zeros elsewhere)."""
    out = x.new_zeros((rows.shape[0], *x.shape[1:]))
    out[rows] = x
    return out


class Against(_Products):
    """Against the objective's dense gradient `m_obj` ({name: tensor}, e.g. ``.grad``: read in
    place, one parameter at a time); with `g_obj` (its per-sample pieces), the PG-effect too."""

    def __init__(self, tape: Tape, m_obj: Mapping, g_obj, direction, squares):
        super().__init__(tape, g_obj is not None, direction, squares)
        self.m_obj, self.g_obj = m_obj, g_obj

    def _take(self, n: str, P, spread) -> None:
        v, sq = self.values, self.squares
        if n in self.m_obj:
            value = self.m_obj[n]
            if sq is not None and n not in sq:
                sq[n] = shards.sq_norm(value)
            v.add(v.rows, n, spread(shards.contract_with([P], value)[0]))
            del value
        if self.g_obj is not None and self.g_obj.pieces.get(n):  # per objective instance: a sum over the risk's
            v.add(v.cols, n, marginals(self.g_obj.pieces[n], P, dist.shape(self.tape.params[n]), need_cols=False)[0])
        self.extras(n, P, spread)

    def objective_squares(self) -> dict:
        """The objective's squared norm per parameter, also where this risk did not reach."""
        for n in self.m_obj:
            if n not in self.squares:
                self.squares[n] = shards.sq_norm(self.m_obj[n])
        return self.squares


class ByMarginals(_Products):
    """Against the objective's pieces `g_obj` (before the step), by the cheaper of the ghost and
    dense forms per parameter (``marginals``), its aggregated gradient formed only where the dense
    form wins, one parameter at a time (a large matrix's a block of columns at a time:
    ``gefx.pieces.column_blocks``)."""

    def __init__(self, tape: Tape, g_obj, instances: bool, direction, squares):
        super().__init__(tape, instances, direction, squares)
        self.g_obj = g_obj

    def _take(self, n: str, P, spread) -> None:
        v, sq, Q = self.values, self.squares, self.g_obj.pieces.get(n)
        if Q:
            shape = dist.shape(self.tape.params[n])
            memo: dict = {}  # this parameter's aggregated objective gradient, if formed: dropped after it
            row, col = marginals(P, Q, shape, need_cols=v.cols is not None, memo=memo)
            v.add(v.rows, n, spread(row))
            if v.cols is not None:
                v.add(v.cols, n, col)
            if sq is not None and n not in sq:
                sq[n] = sq_sum(memo["q"]) if "q" in memo else dense_square(Q, shape)
        self.extras(n, P, spread)

    def objective_squares(self) -> dict:
        for n, Q in self.g_obj.pieces.items():
            if n not in self.squares:
                self.squares[n] = dense_square(Q, dist.shape(self.tape.params[n]))
        return self.squares


# -- stage 4 for every risk: its feed (stage 3) run into its products ------------------------------
def against(tape: Tape, m_obj: Mapping, feeds: dict, *, direction=None, squares: dict | None = None, g_obj=None,
            group=None, made: dict | None = None) -> dict:
    """name -> (batch, Values, the objective's squared norm per parameter or None) for each risk's
    feed (name -> feed(take), ``gefx.collect``) against the objective's aggregated gradient given
    densely (per parameter name; under torch.distributed already summed over the ranks; sharded
    parameters as ``shards.Sharded``; possibly formed when read); with `g_obj`, the objective's
    per-sample pieces, the PG-effect too; `squares` (a dict: norms asked) filled with the
    objective's squared norms. One risk at a time (:func:`contracted`), against a gradient at hand
    (``.grad``); every risk's pieces held at once where reading the gradient costs (an aggregate
    formed per read, collectives under torch.distributed): :func:`together`."""
    if dist.group_size(group) > 1 or isinstance(m_obj, Aggregates):
        return together(tape, m_obj, feeds, direction=direction, squares=squares, g_obj=g_obj, group=group)
    return contracted(feeds, lambda: Against(tape, m_obj, g_obj, direction, squares), made)


def contracted(feeds: dict, products_for, made: dict | None = None) -> dict:
    """One risk at a time: its feed run into fresh products (``products_for()``, or those `made`
    for it during the step's backward) as its pieces come; what the feed holds is let go before
    the next risk's backward. name -> (batch, Values, objective squares or None)."""
    made = made or {}
    out = {}
    for name in list(feeds):
        feed = feeds.pop(name)  # what it holds goes with it
        products = made.pop(name, None) or products_for()
        batch = feed(products.take)
        out[name] = (batch, products.values, None if products.squares is None else products.objective_squares())
    return out


def together(tape: Tape, m_obj: Mapping, feeds: dict, *, direction=None, squares: dict | None = None, g_obj=None,
             group=None) -> dict:
    """:func:`against` with every risk's pieces held at once, each value of `m_obj` read once for
    all (in tape order: under torch.distributed every rank runs the same collectives in the same
    order)."""
    held = {name: _gathered(feed) for name, feed in feeds.items()}
    rows, preds = read_once(tape, list(held.values()), [m_obj, direction], squares)
    out = {}
    for (name, g), r, pred in zip(held.items(), rows, preds):
        v = Values(r, None if g_obj is None else _instances(tape, g_obj, g, group),
                   pred if direction is not None else None,
                   {n: self_norms(P) for n, P in g.pieces.items()} if squares is not None else None)
        out[name] = (g.batch, v, squares)
    return out


def _gathered(feed) -> Grads:
    """All of a feed's pieces at once (a parameter's parts, each widened to the whole batch, merged)."""
    pieces: dict = {}

    def take(n, P, rows=None):
        P = P if rows is None else [widened(p, rows) for p in P]
        pieces[n] = merge(pieces[n] + P) if n in pieces else P
    return Grads(pieces, feed(take))


def read_once(tape: Tape, held: list, mappings: list, squares: dict | None = None) -> list:
    """out[j][k] = {name: [batch] <grad_i, mappings[j][name]>} for the pieces of `held[k]` (Grads),
    parameter by parameter in tape order, each mapping's value read once for all the held
    pieces and dropped before the next parameter (a lazy mapping thus holds one parameter at a
    time; under torch.distributed every rank runs the same collectives in the same order).
    `squares`: filled with ||mappings[0][name]||^2."""
    out = [[{} for _ in held] for _ in mappings]
    for n in tape.params:
        for j, m in enumerate(mappings):
            if m is None or n not in m:
                continue
            value = m[n]
            if squares is not None and j == 0:
                squares[n] = shards.sq_norm(value)
            for k, v in enumerate(shards.contract_with([g.pieces.get(n) for g in held], value)):
                if v is not None:
                    out[j][k][n] = v
            del value
    return out


def _instances(tape: Tape, g_obj, g_risk, group) -> dict:
    """{name: [B_obj] <grad l_s, grad R>} per parameter: one process, by the cheaper of the ghost
    and dense forms; under torch.distributed against the risk's aggregated gradient, summed over
    the ranks (formed and dropped one parameter at a time)."""
    if dist.group_size(group) > 1:
        return read_once(tape, [g_obj], [aggregated(tape, g_risk, group)])[0][0]
    return {n: marginals(Q, g_risk.pieces[n], dist.shape(tape.params[n]), need_cols=False)[0]
            for n, Q in g_obj.pieces.items() if g_risk.pieces.get(n)}
