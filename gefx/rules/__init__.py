"""Per-module rules: from a recorded call and its output gradients to gradient pieces.

One kind per file, each registering itself on the small common base (``base``: Rule, the
registry, the helpers that read a recorded call): ``linear`` (nn.Linear, Conv1D), ``embedding``,
``norms``, ``experts``, ``attention``, ``generic`` (the catch-all); ``verify`` checks a rule
against autograd per module and per conditions (``state``). A new kind of module: a file here
with its pieces function and a ``register_rule`` call, imported below (later imports match
first).

A rule says which parameters of a module it *covers* (``Rule.covers``; by default the module's own
parameters and those of its ``ParameterDict`` / ``ParameterList`` children) and how to turn one
recorded call plus the gradients at the call's outputs into per-sample pieces for them
(``gefx.pieces``). Rules are matched in registration order, the last registered first;
:func:`register_rule` adds one for a custom layer. Built in:

    nn.Linear (and subclasses)   weight: Factored(g, a);  bias: PerSample(sum_t g)
    transformers Conv1D          weight [in, out]: Factored(a, g); bias as above
    nn.Embedding (and scaled     weight: Factored(ids, g * scale), padding_idx masked
      subclasses)
    elementwise-affine norms     weight: PerSample(sum_t g * u) with u = dy/dw along ones (one
      (LayerNorm, every RMSNorm- forward-mode pass; u = y / w for verified offset-free norms);
      like module)               bias: PerSample(sum_t g)
    nn.MultiheadAttention        the generic rule over all its parameters (out_proj is used
                                 functionally, never called); batch on dim 1 unless batch_first
    anything else                generic: the module re-run on the recorded inputs (same random
                                 numbers, copies of its buffers), checked to reproduce the
                                 recorded output, then per-sample vector-Jacobian products

Every rule but the generic one is *verified* on the first call of each module under each
:func:`conditions` (its forward, hooks, training flag, plain attributes, the call's input shapes
and dtypes, autocast), except on stock modules whose rule is exact by construction (``stock``: nn.Linear,
nn.Embedding and transformers' Conv1D of exactly those classes, running torch's own ops): its pieces for a random output gradient must equal autograd's gradient of the re-run
module (``verdict``). A rule that does not fit the module (a subclass whose forward does more, a
norm that is not elementwise-affine in its weight) is replaced by the generic rule for that module.
The verdicts are kept in :data:`CHECKED` (module -> verdicts; ``gefx.soundness.forget`` clears it).

Rows: a recorded input/output has the samples of the loss on its batch dimension, either one row
per sample or, when a model flattens [B, T, H] to [B*T, H] (OPT, mixture-of-experts blocks),
consecutive groups of rows per sample (``Call.samples``; checked by ``gefx.soundness``).
"""
from __future__ import annotations

from .base import Refused, Rule, _RULES, all_params, own_params, recompute, register_rule, rows, rule_for
from .state import changed, conditions, module_state
from .generic import GENERIC, generic_pieces
from .verify import CHECKED, Verdict, checked_rule, ready, stock, verdict_of
from .norms import _norm_candidate, norm_pieces, norm_u
from .embedding import embedding_pieces
from .linear import conv1d_pieces, linear_pieces
from .experts import experts_pieces
from . import attention  # noqa: F401  (registers nn.MultiheadAttention)

__all__ = ["Refused", "Rule", "register_rule", "rule_for", "own_params", "all_params", "rows", "recompute",
           "GENERIC", "CHECKED", "Verdict", "checked_rule", "ready", "stock", "verdict_of", "conditions",
           "module_state", "changed", "linear_pieces", "conv1d_pieces", "embedding_pieces", "norm_pieces",
           "norm_u", "experts_pieces", "generic_pieces", "_RULES", "_norm_candidate"]
