"""Benchmark the Triton kernels (gefx.kernels) against the torch reference (gefx.reference), against
explicit per-sample gradients (bmm materialisation) and, for the dense aggregate, against a cuBLAS
GEMM of the same shape, on Llama-2-7B-shaped layers (hidden 4096, MLP 11008, vocab 32000), bf16.

    python bench/bench_gpu_kernels.py                 # CUDA: the full table within --budget seconds
    python bench/bench_gpu_kernels.py --dry-run       # CPU: tiny shapes under TRITON_INTERPRET=1 (code path check)

Columns: ms (median of CUDA-event timings after a warm-up that includes compilation and tuning),
TFLOP/s from counted flops (below), speed-up = torch-reference ms / this ms, peak extra memory =
max_memory_allocated during one call minus what was allocated before it (inputs excluded).

Counted flops (multiply-add = 2):
    ghost_pairwise   2 * B1 * B2 * T * S * (Da + Dg)
    ghost_self       B * T * (T + 1) * (Da + Dg)          (upper triangle incl. diagonal: what is computed)
    dense_dot        2 * B * T * Da * Dg                  (the epilogue's B*T*Dg is not counted)
    materialise      2 * B * T * Da * Dg per set (+ the dots of the B x Dg x Da gradients)
    embedding ops, norm_grad: memory-bound, no TFLOP/s.

The grid is ordered by priority (T=512 B=8, then the small B x T cases where the split feature
loops of kernels/_split.py act: T=512 B=4, T=128 B=4, then T=2048 B=4, the rest of T=128 and
T=512, T=2048 B=8/16) and stops at --budget seconds; a provider whose estimated time exceeds
--max-case-s or whose memory estimate exceeds 40% of free memory is skipped and says so.

Each Triton row also gives the config the host tuner picked for the case (gefx.kernels._common.PICKS,
the planned split included, e.g. "T64 K64 w4 s3 x3") and a cross-check against the torch
reference's result on the same inputs (max |triton - torch| / max |torch|; flagged above 5e-2: the
torch reference itself rounds its bf16 products, so this catches a wrong kernel, not a 1e-3 error;
the exact accuracy checks are the tests). A failed cross-check is reported beside the timings and
stops nothing. Where the pick split the feature loop, "triton_s1" times the same config unsplit.
Every row is written as one JSON line to --out as soon as it is measured (default
bench/out_gpu/kernels.jsonl; stdout is line-buffered), so a run cut short (timeout: SIGTERM) keeps
everything it measured; the target summary is printed for the rows measured so far.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before gefx.kernels / triton kernels are defined

import torch  # noqa: E402

from gefx import reference  # noqa: E402

LAYERS = {"attn": (4096, 4096), "mlp": (4096, 11008), "lm_head": (4096, 32000)}  # (Da = in, Dg = out)
VOCAB, HIDDEN = 32000, 4096
TS, BS = (128, 512, 2048), (4, 8, 16)
DRY_LAYERS = {"attn": (48, 48), "mlp": (48, 80)}
DRY_VOCAB, DRY_HIDDEN = 97, 48


# ------------------------------------------------------------------------------------------------
# timing and memory


def _sync():
    if torch.cuda.is_available() and not DRY:
        torch.cuda.synchronize()


def time_ms(fn, reps: int = 10, long_ms: float = 50.0) -> float:
    """Median ms after one warm-up call (a single timed run when a call takes longer than long_ms)."""
    fn()
    _sync()
    times = []
    for _ in range(reps):
        if DRY:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        else:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        if times[0] > long_ms:
            break
    times.sort()
    return times[len(times) // 2]


def peak_extra_mib(fn) -> float:
    if DRY:
        return float("nan")
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_tflops(dev, dtype) -> float:
    """Measured dense matmul throughput of this card (the yardstick for the ghost kernels)."""
    n = 256 if DRY else 8192
    x = torch.randn(n, n, device=dev, dtype=dtype)
    y = torch.randn(n, n, device=dev, dtype=dtype)
    ms = time_ms(lambda: x @ y, reps=20)
    return 2 * n ** 3 / ms / 1e9


# ------------------------------------------------------------------------------------------------
# baselines: explicit per-sample gradients


def per_sample_grads(a, g):
    """[B, Dg, Da] per-sample weight gradients G_i^T A_i (storage dtype, fp32 accumulation inside bmm)."""
    return torch.bmm(g.transpose(1, 2), a)


def mat_self(a, g, mask=None):
    pg = per_sample_grads(a, g)
    return torch.linalg.vector_norm(pg, dim=(1, 2), dtype=torch.float32) ** 2


def mat_pairwise(a1, g1, a2, g2, m1=None, m2=None):
    p1 = per_sample_grads(a1, g1).flatten(1)
    p2 = per_sample_grads(a2, g2).flatten(1)
    return (p1 @ p2.T).float()


def mat_dense(a, g, m, mask=None):
    pg = per_sample_grads(a, g)
    return (pg.flatten(1).float() @ m.flatten().float())


def emb_grads(ids, g, vocab):
    b, t, d = g.shape
    rows = (ids + torch.arange(b, device=ids.device)[:, None] * vocab).flatten()
    out = torch.zeros(b * vocab, d, device=g.device, dtype=torch.float32)
    return out.index_add_(0, rows, g.reshape(-1, d).float()).view(b, vocab * d)


def mat_emb_self(ids, g, mask=None, vocab=VOCAB):
    return emb_grads(ids, g, vocab).square().sum(1)


def mat_emb_pairwise(ids1, g1, ids2, g2, m1=None, m2=None, vocab=VOCAB):
    return emb_grads(ids1, g1, vocab) @ emb_grads(ids2, g2, vocab).T


# ------------------------------------------------------------------------------------------------
# the grid


def zipf_ids(b, t, vocab, dev, gen):
    """Token ids with a Zipf-like frequency profile (real text repeats tokens; uniform ids would
    make the embedding kernels' tile skipping look unrealistically good)."""
    w = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(w, b * t, replacement=True, generator=gen).view(b, t).to(dev)


def cases(dry: bool):
    layers = DRY_LAYERS if dry else LAYERS
    hidden, vocab = (DRY_HIDDEN, DRY_VOCAB) if dry else (HIDDEN, VOCAB)
    grid = [(16, 2), (33, 3)] if dry else (
        [(512, 8), (512, 4), (128, 4), (2048, 4), (128, 8), (128, 16), (512, 16), (2048, 8), (2048, 16)])
    for t, b in grid:
        for op in ("ghost_self", "ghost_pairwise", "dense_dot"):
            for layer, (da, dg) in layers.items():
                yield dict(op=op, layer=layer, T=t, B=b, Da=da, Dg=dg)
        for op in ("embedding_self", "embedding_pairwise", "embedding_dense_dot"):
            yield dict(op=op, layer="embed", T=t, B=b, Da=vocab, Dg=hidden)
        yield dict(op="norm_grad", layer="rmsnorm", T=t, B=b, Da=hidden, Dg=hidden)


def flops(c) -> float:
    b, t, da, dg, op = c["B"], c["T"], c["Da"], c["Dg"], c["op"]
    return {"ghost_pairwise": 2.0 * b * b * t * t * (da + dg), "ghost_self": 1.0 * b * t * (t + 1) * (da + dg),
            "dense_dot": 2.0 * b * t * da * dg}.get(op, 0.0)


def mat_flops(c) -> float:
    n = 2 if c["op"] == "ghost_pairwise" else 1
    return 2.0 * n * c["B"] * c["T"] * c["Da"] * c["Dg"]


def make_inputs(c, dev, dtype, gen):
    b, t, da, dg = c["B"], c["T"], c["Da"], c["Dg"]
    mask = (torch.rand(b, t, generator=gen) > 0.1).to(dev)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype)

    op = c["op"]
    if op.startswith("ghost") or op == "dense_dot":
        a, g = rnd(b, t, da), rnd(b, t, dg) * 0.01
        if op == "ghost_self":
            return (a, g, mask)
        if op == "ghost_pairwise":
            return (a, g, rnd(b, t, da), rnd(b, t, dg) * 0.01, mask, mask)
        return (a, g, rnd(dg, da) * 0.01, mask)
    if op.startswith("embedding"):
        ids, g = zipf_ids(b, t, da, dev, gen), rnd(b, t, dg) * 0.01
        if op == "embedding_self":
            return (ids, g, mask)
        if op == "embedding_pairwise":
            return (ids, g, zipf_ids(b, t, da, dev, gen), rnd(b, t, dg) * 0.01, mask, mask)
        return (ids, g, rnd(da, dg) * 0.01, mask)
    return (rnd(b, t, da), rnd(b, t, da) * 0.01, mask)  # norm_grad


def providers(c, ops, vocab):
    op = c["op"]
    out = {"torch": reference.OPS[op], "triton": ops[op]}  # torch first: the speed-up baseline
    if op == "ghost_self":
        out["materialise"] = mat_self
    elif op == "ghost_pairwise":
        out["materialise"] = mat_pairwise
    elif op == "dense_dot":
        out["cublas_gemm"] = lambda a, g, m, mask=None: a.reshape(-1, a.shape[-1]) @ m.T
        out["materialise"] = mat_dense
    elif op == "embedding_self":
        out["materialise"] = lambda *x: mat_emb_self(*x, vocab=vocab)
    elif op == "embedding_pairwise":
        out["materialise"] = lambda *x: mat_emb_pairwise(*x, vocab=vocab)
    return out


def mem_estimate(c, name) -> float:
    """Bytes the provider allocates beyond its inputs (rough, to skip what cannot fit)."""
    b, t, da, dg, op = c["B"], c["T"], c["Da"], c["Dg"], c["op"]
    if name == "materialise":
        n = 2 if "pairwise" in op else 1
        return n * b * da * dg * (4 if op.startswith("embedding") else 2) * 2
    return 0.0


def est_seconds(c, name, peak_tflops) -> float:
    f = mat_flops(c) if name == "materialise" else flops(c)
    eff = {"triton": 0.3, "torch": 0.15, "materialise": 0.4, "cublas_gemm": 0.6}.get(name, 0.3)
    return f / (eff * peak_tflops * 1e12) if f else 0.0


# ------------------------------------------------------------------------------------------------


def picked(start: int) -> list[dict]:
    """The tuner's picks made since PICKS had `start` entries (the case's configs)."""
    from gefx.kernels import _common as C
    return C.PICKS[start:]


def unsplit(op, picks):
    """A provider running the picked config with its feature loop unsplit, or None (no split)."""
    import importlib
    cfgs = [p["config"] for p in picks if p["op"] == op and p["config"].get("SPLIT", 1) > 1]
    if not cfgs:
        return None
    mod = importlib.import_module(f"gefx.kernels.{op}")
    cfg = dict(cfgs[-1], SPLIT=1)
    return lambda *x: mod._launch(*x, cfg)


def xcheck(out, ref) -> float:
    """max |out - ref| / max |ref| (0 when both vanish)."""
    out, ref = out.double(), ref.double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((out - ref).abs().max()) if ref.numel() else 0.0
    return diff / scale if scale else diff


XCHECK_TOL = 5e-2


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, fp32")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the whole grid")
    ap.add_argument("--max-case-s", type=float, default=6.0, help="skip a provider estimated slower than this")
    ap.add_argument("--ops", default="", help="comma-separated subset of ops")
    ap.add_argument("--out", default=None, help="JSON lines, one per measured row (default "
                    "bench/out_gpu/kernels.jsonl; none in a dry run unless given)")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, _stop)

    import gefx.kernels as K
    from gefx.kernels import _common as C
    from gefx.kernels.compile_check import cfg_label

    if K.UNAVAILABLE:
        print(f"triton backend unavailable: {K.UNAVAILABLE}")
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU code-path check")
        return 2
    dev = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16  # bf16 is not exact under the interpreter
    vocab = DRY_VOCAB if args.dry_run else VOCAB
    gen = torch.Generator().manual_seed(0)
    if args.dry_run:  # tiny feature sizes: let the cost model split anyway, to run that code path too
        from gefx.kernels import _split
        _split.MIN_STEPS = 1
    deadline = time.monotonic() + args.budget
    wanted = {s for s in args.ops.split(",") if s}
    out_path = args.out or (None if args.dry_run else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   "out_gpu", "kernels.jsonl"))
    sink = None
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        sink = open(out_path, "w")

    import triton
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    head = f"# device: {name}; torch {torch.__version__}; triton {triton.__version__}; dtype {dtype}"
    print(head)
    if sink:
        sink.write(json.dumps(dict(header=head)) + "\n")
        sink.flush()
    if args.dry_run:
        print("# dry run: CPU interpreter timings say nothing about GPU speed; this checks the code path")
    rows, skipped = [], 0
    try:
        peak = matmul_tflops(dev, dtype)
        print(f"# measured {dtype} matmul throughput (8192^3): {peak:.1f} TFLOP/s")
        hdr = (f"{'op':<20}{'layer':<8}{'B':>3}{'T':>6}  {'provider':<12}{'ms':>10}{'TFLOP/s':>9}{'speedup':>9}"
               f"{'peakMiB':>10}  note (triton: picked config; xcheck = max|triton - torch| / max|torch|)")
        print(hdr)
        print("-" * len(hdr))
        for c in cases(args.dry_run):
            if wanted and c["op"] not in wanted:
                continue
            if time.monotonic() > deadline:
                skipped += 1
                continue
            run_case(c, args, dev, dtype, vocab, gen, peak, K, C, cfg_label, sink, rows)
    except KeyboardInterrupt as exc:
        print(f"\n# interrupted ({exc}): {len(rows)} rows measured, all written above"
              + (f" and to {out_path}" if sink else ""))
    finally:
        if sink:
            sink.close()
    if skipped:
        print(f"# {skipped} cases not run: --budget {args.budget:.0f}s reached")
    print()
    bad = [r for r in rows if r.get("xcheck", 0.0) > XCHECK_TOL]
    for r in bad:
        print(f"# CROSS-CHECK FAILED: {r['op']} {r['layer']} B={r['B']} T={r['T']} {r['provider']}: "
              f"{r['xcheck']:.2e} > {XCHECK_TOL}")
    print("# targets: not evaluated in a dry run" if args.dry_run else summary(rows, peak))
    return 1 if bad else 0


def run_case(c, args, dev, dtype, vocab, gen, peak, K, C, cfg_label, sink, rows: list) -> None:
    """Time every provider of one case; print, write and append to `rows` each row as soon as it is
    measured."""
    inputs = make_inputs(c, dev, dtype, gen)
    ref_ms, ref_out = None, None
    free = torch.cuda.mem_get_info()[0] if dev == "cuda" else float("inf")
    provs = providers(c, K.OPS, vocab)
    names = list(provs)
    n = 0
    while n < len(names):
        prov = names[n]
        n += 1
        fn = provs[prov]
        lead = f"{c['op']:<20}{c['layer']:<8}{c['B']:>3}{c['T']:>6}  {prov:<12}"
        note = ""
        est = est_seconds(c, prov.split("_s1")[0], peak)
        if not args.dry_run and est > args.max_case_s:
            note = f"skipped: est {est:.0f}s > --max-case-s"
        elif mem_estimate(c, prov) > 0.4 * free:
            note = f"skipped: needs ~{mem_estimate(c, prov) / 2**30:.0f} GiB"
        if note:
            print(f"{lead}{'-':>10}{'-':>9}{'-':>9}{'-':>10}  {note}")
            continue
        start = len(C.PICKS)
        try:
            result = fn(*inputs)  # warm-up (compiles and tunes) and the result for the cross-check
            ms = time_ms(lambda: fn(*inputs))
            mib = peak_extra_mib(lambda: fn(*inputs))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{lead}{'OOM':>10}")
            continue
        f = mat_flops(c) if prov == "materialise" and flops(c) else flops(c)
        if prov == "cublas_gemm":
            f = 2.0 * c["B"] * c["T"] * c["Da"] * c["Dg"]
        tf = f / ms / 1e9 if f else float("nan")
        if prov == "torch":
            ref_ms, ref_out = ms, result
        speedup = ref_ms / ms if ref_ms else float("nan")
        row = dict(c, provider=prov, ms=ms, tflops=tf, mib=mib, speedup=speedup)
        if prov == "triton":
            picks = picked(start)
            row["config"] = "; ".join(cfg_label(p["config"]) + (f" ({p['how']})" if p["how"] != "timed" else "")
                                      for p in picks) or "(cached)"
            row["picks"] = picks
            if ref_out is not None:
                row["xcheck"] = xcheck(result, ref_out)
            s1 = unsplit(c["op"], picks)
            if s1 is not None:  # time the same config unsplit, right after
                provs["triton_s1"] = s1
                names.insert(n, "triton_s1")
        elif prov == "triton_s1" and ref_out is not None:
            row["xcheck"] = xcheck(result, ref_out)
        note = row.get("config", "")
        if "xcheck" in row:
            flag = " FAILED" if row["xcheck"] > XCHECK_TOL else ""
            note += f"{'; ' if note else ''}xcheck {row['xcheck']:.1e}{flag}"
        print(f"{lead}{ms:>10.3f}{tf:>9.1f}{speedup:>8.2f}x{mib:>10.1f}  {note}")
        rows.append(row)
        if sink:
            sink.write(json.dumps(row, default=str) + "\n")
            sink.flush()
        del result
    del inputs, ref_out
    if dev == "cuda":
        torch.cuda.empty_cache()


def summary(rows, peak) -> str:
    """Check the issue's targets against the measured rows."""
    def find(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    out = ["# targets"]
    for op in ("ghost_self", "ghost_pairwise"):
        for r in find(op=op, T=512, provider="triton"):
            ref = find(op=op, T=512, B=r["B"], layer=r["layer"], provider="torch")
            if not ref:
                continue
            sp = ref[0]["ms"] / r["ms"]
            mem = r["mib"] / ref[0]["mib"] if ref[0]["mib"] and ref[0]["mib"] == ref[0]["mib"] else float("nan")
            ok = sp >= 3 and (mem <= 0.1 or math.isnan(mem))
            out.append(f"{op:<15}{r['layer']:<8} B={r['B']:<3} T=512: speed-up {sp:5.2f}x (>=3), "
                       f"memory {mem:6.3f} of torch (<=0.1)  {'PASS' if ok else 'FAIL'}")
    for r in find(op="dense_dot", provider="triton"):
        gemm = find(op="dense_dot", T=r["T"], B=r["B"], layer=r["layer"], provider="cublas_gemm")
        if gemm:
            ratio = r["ms"] / gemm[0]["ms"]
            out.append(f"dense_dot      {r['layer']:<8} B={r['B']:<3} T={r['T']:<5}: {ratio:5.2f}x the cuBLAS GEMM "
                       f"(<=1.3)  {'PASS' if ratio <= 1.3 else 'FAIL'}")
    for r in rows:
        if r["op"].startswith("ghost") and r["provider"] == "triton" and r["T"] >= 512:
            frac = r["tflops"] / peak
            out.append(f"{r['op']:<15}{r['layer']:<8} B={r['B']:<3} T={r['T']:<5}: {r['tflops']:6.1f} TFLOP/s = "
                       f"{frac:5.1%} of matmul (>=50%)  {'PASS' if frac >= 0.5 else 'FAIL'}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
