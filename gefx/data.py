"""The old name of :mod:`gefx.unlearning.data` (the same module object)."""
import sys

from .unlearning import data as _module

sys.modules[__name__] = _module
