"""The old name of :mod:`gefx.unlearning.objectives` (the same module object)."""
import sys

from .unlearning import objectives as _module

sys.modules[__name__] = _module
