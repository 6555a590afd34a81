"""gefx: exact per-sample gradient inner products and G-effects of LLM unlearning objectives.

    with gefx.trace(model) as tape:
        out_f, out_r = model(**forget), model(**retain)
        objective = -gefx.losses.sequence_nll(out_f.logits, forget["labels"])        # GA
        risks = {"forget": gefx.losses.sequence_nll(out_f.logits, forget["labels"]),
                 "retain": gefx.losses.sequence_nll(out_r.logits, retain["labels"])}
        effects = gefx.g_effect(tape, objective, risks)

Importing gefx queries no device, compiles nothing and does not import transformers.
"""
from . import backends, losses, ops
from .dots import Dots, grad_dots
from .effects import GEffect, RiskEffect
from .geffect import Prepared, g_effect, prepare
from .groups import PRESETS as GROUP_PRESETS
from .rules import Refused, register_rule
from . import soundness
from .tape import Tape, trace
from .check import check
from .update import update
from .shards import engine_grads
from .dist import before_engine_step
from .forward_ad import jvp
from . import integrations  # noqa: E402  (after the engine: it builds on it)

__version__ = "0.1.0"
__all__ = ["trace", "grad_dots", "g_effect", "prepare", "Prepared", "ops", "losses", "backends", "integrations", "register_rule", "Tape",
           "Dots", "GEffect", "RiskEffect", "GROUP_PRESETS", "Refused", "soundness", "check",
           "update", "jvp", "engine_grads", "before_engine_step"]
