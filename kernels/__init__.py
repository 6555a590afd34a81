"""gefx.kernels: fused Triton kernels for the engine ops (see kernels/README.md).

``OPS`` maps each op name of ``gefx.reference.OPS`` to a host launcher with the reference's
signature; a launcher returns ``NotImplemented`` for inputs its kernel does not run (float64, CPU
tensors outside the interpreter), so gefx.backends falls back to the torch reference. ``UNAVAILABLE``
is None when the backend can run here, else the reason (read by gefx.backends). Importing this
package compiles nothing and queries no device beyond ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import os

if __name__ == "kernels":
    # This folder is installed as gefx.kernels. Imported under the bare name `kernels`, it shadows
    # Hugging Face's `kernels` package (which transformers imports) because a checkout's root is on
    # sys.path (`python -m ...` run from it). Step aside: load that package in our place if it is
    # installed, else stay an empty module (transformers then finds no usable version).
    import importlib.machinery
    import importlib.util
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
else:
    UNAVAILABLE: str | None = None
    OPS: dict = {}

    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        UNAVAILABLE = f"triton is not importable ({type(exc).__name__}: {exc})"
    else:
        import torch

        from ._common import interpreting

        TRITON_MIN = (3, 6)  # the oldest Triton the kernels are tested with (`make test-triton-min`)
        _version = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:2] if x.isdigit())
        if _version < TRITON_MIN:
            UNAVAILABLE = (f"triton {triton.__version__} is older than {'.'.join(map(str, TRITON_MIN))}, the oldest "
                           "version gefx.kernels is tested with; pip install 'triton>=3.6'")
        elif not interpreting() and not torch.cuda.is_available():
            UNAVAILABLE = ("no CUDA device (torch.cuda.is_available() is False) and TRITON_INTERPRET is not 1; "
                           "set TRITON_INTERPRET=1 before importing gefx.kernels to run the kernels on the CPU "
                           "interpreter (slow, for tests)")
        if _version >= TRITON_MIN:
            from .dense_dot import dense_dot_triton
            from .embedding_dense_dot import embedding_dense_dot_triton
            from .embedding_linear_pairwise import embedding_linear_pairwise_triton
            from .embedding_pairwise import embedding_pairwise_triton
            from .embedding_self import embedding_self_triton
            from .ghost_pairwise import ghost_pairwise_triton
            from .ghost_self import ghost_self_triton
            from .norm_grad import norm_grad_triton

            OPS = {
                "ghost_pairwise": ghost_pairwise_triton,
                "ghost_self": ghost_self_triton,
                "dense_dot": dense_dot_triton,
                "embedding_pairwise": embedding_pairwise_triton,
                "embedding_self": embedding_self_triton,
                "embedding_dense_dot": embedding_dense_dot_triton,
                "embedding_linear_pairwise": embedding_linear_pairwise_triton,
                "norm_grad": norm_grad_triton,
            }

    __all__ = ["OPS", "UNAVAILABLE"]
