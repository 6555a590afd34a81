"""Linear maps: nn.Linear (weight: Factored(g, a), bias: PerSample(sum_t g)) and transformers'
Conv1D (weight [in, out]: Factored(a, g)); exact by construction for the stock classes."""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..dist import shape as full_shape
from ..pieces import Factored, PerSample
from ..precision import acc_dtype
from .base import Rule, _input, own_params, register_rule, rows


def linear_pieces(tape, call, grads):
    m = call.module
    a = rows(call, _input(call), m.in_features).detach()
    g = rows(call, grads[0], m.out_features)
    out = {"weight": Factored(g, a)}
    if m.bias is not None:
        out["bias"] = PerSample(g.sum(1, dtype=acc_dtype(g)))
    return out


def _is_conv1d(m: nn.Module) -> bool:  # transformers.pytorch_utils.Conv1D, matched without importing it
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and len(full_shape(m.weight)) == 2


def conv1d_pieces(tape, call, grads):
    m = call.module
    nx, nf = full_shape(m.weight)
    a = rows(call, _input(call), nx).detach()
    g = rows(call, grads[0], nf)
    out = {"weight": Factored(a, g)}
    if getattr(m, "bias", None) is not None:
        out["bias"] = PerSample(g.sum(1, dtype=acc_dtype(g)))
    return out


def _stock_linear(f) -> bool:
    """F.linear is torch's, or DeepSpeed ZeRO-3's replacement (x W^T + b by its own autograd
    function, which gathers the partitioned weight), not another patch."""
    zero3 = getattr(sys.modules.get("deepspeed.runtime.zero.linear"), "zero3_linear_wrap", None)
    return f is torch._C._nn.linear or (zero3 is not None and f is zero3)


def _stock_nn_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and _stock_linear(torch.nn.functional.linear)


def _stock_conv1d(m: nn.Module) -> bool:
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and type(m) is conv1d


register_rule(_is_conv1d, Rule("conv1d", conv1d_pieces, own_params, streams=True, stock=_stock_conv1d))
register_rule(nn.Linear, Rule("linear", linear_pieces, own_params, streams=True, stock=_stock_nn_linear))
