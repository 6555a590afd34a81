"""Backend seam: which implementation runs each engine op.

Three backends share one op table (names in ``gefx.reference.OPS``):

    torch   gefx.reference          always available; the oracle and the fallback
    triton  gefx.kernels            fused GPU kernels (CUDA tensors; CPU only under TRITON_INTERPRET=1)
    cext    gefx._cext              wraps the compiled C++ extension gefx._C (CPU tensors)

A backend module exposes ``OPS`` (op name -> function with the reference's signature) and may
return ``NotImplemented`` from an op for inputs it does not handle (a dtype, a device); the call
then goes to the torch reference. Automatic choice (the default): CUDA tensors -> triton, CPU
tensors -> cext, each when available, else torch, silently. ``GEFX_BACKEND=torch|triton|cext``
(read at each call) forces one; a forced backend that cannot be loaded raises
:class:`BackendUnavailable` with the reason. ``status()`` reports every backend and why not.
Backends are loaded lazily: importing gefx queries no device and compiles nothing.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from . import reference

NAMES = ("torch", "triton", "cext")
_loaded: dict[str, dict[str, Callable] | BaseException] = {"torch": reference.OPS}


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot be used here; the message says why."""


def _import_ops(name: str) -> dict[str, Callable]:
    module = {"triton": "gefx.kernels", "cext": "gefx._cext"}[name]
    mod = importlib.import_module(module)
    reason = getattr(mod, "UNAVAILABLE", None)
    if reason:
        raise BackendUnavailable(f"backend {name!r}: {reason}")
    ops = getattr(mod, "OPS", None)
    if not ops:
        raise BackendUnavailable(f"backend {name!r}: {module} provides no ops")
    return dict(ops)


def load(name: str) -> dict[str, Callable]:
    """The op table of backend `name`, or BackendUnavailable with the reason."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; GEFX_BACKEND must be one of {', '.join(NAMES)}")
    if name not in _loaded:
        try:
            _loaded[name] = _import_ops(name)
        except BaseException as exc:  # noqa: BLE001 - keep the reason, never break `import gefx`
            _loaded[name] = exc
    got = _loaded[name]
    if isinstance(got, BaseException):
        if isinstance(got, BackendUnavailable):
            raise got
        raise BackendUnavailable(f"backend {name!r} failed to load: {type(got).__name__}: {got}") from got
    return got


def status() -> dict[str, str]:
    """Backend name -> 'available' or the reason it is not."""
    out = {}
    for name in NAMES:
        try:
            load(name)
            out[name] = "available"
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


def forced() -> str | None:
    """The backend named by GEFX_BACKEND, or None for automatic choice."""
    name = os.environ.get("GEFX_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in NAMES:
        raise ValueError(f"GEFX_BACKEND={name!r} is not one of auto, {', '.join(NAMES)}")
    return name


def _auto(device: torch.device) -> str:
    preferred = "triton" if device.type == "cuda" else "cext" if device.type == "cpu" else "torch"
    try:
        load(preferred)
        return preferred
    except BackendUnavailable:
        return "torch"


def choose(device: torch.device) -> str:
    """The backend that runs ops on tensors of `device` under the current settings."""
    return forced() or _auto(device)


def dispatch(op: str, *args, **kwargs) -> torch.Tensor:
    """Run op `op` on the chosen backend, falling back to the reference for unsupported inputs."""
    device = next(x.device for x in args if isinstance(x, torch.Tensor))
    name = choose(device)
    fn = load(name).get(op)
    if fn is not None and name != "torch":
        out = fn(*args, **kwargs)
        if out is not NotImplemented:
            return out
    return reference.OPS[op](*args, **kwargs)
