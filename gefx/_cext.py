"""Backend "cext": the compiled C++ extension gefx._C (csrc/), fused CPU kernels of the engine ops.

Exports ``OPS`` (op name -> function with the signature of ``gefx.reference``) when the extension
loads, else ``UNAVAILABLE`` = the reason (the build outcome recorded by setup.py in
``gefx/_C_build.txt``, or the import error). Importing this module never raises.

The functions take CPU tensors of dtype float64/32/16 or bfloat16 with any strides; for anything
else (CUDA tensors, ...) they return ``NotImplemented`` and ``gefx.backends`` falls back to the
torch reference. ``GEFX_CEXT_ALGO=auto|ghost|tile`` (read at each call, default auto) picks the
algorithm of the two ghost ops: token Gram tiles, per-sample weight-gradient blocks, or the one
with fewer flops (both exact). On float32 inputs with unit feature stride, ``dense_dot`` and
``ghost_pairwise`` pick among BLAS tiles, AVX-512 micro kernels (``_C.build_info()["micro_avx512"]``;
dense_dot, and ghost_pairwise on small Grams of long features) and, on CPUs with AMX
(``build_info()["amx"]``: Sapphire Rapids and later; large products), bf16 tile products that split
each float into three bf16 parts, to float32 accuracy; ``kernel=1|2|3`` forces one
(``_C.dense_dot(..., kernel)``, ``_C.ghost_pairwise(..., algo, kernel)``).
"""
from __future__ import annotations

import os

import torch

_REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.txt")
_ALGOS = {"": 0, "auto": 0, "ghost": 1, "tile": 2}
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def build_report() -> str | None:
    """What setup.py recorded about building gefx._C (None if it never ran here)."""
    try:
        with open(_REPORT, encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


try:
    from . import _C  # type: ignore[attr-defined]
except Exception as _exc:  # noqa: BLE001 - ImportError, OSError (undefined symbol), ...
    _C = None
    _why = build_report()
    _err = f"{type(_exc).__name__}: {_exc}"
    UNAVAILABLE: str | None = (f"gefx._C is not available ({_why}; import: {_err})" if _why and not
                               _why.startswith("built") else f"gefx._C failed to import ({_err})")
else:
    UNAVAILABLE = None


def _algo() -> int:
    name = os.environ.get("GEFX_CEXT_ALGO", "").strip().lower()
    if name not in _ALGOS:
        raise ValueError(f"GEFX_CEXT_ALGO={name!r} is not one of auto, ghost, tile")
    return _ALGOS[name]


def _ok(*floats, ints=(), masks=()) -> bool:
    """True when every tensor is on the CPU with a dtype the extension reads."""
    for x in floats:
        if x.device.type != "cpu" or x.dtype not in _FLOATS:
            return False
    for x in ints:
        if x.device.type != "cpu" or x.dtype not in (torch.int64, torch.int32):
            return False
    for x in masks:
        if x is not None and (x.device.type != "cpu" or x.dtype != torch.bool):
            return False
    return True


def ghost_pairwise(a1, g1, a2, g2, mask1=None, mask2=None):
    if not _ok(a1, g1, a2, g2, masks=(mask1, mask2)):
        return NotImplemented
    return _C.ghost_pairwise(a1, g1, a2, g2, mask1, mask2, _algo())


def ghost_self(a, g, mask=None):
    if not _ok(a, g, masks=(mask,)):
        return NotImplemented
    return _C.ghost_self(a, g, mask, _algo())


def dense_dot(a, g, m, mask=None):
    if not _ok(a, g, m, masks=(mask,)):
        return NotImplemented
    return _C.dense_dot(a, g, m, mask)


def embedding_pairwise(ids1, g1, ids2, g2, mask1=None, mask2=None):
    if not _ok(g1, g2, ints=(ids1, ids2), masks=(mask1, mask2)):
        return NotImplemented
    return _C.embedding_pairwise(ids1, g1, ids2, g2, mask1, mask2)


def embedding_self(ids, g, mask=None):
    if not _ok(g, ints=(ids,), masks=(mask,)):
        return NotImplemented
    return _C.embedding_self(ids, g, mask)


def embedding_dense_dot(ids, g, m, mask=None):
    if not _ok(g, m, ints=(ids,), masks=(mask,)):
        return NotImplemented
    return _C.embedding_dense_dot(ids, g, m, mask)


def norm_grad(u, g, mask=None):
    if not _ok(u, g, masks=(mask,)):
        return NotImplemented
    return _C.norm_grad(u, g, mask)


# embedding_linear_pairwise (tied embedding / lm_head cross term) is not in the extension: the
# backend seam runs the torch reference for it.
OPS = {} if _C is None else {
    "ghost_pairwise": ghost_pairwise,
    "ghost_self": ghost_self,
    "dense_dot": dense_dot,
    "embedding_pairwise": embedding_pairwise,
    "embedding_self": embedding_self,
    "embedding_dense_dot": embedding_dense_dot,
    "norm_grad": norm_grad,
}
