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
shape. The per-sample products between pieces (ghost forms) are in ``gefx.dots``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .precision import acc_dtype


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


def dense(P: list[Piece], shape: torch.Size) -> torch.Tensor:
    """The aggregated gradient sum_i grad_i of a piece list, as a dense tensor of `shape`."""
    dt = acc_dtype(*[p.grad if isinstance(p, PerSample) else p.right for p in P])
    dev = (P[0].grad if isinstance(P[0], PerSample) else P[0].right).device
    m = torch.zeros(shape, dtype=dt, device=dev)
    for p in P:
        if isinstance(p, PerSample):
            m += p.grad.sum(0).to(dt)
            continue
        right = masked(p.right, p.mask, dt).reshape(-1, p.right.shape[-1])
        dst = m if p.block is None else m[p.block]
        if p.ids:
            dst.index_add_(0, p.left.reshape(-1), right)
        else:
            left = p.left.reshape(-1, p.left.shape[-1])
            step = max(1, (1 << 22) // max(1, left.shape[1] + right.shape[1]))
            for t0 in range(0, left.shape[0], step):
                dst += left[t0:t0 + step].to(dt).T @ right[t0:t0 + step]
    return m


def contract(P: list[Piece], m: torch.Tensor) -> torch.Tensor:
    """[Bp]: <grad_i, m> for a dense tensor m of the parameter's shape."""
    out = 0
    for p in P:
        if isinstance(p, PerSample):
            out = out + p.grad.flatten(1).to(acc_dtype(p.grad, m)) @ m.flatten().to(acc_dtype(p.grad, m))
        elif p.ids:
            out = out + ops.embedding_dense_dot(p.left, p.right, m if p.block is None else m[p.block], p.mask)
        else:
            mb = m if p.block is None else m[p.block]
            out = out + ops.dense_dot(p.right, p.left, mb.reshape(p.left.shape[-1], p.right.shape[-1]), p.mask)
    return out
