"""Gradient *pieces*: the per-sample gradients of one parameter, described without forming them.

    Factored(left, right)   grad_i = sum_t left_it (x) right_it, for a parameter [D0, D1].
                            left is dense [B, T, D0] or token ids [B, T] (a one-hot row over
                            D0, for embedding tables); right is [B, T, D1]. With `block` = e, the
                            piece is the gradient of slice [e] of a parameter [E, D0, D1] (one
                            expert of a mixture-of-experts block), zero elsewhere.
    PerSample(grad)         grad_i formed explicitly, [B, *param.shape]; only for parameters no
                            larger than a norm layer's weight, or for the generic fallback.

A parameter's gradient is the sum of its pieces (one per recorded use). ``dense`` and
``contract`` are the two products every form of the engine reduces to on the dense side: the
aggregated gradient sum_i grad_i, and <grad_i, m> against a dense tensor m of the parameter's
shape. The per-sample products between pieces (ghost forms) are in ``gefx.products``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .precision import acc_dtype, sq_sum


@dataclass
class Factored:
    left: torch.Tensor            # [B, T, D0] float, or [B, T] long token ids
    right: torch.Tensor           # [B, T, D1]
    mask: torch.Tensor | None = None  # [B, T] bool: tokens that count
    block: int | None = None          # the slice [block] of a stacked parameter it lives in

    @property
    def ids(self) -> bool:
        return not self.left.is_floating_point()

    @property
    def batch(self) -> int:
        return self.right.shape[0]

    @property
    def tokens(self) -> int:
        return self.right.shape[0] * self.right.shape[1]


@dataclass
class PerSample:
    grad: torch.Tensor            # [B, *param.shape]

    @property
    def batch(self) -> int:
        return self.grad.shape[0]


Piece = Factored | PerSample


def masked(x: torch.Tensor, mask, dt) -> torch.Tensor:
    x = x.to(dt)
    return x if mask is None else x * mask.unsqueeze(-1).to(dt)


def merge(pieces: list[Piece]) -> list[Piece]:
    """Concatenate factored pieces of one kind along tokens (a module called several times, or a
    parameter shared by several modules of one kind) and add per-sample pieces."""
    out: list[Piece] = []
    kinds = dict.fromkeys((p.ids, p.block) for p in pieces if isinstance(p, Factored))
    for ids, block in kinds:
        same = [p for p in pieces if isinstance(p, Factored) and p.ids == ids and p.block == block]
        if len(same) == 1:
            out.append(same[0])
        else:
            masks = None if all(p.mask is None for p in same) else torch.cat(
                [torch.ones(p.right.shape[:2], dtype=torch.bool, device=p.right.device) if p.mask is None
                 else p.mask for p in same], 1)
            out.append(Factored(torch.cat([p.left for p in same], 1), torch.cat([p.right for p in same], 1), masks,
                                block))
    grads = [p.grad for p in pieces if isinstance(p, PerSample)]
    if grads:
        out.append(PerSample(torch.stack(grads).sum(0) if len(grads) > 1 else grads[0]))
    return out


def dense(P: list[Piece], shape: torch.Size, cols: slice | None = None) -> torch.Tensor:
    """The aggregated gradient sum_i grad_i of a piece list, as a dense tensor of `shape` (with
    `cols`, only those columns of a matrix: see ``column_blocks``)."""
    dt = acc_dtype(*[p.grad if isinstance(p, PerSample) else p.right for p in P])
    dev = (P[0].grad if isinstance(P[0], PerSample) else P[0].right).device
    m = torch.zeros(shape if cols is None else (shape[0], cols.stop - cols.start), dtype=dt, device=dev)
    for p in P:
        if isinstance(p, PerSample):
            m += p.grad.sum(0).to(dt)
            continue
        right = masked(_cols(p.right, cols), p.mask, dt).reshape(-1, m.shape[-1])
        dst = m if p.block is None else m[p.block]
        if p.ids:
            dst.index_add_(0, p.left.reshape(-1), right)
        else:
            left = p.left.reshape(-1, p.left.shape[-1])
            step = max(1, (1 << 22) // max(1, left.shape[1] + right.shape[1]))
            for t0 in range(0, left.shape[0], step):
                dst += left[t0:t0 + step].to(dt).T @ right[t0:t0 + step]
    return m


def contract(P: list[Piece], m: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
    """[Bp]: <grad_i, m> for a dense tensor m of the parameter's shape (with `cols`, m holds only
    those columns of a matrix, and the product is over them)."""
    out = 0
    for p in P:
        if isinstance(p, PerSample):
            out = out + p.grad.flatten(1).to(acc_dtype(p.grad, m)) @ m.flatten().to(acc_dtype(p.grad, m))
        elif p.ids:
            out = out + ops.embedding_dense_dot(p.left, _cols(p.right, cols), m if p.block is None else m[p.block],
                                                p.mask)
        else:
            mb = m if p.block is None else m[p.block]
            right = _cols(p.right, cols)
            out = out + ops.dense_dot(right, p.left, mb.reshape(p.left.shape[-1], right.shape[-1]), p.mask)
    return out


def _cols(x: torch.Tensor, cols: slice | None) -> torch.Tensor:
    return x if cols is None else x[..., cols]


_BLOCK = 1 << 22  # elements of an aggregate formed at once (16 MiB of float32)


def column_blocks(pieces: list[Piece], shape) -> list[slice] | None:
    """Column ranges of a matrix parameter whose aggregate, formed one range at a time (``dense``,
    ``contract`` with `cols`), holds at most about ``_BLOCK`` elements of the accumulation dtype
    instead of the parameter's size in it (twice the parameter for a 16-bit one); None where one
    piece does not split by columns (per-sample gradients, a stacked parameter's slice) or the
    whole matrix is within the budget."""
    if len(shape) != 2 or shape[0] * shape[1] <= _BLOCK:
        return None
    if any(not isinstance(p, Factored) or p.block is not None for p in pieces):
        return None
    width = max(1, _BLOCK // shape[0])
    return [slice(c, min(c + width, shape[1])) for c in range(0, shape[1], width)]


def dense_square(P: list[Piece], shape) -> torch.Tensor:
    """||sum_i grad_i||^2 of a piece list, its aggregate formed by column blocks where it splits."""
    blocks = column_blocks(P, shape)
    if blocks is None:
        return sq_sum(dense(P, shape))
    total = sum(sq_sum(dense(P, shape, c)).double() for c in blocks)
    return total.to(acc_dtype(*[p.right for p in P]))


# -- one flat range of a parameter (a shard: gefx.shards) -------------------------------------------
def _part(p: Factored, shape, start: int, end: int):
    """Piece p restricted to the rows a..b of its matrix [D0, D1] (the parameter, or its slice
    [block]) that the flat range [start, end) of a parameter of `shape` touches, as (that piece,
    b - a, pos, at): the range covers positions `pos` of rows a..b flattened, which are positions
    `at` of the range; None if the range misses the piece. Ids outside the rows are masked out."""
    d1 = p.right.shape[-1]
    d0 = shape[-2] if p.ids else p.left.shape[-1]
    base = 0 if p.block is None else p.block * d0 * d1
    s, e = max(start, base) - base, min(end, base + d0 * d1) - base
    if s >= e:
        return None
    a, b = s // d1, -(-e // d1)
    if p.ids:
        inside = (p.left >= a) & (p.left < b)
        piece = Factored(torch.where(inside, p.left - a, 0), p.right, inside if p.mask is None else inside & p.mask)
    else:
        piece = Factored(p.left[..., a:b].contiguous(), p.right, p.mask)
    return piece, b - a, slice(s - a * d1, e - a * d1), slice(base + s - start, base + e - start)


def _blocks(shape, start: int, end: int, elements: int = 1 << 22):
    """[start, end) cut at row boundaries into sub-ranges of at most ~`elements` (and one row):
    the temporaries of a range's products stay ~16 MiB (float32), whatever the shard size."""
    row = shape[-1] if len(shape) > 1 else max(end - start, 1)
    step = max(1, elements // row) * row
    at = start
    while at < end:
        nxt = min(end, (at // step + 1) * step)
        yield at, nxt
        at = nxt


def dense_range(P: list[Piece], shape, start: int, end: int) -> torch.Tensor:
    """The flat range [start, end) of ``dense(P, shape)``, formed from the rows it touches only,
    in row blocks of bounded size."""
    first = P[0].grad if isinstance(P[0], PerSample) else P[0].right
    dt = acc_dtype(*[p.grad if isinstance(p, PerSample) else p.right for p in P])
    out = torch.zeros(end - start, dtype=dt, device=first.device)
    for p in P:
        if isinstance(p, PerSample):
            out += p.grad.sum(0).flatten()[start:end].to(dt)
            continue
        for s, e in _blocks(shape, start, end):
            part = _part(p, shape, s, e)
            if part is not None:
                piece, rows, pos, at = part
                out[s - start:e - start][at] += dense([piece], (rows, p.right.shape[-1])).flatten()[pos]
    return out


def contract_range(P: list[Piece], values: torch.Tensor, shape, start: int, end: int) -> torch.Tensor:
    """[Bp]: <grad_i, m> for m zero but on the flat range [start, end), where it is `values`
    (in row blocks of bounded size)."""
    out = 0
    for p in P:
        if isinstance(p, PerSample):
            dt = acc_dtype(p.grad, values)
            out = out + p.grad.flatten(1)[:, start:end].to(dt) @ values.to(dt)
            continue
        for s, e in _blocks(shape, start, end):
            part = _part(p, shape, s, e)
            if part is not None:
                piece, rows, pos, at = part
                m = torch.zeros(rows * p.right.shape[-1], dtype=values.dtype, device=values.device)
                m[pos] = values[s - start:e - start][at]
                out = out + contract([piece], m.view(rows, p.right.shape[-1]))
    if isinstance(out, int):  # the range misses every piece
        out = torch.zeros(P[0].batch, dtype=acc_dtype(values), device=values.device)
    return out


def restricted(p: Piece, rows: torch.Tensor) -> Piece:
    """The piece of the samples where `rows` (bool [batch]) is True only."""
    if isinstance(p, PerSample):
        return PerSample(p.grad[rows])
    return Factored(p.left[rows], p.right[rows], None if p.mask is None else p.mask[rows], p.block)


def widened(p: Piece, rows: torch.Tensor) -> Piece:
    """A piece of the samples where `rows` (bool [batch]) is True as one of all the batch's samples
    (zeros for the others)."""
    def wide(x):
        out = x.new_zeros((rows.shape[0], *x.shape[1:]))
        out[rows] = x
        return out
    if isinstance(p, PerSample):
        return PerSample(wide(p.grad))
    return Factored(wide(p.left), wide(p.right), None if p.mask is None else wide(p.mask), p.block)
