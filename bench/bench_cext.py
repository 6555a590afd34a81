"""C++ extension (gefx._C) against the torch reference on the CPU.

Two ways to run it:

    pytest bench/bench_cext.py --benchmark-only            # pytest-benchmark tables, one group per case
    python bench/bench_cext.py [--threads 2] [--rounds 5]  # the RESULTS.md tables: time ratio + memory,
                                                           # then the kernels of dense_dot and of
                                                           # ghost_pairwise side by side

Cases: ops ghost_pairwise (two sets of B samples), ghost_self, dense_dot; features (in = out) in
{256, 1024}, T in {128, 512}, B in {4, 16}; float32 inputs.

Time ratio: reference time / extension time, each the median of `rounds` runs, the two
implementations alternating run by run (the machine is shared, so interleaving keeps both under the
same load).

Peak extra memory: measured in a child process started with MALLOC_MMAP_THRESHOLD_=65536, so that
every buffer above 64 KiB (torch tensors and the extension's std::vector tiles alike) is a fresh
mmap that shows up in the resident set. Before each call the kernel's peak-RSS mark is reset
(`echo 5 > /proc/self/clear_refs`), and the figure is VmHWM after the call minus VmRSS before it:
everything the call touched beyond its inputs, output included. Linux only. Caveat: the kernel's RSS
counters (VmRSS, VmHWM) are per-CPU batched on recent kernels (6.x: up to about 32 pages per CPU), so
figures below ~0.25 MiB on 2 CPUs are within their error and can read 0.00 although a few 100 KiB
of per-thread tiles were touched; compare small cases with the tile sizes in csrc/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import pytest
import torch

from gefx import reference as R

FEATURES = (256, 1024)
TOKENS = (128, 512)
BATCHES = (4, 16)
OPS = ("ghost_pairwise", "ghost_self", "dense_dot")
CASES = [(op, d, t, b) for op in OPS for d in FEATURES for t in TOKENS for b in BATCHES]


def _ext():
    from gefx import _cext
    if _cext.UNAVAILABLE:
        raise RuntimeError(_cext.UNAVAILABLE)
    return _cext._C


def make_inputs(op: str, d: int, t: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if op == "ghost_pairwise":
        return (x(b, t, d), x(b, t, d), x(b, t, d), x(b, t, d))
    if op == "ghost_self":
        return (x(b, t, d), x(b, t, d))
    return (x(b, t, d), x(b, t, d), x(d, d) / d**0.5)


def runner(impl: str, op: str, args):
    if impl == "torch":
        fn = R.OPS[op]
        return lambda: fn(*args)
    C = _ext()
    if op == "ghost_pairwise":
        return lambda: C.ghost_pairwise(*args, None, None, 0)
    if op == "ghost_self":
        return lambda: C.ghost_self(*args, None, 0)
    return lambda: C.dense_dot(*args, None)


# ---------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", ["torch", "cext"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-D{c[1]}-T{c[2]}-B{c[3]}")
def test_cext_vs_torch(benchmark, case, impl):
    op, d, t, b = case
    benchmark.group = f"{op} D={d} T={t} B={b}"
    fn = runner(impl, op, make_inputs(op, d, t, b))
    heavy = op == "ghost_pairwise" and impl == "torch" and t == 512 and d == 1024
    benchmark.pedantic(fn, rounds=1 if heavy else 3, iterations=1, warmup_rounds=0 if heavy else 1)


# ---------------------------------------------------------------- memory (child process)
def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{key}:\s+(\d+)", fh.read()).group(1)) * 1024


def measure_memory(threads: int) -> dict:
    """{(impl, op, d, t, b): peak extra bytes}; runs in a child with a fixed mmap threshold."""
    torch.set_num_threads(threads)
    out = {}
    for op, d, t, b in CASES:
        args = make_inputs(op, d, t, b)
        for impl in ("torch", "cext"):
            fn = runner(impl, op, args)
            fn()  # warm: thread pools, lazy init
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            base = _status("VmRSS")
            res = fn()
            out[f"{impl}|{op}|{d}|{t}|{b}"] = _status("VmHWM") - base
            del res
    return out


def memory_in_child(threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = ("import json, sys; sys.path.insert(0, %r); import bench_cext as b; "
            "print(json.dumps(b.measure_memory(%d)))") % (os.path.dirname(os.path.abspath(__file__)), threads)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the RESULTS.md table
def time_medians(fns: dict, rounds: int) -> dict:
    """Median time of each function, the functions alternating run by run (after one warm-up each)."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def time_ratio(op, d, t, b, rounds: int):
    args = make_inputs(op, d, t, b)
    heavy = op == "ghost_pairwise" and t == 512 and d == 1024
    med = time_medians({impl: runner(impl, op, args) for impl in ("torch", "cext")},
                       max(1, rounds // 2) if heavy else rounds)
    return med["torch"], med["cext"]


def kernels_table(op: str, cases, rounds: int) -> None:
    """An op's kernels side by side against the reference: BLAS tiles, the AVX-512 micro kernel and,
    on AMX CPUs, the AMX kernel; "auto picks" names those whose result auto's
    equals bit for bit (or the tile algorithm's, for ghost_pairwise; "micro=blas": both agree, as can
    happen for a single output)."""
    C = _ext()
    info = C.build_info()
    if not info.get("micro_avx512"):
        print(f"\n({op} micro kernel not available on this CPU/build: kernel table skipped)")
        return
    if op == "dense_dot":
        kernels = {name: (lambda args, k=k: C.dense_dot(*args, None, k))
                   for name, k in (("blas tiles", 1), ("micro kernel", 2), ("amx kernel", 3))
                   if k != 3 or info.get("amx")}
        auto, others = (lambda args: C.dense_dot(*args, None, 0)), {}
    else:
        kernels = {name: (lambda args, k=k: C.ghost_pairwise(*args, None, None, 1, k))
                   for name, k in (("blas tiles", 1), ("micro kernel", 2), ("amx kernel", 3))
                   if k != 3 or info.get("amx")}
        auto, others = (lambda args: C.ghost_pairwise(*args, None, None, 0, 0)), {
            "tile algorithm": lambda args: C.ghost_pairwise(*args, None, None, 2, 0)}
    print(f"\n| {op} D | T | B | torch ms | " + " | ".join(f"{n}: speed-up" for n in kernels) + " | auto picks |")
    print("|---|---|---|---|" + "---|" * (len(kernels) + 1))
    for d, t, b in cases:
        args = make_inputs(op, d, t, b)
        med = time_medians({"torch": lambda: R.OPS[op](*args),
                            **{n: (lambda f=f: f(args)) for n, f in kernels.items()}}, rounds)
        out = auto(args)
        pick = "=".join(n.split()[0] for n, f in {**kernels, **others}.items() if torch.equal(out, f(args))) or "?"
        print(f"| {d} | {t} | {b} | {med['torch'] * 1e3:.2f} | "
              + " | ".join(f"{med['torch'] / med[n]:.2f}x" for n in kernels) + f" | {pick} |", flush=True)


# ghost_pairwise's Gram kernels (two sets of B samples of T tokens, in = out features): small Grams of
# long features, where auto picks the micro kernel, and larger Grams up to 2048 tokens per set at
# 4096 features, where it picks the AMX kernel on CPUs that have one (the #5 case: 1024, 128, 4).
GHOST_KERNEL_CASES = [(d, t, b) for d in (1024, 4096) for t, b in ((64, 1), (64, 2), (128, 1), (128, 2), (64, 4))] \
    + [(1024, 128, 4), (1024, 256, 4), (1024, 128, 16), (4096, 256, 4), (4096, 128, 16)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mem = memory_in_child(args.threads)
    print(f"threads={args.threads} rounds={args.rounds} torch {torch.__version__}")
    print("| op | D | T | B | torch ms | cext ms | speed-up | torch peak extra MiB | cext peak extra MiB | mem ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for op, d, t, b in CASES:
        ref, ext = time_ratio(op, d, t, b, args.rounds)
        mr, me = mem[f"torch|{op}|{d}|{t}|{b}"], mem[f"cext|{op}|{d}|{t}|{b}"]
        print(f"| {op} | {d} | {t} | {b} | {ref * 1e3:.1f} | {ext * 1e3:.1f} | {ref / ext:.2f}x | "
              f"{mr / 2**20:.1f} | {me / 2**20:.2f} | {me / max(mr, 1):.3f} |", flush=True)
    kernels_table("dense_dot", [(d, t, b) for d in FEATURES for t in TOKENS for b in BATCHES], args.rounds)
    kernels_table("ghost_pairwise", GHOST_KERNEL_CASES, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
