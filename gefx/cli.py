"""The `gefx` command (also `python -m gefx`): `gefx env`, `gefx profile`.

Bad input ends with a one-line message and exit status 2; set GEFX_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import os
import platform
import sys


def env() -> int:
    """Print versions, devices and which backends are available (and why not)."""
    import torch

    from . import __version__, backends

    lines = [f"gefx {__version__}", f"python {platform.python_version()} ({sys.platform})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"triton: not importable ({type(exc).__name__}: {exc})")
    try:
        import transformers
        lines.append(f"transformers {transformers.__version__}")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"transformers: not importable ({exc})")
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
    lines.append("devices: " + ", ".join(devices))
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} GEFX_BACKEND={os.environ.get('GEFX_BACKEND', '')!r}")
    lines.append("backends:")
    for name, state in backends.status().items():
        lines.append(f"  {name:7s} {state}")
    from . import _cext
    if _cext._C is not None:
        info = _cext._C.build_info()
        lines.append("cext build: " + ", ".join(f"{k}={info[k]}" for k in sorted(info)))
    for dev in ("cpu", "cuda") if cuda else ("cpu",):
        lines.append(f"default backend for {dev} tensors: {backends.choose(torch.device(dev))}")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: gefx {env,profile} [options]   (gefx profile --help for the main job's options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "env":
            return env()
        if cmd == "profile":
            from .profile import main as profile_main
            return profile_main(rest)
        print(f"gefx: unknown command {cmd!r}\n{usage}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, PermissionError, KeyError, RuntimeError) as exc:
        if os.environ.get("GEFX_DEBUG"):
            raise
        print(f"gefx {cmd}: error: {exc}", file=sys.stderr)
        return 2
