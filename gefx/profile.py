"""The old name of :mod:`gefx.unlearning.profile` (the same module object)."""
import sys

from .unlearning import profile as _module

sys.modules[__name__] = _module
