"""The `gefx` command (also `python -m gefx`): `gefx env`, `gefx profile`, `gefx check`.

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


def check(argv: list[str]) -> int:
    """`gefx check`: gefx against brute-force per-sample autograd on a model (gefx.check)."""
    import argparse

    import torch

    from .check import check as run_check
    from .unlearning.models import default_model, load_model, parse_dtype

    p = argparse.ArgumentParser(prog="gefx check", description=run_check.__doc__.splitlines()[0] + (
        " Run it first on a new architecture: every counted parameter must come out exact or refused."))
    p.add_argument("--model", default=None, help="HF causal LM name or save_pretrained folder (default: "
                   "the built-in tiny model of `gefx profile`)")
    p.add_argument("--dtype", default="float32", help="dtype to load the model in")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=3, help="samples per batch (two batches)")
    p.add_argument("--modes", default="eval,train", help="eval and/or train (dropout active)")
    p.add_argument("--float64", choices=("auto", "yes", "no"), default="auto",
                   help="measure a float64 copy (auto: when it fits in memory)")
    args = p.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    if args.model is None:
        model = default_model(device=args.device, dtype=dtype)[0]
    else:
        model = load_model(args.model, device=args.device, dtype=dtype, attn_implementation=None)[0]
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or set(modes) - {"eval", "train"}:
        raise ValueError(f"--modes {args.modes!r}: use eval, train or eval,train")
    torch.manual_seed(0)
    report = run_check(model, modes=modes, samples=args.samples,
                       float64={"auto": None, "yes": True, "no": False}[args.float64])
    print(report)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: gefx {env,profile,check} [options]   (gefx profile --help for the main job's options, "
             "gefx check --help for the self-test on a model)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "env":
            return env()
        if cmd == "check":
            return check(rest)
        if cmd == "profile":
            from .unlearning.profile import main as profile_main
            return profile_main(rest)
        print(f"gefx: unknown command {cmd!r}\n{usage}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, PermissionError, KeyError, RuntimeError) as exc:
        if os.environ.get("GEFX_DEBUG"):
            raise
        print(f"gefx {cmd}: error: {exc}", file=sys.stderr)
        return 2
