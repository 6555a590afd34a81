"""Compile every Triton kernel for A100 (sm_80) and H100 (sm_90) without a GPU.

    python -m gefx.kernels.compile_check [--full] [--targets 80,90] [--markdown] [--json PATH] [--jobs N]

Each case calls a module's own ``_launch(..., cfg)`` on "meta" tensors while ``JITFunction.run`` is
intercepted: the launch records the kernel, its positional/keyword arguments and options, and
returns without running. The signature, constexprs and alignment attributes are then derived by
Triton's own binder for the target backend (the code a real launch runs: pointer dtypes from the
tensors, i32/i64 from the int values, ints equal to 1 specialised to constexprs, divisibility-16
attributes), so nothing is written by hand. ``triton.compile`` then builds PTX and a cubin for the
target; registers and spills come from the ``ptxas -v`` log of that build (or of a re-run of the
bundled ptxas on the PTX when the kernel came from Triton's cache), shared memory from
``metadata.shared``, tensor-core use from the PTX (``mma.sync`` / ``wgmma``).

Under ``TRITON_INTERPRET=1`` the kernels are interpreted functions and cannot be compiled in this
process: the cases then run in worker processes started with ``TRITON_INTERPRET=0``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from . import _common as C

# representative sizes: large enough that no config block is shrunk by fit_configs
B, T, DA, DG, V = 2, 256, 512, 1024, 32000
TARGETS = (80, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {v: k for k, v in DTYPES.items()}
IDS = {"i32": torch.int32, "i64": torch.int64}

# per kernel: the float inputs of its launcher and one mixed-dtype combination the launcher accepts
FLOAT_INPUTS = {
    "dense_dot": (("a", "g", "m"), ("bf16", "bf16", "fp32")),
    "embedding_dense_dot": (("g", "m"), ("bf16", "fp32")),
    "embedding_linear_pairwise": (("g1", "l2", "r2"), ("bf16", "fp32", "fp32")),
    "embedding_pairwise": (("g1", "g2"), ("bf16", "fp32")),
    "embedding_self": (("g",), None),
    "ghost_pairwise": (("a1", "g1", "a2", "g2"), ("bf16", "bf16", "fp32", "fp32")),
    "ghost_self": (("a", "g"), ("bf16", "fp32")),
    "norm_grad": (("u", "g"), ("fp32", "bf16")),
}
KERNELS = tuple(FLOAT_INPUTS)
EMBEDDING = {"embedding_dense_dot", "embedding_linear_pairwise", "embedding_pairwise", "embedding_self"}
# kernels whose inner products use tl.dot (the others are elementwise reductions)
DOT_KERNELS = set(KERNELS) - {"embedding_dense_dot", "norm_grad"}
# kernels with a split feature loop (cfg["SPLIT"] > 1): the launches _launch then makes (the Gram
# kernels: _split._gram_chunk_kernel for the activations' chunks, again for the gradients', then
# _split._gram_reduce_kernel summing the workspace)
SPLIT_LAUNCHES = {"dense_dot": 1, "ghost_pairwise": 3, "ghost_self": 3}
REDUCE = 2  # the reduce kernel's launch index
SPLIT = 2  # the split compiled (the representative sizes have >= 12 feature blocks)


@dataclass(frozen=True)
class Case:
    kernel: str
    dtypes: tuple[str, ...]      # one per FLOAT_INPUTS[kernel][0]
    config: tuple                # sorted (key, value) items of one config
    target: int                  # 80 or 90
    ids: str | None = None       # "i32" / "i64" for the embedding kernels
    mask: bool = False
    launch: int = 0              # which of _launch's kernel launches (1: a split's reduce kernel)

    @property
    def cfg(self) -> dict:
        return dict(self.config)

    @property
    def dtype_label(self) -> str:
        return self.dtypes[0] if len(set(self.dtypes)) == 1 else "mixed(" + ",".join(
            f"{n}={d}" for n, d in zip(FLOAT_INPUTS[self.kernel][0], self.dtypes)) + ")"

    @property
    def label(self) -> str:
        ids = f"-{self.ids}" if self.ids else ""
        mask = "-mask" if self.mask else ""
        launch = f"-launch{self.launch}" if self.launch else ""
        return f"{self.kernel}-{self.dtype_label}{ids}{mask}-{cfg_label(self.cfg)}{launch}-sm{self.target}"


@dataclass
class Record:
    kernel: str
    dtypes: str
    ids: str | None
    mask: bool
    config: str
    target: int
    launch: int = 0
    arch: str = ""
    signature: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)
    compile_s: float = 0.0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared: int | None = None
    shared_limit: int = 0
    shared_estimate: int | None = None
    tensor_cores: str = "no"     # "wgmma", "mma" or "no"
    expects_tensor_cores: bool = False
    error: str | None = None

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        issues = []
        if self.shared is not None and self.shared > self.shared_limit:
            issues.append("smem>limit")
        if self.registers is not None and self.registers > 255:
            issues.append("regs>255")
        if self.spill_stores or self.spill_loads:
            issues.append("spills")
        if self.expects_tensor_cores and self.tensor_cores == "no":
            issues.append("no-tensor-cores")
        return "ok" if not issues else ",".join(issues)


def cfg_label(cfg: dict) -> str:
    """e.g. "M128 N128 K64 G8 w8 s3" (BLOCK_ / GROUP_ sizes, num_warps, num_stages; "x2" for a
    feature loop split in 2)."""
    order = ("BLOCK_M", "BLOCK_N", "BLOCK_T", "BLOCK_S", "BLOCK_K", "BLOCK_D", "GROUP_M")
    parts = [("G" if k == "GROUP_M" else k[-1]) + str(cfg[k]) for k in order if k in cfg]
    split = [f"x{cfg['SPLIT']}"] if cfg.get("SPLIT", 1) > 1 else []
    return " ".join(parts + [f"w{cfg['num_warps']}", f"s{cfg['num_stages']}"] + split)


def _module(kernel: str):
    import importlib
    return importlib.import_module(f"gefx.kernels.{kernel}")


def _configs(kernel: str, fp32: bool = False) -> list[dict]:
    """The module's configs for 16-bit or float32 (and mixed) dots (CONFIGS / CONFIGS_FP32), plus
    whatever its fit_configs produces from them at the representative sizes."""
    mod = _module(kernel)
    sizes = {"dense_dot": (T, DA, DG), "embedding_dense_dot": (T, DG), "embedding_linear_pairwise": (T, T, DG),
             "embedding_pairwise": (T, T, DG), "embedding_self": (T, DG), "ghost_pairwise": (T, T, DA, DG),
             "ghost_self": (T, DA, DG), "norm_grad": (T, DG)}[kernel]
    per_dtype = hasattr(mod, "CONFIGS_FP32")
    out = [dict(c) for c in (mod.CONFIGS_FP32 if fp32 and per_dtype else mod.CONFIGS)]
    for c in (mod.fit_configs(*sizes, fp32=fp32) if per_dtype else mod.fit_configs(*sizes)):
        if c not in out:
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# cases


def cases(full: bool = False, targets=TARGETS, kernels=KERNELS) -> list[Case]:
    """The full grid (every dtype, mixed, id dtype, mask, config, target; each config of a split
    kernel also split: for the Gram kernels both chunk-kernel launches, and the reduce kernel once
    per tile shape) or the representative one ({fp32, bf16} x first config x targets, plus one
    mixed, one int64-id and one masked case, and the first config split, with its launches)."""
    out = []
    for kernel in kernels:
        names, mixed = FLOAT_INPUTS[kernel]
        combos = [(d,) * len(names) for d in (DTYPES if full else ("fp32", "bf16"))]
        if mixed:
            combos.append(mixed)
        ids_opts = tuple(IDS) if kernel in EMBEDDING else (None,)
        for target in targets:
            reduced = set()
            for dts in combos:
                configs = _configs(kernel, fp32="fp32" in dts)
                for n, cfg in enumerate(configs if full else configs[:1]):
                    variants = [cfg]
                    if kernel in SPLIT_LAUNCHES and (full or (n == 0 and mixed != dts)):
                        variants.append(dict(cfg, SPLIT=SPLIT))
                    for c in variants:
                        items = tuple(sorted(c.items()))
                        gram_split = c.get("SPLIT", 1) > 1 and SPLIT_LAUNCHES[kernel] > 1
                        for ids in ids_opts:
                            for mask in (False, True):
                                if not full:
                                    # representative: int32 ids, no mask, except one extra int64 + mask case
                                    if ids == "i64" or mask:
                                        continue
                                for launch in ((0, 1) if gram_split else (0,)):
                                    out.append(Case(kernel, dts, items, target, ids, mask, launch))
                        tile = (c.get("BLOCK_T"), c.get("BLOCK_S"))
                        if gram_split and tile not in reduced:
                            reduced.add(tile)
                            out.append(Case(kernel, dts, items, target, ids_opts[0], False, launch=REDUCE))
            if not full:
                items = tuple(sorted(_configs(kernel)[0].items()))
                out.append(Case(kernel, (("bf16",) * len(names)), items, target,
                                "i64" if kernel in EMBEDDING else None, True))
    return out


def _inputs(case: Case) -> tuple:
    """Meta tensors for the launcher's _launch, in its argument order (without cfg)."""
    dev = "meta"
    dt = dict(zip(FLOAT_INPUTS[case.kernel][0], (DTYPES[d] for d in case.dtypes)))
    ids_dt = IDS[case.ids] if case.ids else None

    def x(name, *shape):
        return torch.empty(shape, dtype=dt[name], device=dev)

    def ids():
        return torch.empty((B, T), dtype=ids_dt, device=dev)

    def mask():
        return torch.empty((B, T), dtype=torch.bool, device=dev) if case.mask else None

    k = case.kernel
    if k == "dense_dot":
        return x("a", B, T, DA), x("g", B, T, DG), x("m", DG, DA), mask()
    if k == "embedding_dense_dot":
        return ids(), x("g", B, T, DG), x("m", V, DG), mask()
    if k == "embedding_linear_pairwise":
        return ids(), x("g1", B, T, DG), x("l2", B, T, V), x("r2", B, T, DG), mask(), mask()
    if k == "embedding_pairwise":
        return ids(), x("g1", B, T, DG), ids(), x("g2", B, T, DG), mask(), mask()
    if k == "embedding_self":
        return ids(), x("g", B, T, DG), mask()
    if k == "ghost_pairwise":
        return x("a1", B, T, DA), x("g1", B, T, DG), x("a2", B, T, DA), x("g2", B, T, DG), mask(), mask()
    if k == "ghost_self":
        return x("a", B, T, DA), x("g", B, T, DG), mask()
    if k == "norm_grad":
        return x("u", B, T, DG), x("g", B, T, DG), mask()
    raise KeyError(k)


# ---------------------------------------------------------------------------------------------
# launch interception and compilation


@contextlib.contextmanager
def record_launches():
    """Within the block, `kernel[grid](*args, **kwargs)` records (fn, args, kwargs) and runs nothing."""
    from triton.runtime import jit as J

    calls = []
    orig = J.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, dict(kwargs)))
        return None

    J.JITFunction.run = run
    try:
        yield calls
    finally:
        J.JITFunction.run = orig


def record(case: Case):
    """(fn, args, kwargs) of the case's kernel launch (case.launch) among those the module's _launch
    makes: one, or for a split Gram kernel three (the chunk kernel for the activations, for the
    gradients, then the reduce kernel)."""
    from triton.runtime.jit import JITFunction

    mod = _module(case.kernel)
    with record_launches() as calls:
        mod._launch(*_inputs(case), case.cfg)
    want = SPLIT_LAUNCHES[case.kernel] if case.cfg.get("SPLIT", 1) > 1 else 1
    if len(calls) != want:
        raise RuntimeError(f"{case.kernel}._launch made {len(calls)} kernel launches, expected {want}")
    fn = calls[case.launch][0]
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{case.kernel}: kernel is {type(fn).__name__}, not a JITFunction "
                           "(TRITON_INTERPRET=1 in this process? run the cases in workers)")
    return calls[case.launch]


def specialize(fn, args: tuple, kwargs: dict, target: int):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them for `target`."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    gpu = GPUTarget("cuda", target, 32)
    backend = make_backend(gpu)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    # the options JITFunction.run adds (they differ between Triton versions)
    for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, opt):
            kwargs[opt] = getattr(knobs.compilation, opt)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return gpu, signature, constexprs, attrs, options


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_path(capability: int = 80) -> str | None:
    """The ptxas Triton uses for this capability (3.9 takes the CUDA 13 one from sm_90 up)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(capability).path
        except TypeError:
            return get_ptxas().path
    except Exception:  # noqa: BLE001
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        return p if os.access(p, os.X_OK) else None


def parse_ptxas(log: str) -> dict:
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        if m:
            out[key] = max(int(v) for v in m)
    return out


def run_ptxas(ptx: str, arch: str, capability: int) -> str:
    """`ptxas -v` log for the PTX with the flags Triton's make_cubin uses."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(capability), "-lineinfo", "-v", *_ptxas_extra(), f"--gpu-name={arch}", src,
               "-o", os.path.join(d, "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _ptxas_extra() -> list[str]:
    """The register-allocation flag newer Tritons pass to ptxas (3.9: a ptxas 13.x workaround)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend
    return ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(CUDABackend.make_cubin) else []


def tensor_cores(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "no"


def shared_limit(target: int) -> int:
    return C.SMEM_LIMIT.get(target, C.SMEM_LIMIT[80])


def compile_case(case: Case) -> Record:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    rec = Record(case.kernel, case.dtype_label, case.ids, case.mask, cfg_label(case.cfg), case.target, case.launch,
                 shared_limit=shared_limit(case.target),
                 shared_estimate=C.smem_estimate(case.cfg, max(C.dtype_bytes(DTYPES[d]) for d in case.dtypes),
                                                 case.target))
    names = FLOAT_INPUTS[case.kernel][0]
    # tensor cores expected where a tl.dot multiplies two fp16/bf16 tiles of the same dtype
    rec.expects_tensor_cores = case.kernel in DOT_KERNELS and _dot_low_precision(case, names)
    try:
        fn, args, kwargs = record(case)
        gpu, signature, constexprs, attrs, options = specialize(fn, args, kwargs, case.target)
        rec.signature = dict(signature)
        rec.constexprs = {fn.arg_names[k[0]]: v for k, v in constexprs.items()}
        log = io.StringIO()
        dump = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu,
                                   options=options.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = dump
        rec.compile_s = round(time.perf_counter() - t0, 3)
        rec.arch = f"sm_{case.target}" + ("a" if case.target >= 90 else "")
        stats = parse_ptxas(log.getvalue())
        if "registers" not in stats:  # cache hit: no ptxas ran
            stats = parse_ptxas(run_ptxas(k.asm["ptx"], rec.arch, case.target))
        for key in _PTXAS_RE:
            setattr(rec, key, stats.get(key, 0 if key != "registers" else None))
        rec.shared = int(k.metadata.shared)
        rec.tensor_cores = tensor_cores(k.asm["ptx"])
    except Exception as exc:  # noqa: BLE001 - reported per case
        rec.error = f"{type(exc).__name__}: {exc}"[:2000]
    return rec


def _dot_low_precision(case: Case, names) -> bool:
    """Whether a tl.dot of the case's launch multiplies two fp16/bf16 tiles of one dtype (a split
    Gram kernel's launch 0 / 1 runs the activations' / the gradients' dot only, its reduce none)."""
    dt = dict(zip(names, case.dtypes))
    pairs = {"dense_dot": [("a", "m")], "embedding_linear_pairwise": [("g1", "r2")],
             "embedding_pairwise": [("g1", "g2")], "embedding_self": [("g", "g")],
             "ghost_pairwise": [("a1", "a2"), ("g1", "g2")], "ghost_self": [("a", "a"), ("g", "g")]}
    pairs = pairs.get(case.kernel, [])
    if case.cfg.get("SPLIT", 1) > 1 and SPLIT_LAUNCHES.get(case.kernel, 1) > 1:
        pairs = pairs[case.launch:case.launch + 1] if case.launch < REDUCE else []
    return any(dt[x] == dt[y] and dt[x] in ("fp16", "bf16") for x, y in pairs)


def _kernels_compilable_here() -> bool:
    from triton.runtime.jit import JITFunction
    return isinstance(_module("ghost_self")._ghost_self_kernel, JITFunction)


def run_cases(cs: list[Case], jobs: int | None = None) -> list[Record]:
    """Compile the cases, in worker processes (TRITON_INTERPRET=0) when jobs > 1 or when this
    process interprets the kernels."""
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 and _kernels_compilable_here():
        return [compile_case(c) for c in cs]
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, max(1, len(cs))),
                                 mp_context=multiprocessing.get_context("spawn")) as ex:
            return list(ex.map(compile_case, cs, chunksize=1))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def available() -> str | None:
    """None when CUDA code can be compiled here (ptxas present), else the reason."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton's CUDA backend is not importable: {exc}"
    p = ptxas_path()
    if not p or not os.access(p, os.X_OK):
        return "no ptxas found (triton's bundled backends/nvidia/bin/ptxas or TRITON_PTXAS_PATH)"
    try:
        subprocess.run([p, "--version"], capture_output=True, check=True, timeout=30)
    except Exception as exc:  # noqa: BLE001
        return f"ptxas at {p} does not run: {exc}"
    return None


# ---------------------------------------------------------------------------------------------
# CLI


COLUMNS = ("kernel", "dtypes", "ids", "mask", "config", "target", "regs", "spill st/ld", "shared KiB",
           "est KiB", "limit KiB", "tensor cores", "compile s", "verdict")


def _row(r: Record) -> list[str]:
    kib = lambda n: "-" if n is None else f"{n / 1024:.1f}"  # noqa: E731
    return [r.kernel + (f" [launch {r.launch}]" if r.launch else ""), r.dtypes, r.ids or "-", "yes" if r.mask else "no", r.config, f"sm_{r.target}",
            "-" if r.registers is None else str(r.registers),
            "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}",
            kib(r.shared), kib(r.shared_estimate), kib(r.shared_limit), r.tensor_cores, f"{r.compile_s:.1f}",
            r.verdict if not r.error else "ERROR: " + r.error.splitlines()[0][:80]]


def table(records: list[Record], markdown: bool = False) -> str:
    rows = [_row(r) for r in records]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*COLUMNS)] + [fmt.format(*r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gefx.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every dtype/ids/mask/config (default: representative)")
    p.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--no-cache", action="store_true", help="recompile even if Triton's cache has the kernel")
    a = p.parse_args(argv)
    why = available()
    if why:
        print(f"compile_check: cannot compile CUDA kernels here: {why}", file=sys.stderr)
        return 2
    if a.no_cache:
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    cs = cases(a.full, tuple(int(t) for t in a.targets.split(",")), tuple(a.kernels.split(",")))
    t0 = time.perf_counter()
    recs = run_cases(cs, a.jobs)
    wall = time.perf_counter() - t0
    print(table(recs, a.markdown))
    bad = [r for r in recs if r.error]
    print(f"\n{len(recs)} cases in {wall:.1f} s wall ({sum(r.compile_s for r in recs):.1f} s compiling), "
          f"{len(bad)} errors, {sum(r.verdict != 'ok' for r in recs)} not ok")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(asdict(r), verdict=r.verdict) for r in recs], f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
