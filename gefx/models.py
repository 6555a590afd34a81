"""The old name of :mod:`gefx.unlearning.models` (the same module object)."""
import sys

from .unlearning import models as _module

sys.modules[__name__] = _module
