"""nn.MultiheadAttention: the generic rule over all its parameters (out_proj is used functionally,
never called); the batch on dimension 1 unless batch_first. Registered with it: the parameters of
torch.nn.utils.parametrize's ParametrizationList, covered by no rule (refused by name by
gefx.soundness)."""
from __future__ import annotations

from torch import nn

from .base import Rule, all_params, register_rule
from .generic import GENERIC, generic_pieces

register_rule(lambda m: type(m).__name__ == "ParametrizationList",
              Rule("parametrization", generic_pieces, lambda m: []))
register_rule(nn.MultiheadAttention, Rule(GENERIC.name, generic_pieces, all_params,
                                          lambda m: 0 if m.batch_first else 1, exact=True))
