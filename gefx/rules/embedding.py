"""nn.Embedding (and scaled subclasses): weight Factored(ids, g * scale), the padding row masked;
exact by construction for the stock class."""
from __future__ import annotations

import torch
from torch import nn

from ..pieces import Factored
from .base import Refused, Rule, _input, own_params, register_rule, rows

_F_EMBEDDING = torch.nn.functional.embedding  # as torch defines it (a later monkey-patch is not stock)


def embedding_pieces(tape, call, grads):
    m = call.module
    if m.scale_grad_by_freq:
        raise Refused(f"{call.name}: nn.Embedding with scale_grad_by_freq=True has no per-sample "
                      "gradient (its scale depends on the whole batch); gefx does not support it")
    ids = rows(call, _input(call))
    g = rows(call, grads[0], m.embedding_dim)
    scale = getattr(m, "embed_scale", None) if type(m).forward is not nn.Embedding.forward else None
    if scale is not None:  # e.g. Gemma's scaled word embedding: y = W[ids] * embed_scale
        g = g * (scale.to(device=g.device, dtype=g.dtype) if isinstance(scale, torch.Tensor) else float(scale))
    mask = None
    if m.padding_idx is not None:  # no gradient reaches the padding row (its output gradient may even be NaN)
        mask = ids != m.padding_idx
        g = torch.where(mask.unsqueeze(-1), g, 0)
    return {"weight": Factored(ids, g, mask)}


def _stock_embedding(m: nn.Module) -> bool:
    return (type(m) is nn.Embedding and torch.nn.functional.embedding is _F_EMBEDDING
            and not m.scale_grad_by_freq and not m.sparse and m.max_norm is None)


register_rule(nn.Embedding, Rule("embedding", embedding_pieces, own_params, streams=True, stock=_stock_embedding))
