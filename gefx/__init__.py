"""gefx: exact per-sample gradient inner products and G-effects of LLM unlearning objectives."""
from . import backends, losses, ops

__version__ = "0.1.0"
