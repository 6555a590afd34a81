"""The old name of :mod:`gefx.unlearning.report` (the same module object)."""
import sys

from .unlearning import report as _module

sys.modules[__name__] = _module
