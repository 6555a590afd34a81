"""End-to-end benchmark: gefx against what users would otherwise do (issue 7).

    python bench/bench_e2e.py                 # the CPU suite (what `make bench` runs), < 10 min on 2 cores
    python bench/bench_e2e.py --quick         # smaller grid, ~2 min
    python bench/bench_e2e.py --device cuda --models llama-1b,llama-7b ...   # see bench/gpu_e2e.sh

Providers (bench/e2e_providers.py): the plain unlearning step; gefx online (the step's own backward
gives grad L, gefx.grad_dots contracts the risks' per-sample gradients against it) on the best
backend and on the torch backend; gefx.g_effect; the reference procedure (3 forward+backward passes
+ a zero-loss pass, full-gradient host copies, moving average, per-parameter dots; batch totals
only); one forward+backward per risk sample; torch.func vmap per-sample gradients (the step on
sdpa, the vmap on eager attention, which vmap needs: e2e_providers.attention); Opacus per-sample
gradients (optional: skipped with a note when opacus is not importable). Rows named
"<provider>_eager" (step_fr_eager, gefx_online_eager) are the same provider with the model switched
to eager attention: their "x step_fr" is relative to step_fr_eager and their gefx speed-up to
gefx_online_eager, so the tables show gefx's overhead on both attention implementations.

Method. The models run Hugging Face's default attention implementation, sdpa (--attn; what users
run), in the headline and the sweeps; eager attention only in the "_eager" rows (the same step with
eager attention, its ratios taken against the eager step and eager gefx) and inside torch.func's
vmap. Every case builds its model and batches once; each provider is first run once and its
numbers are checked against gefx online, key by key (per-instance forget and retain values,
per-group totals; a provider that exceeds its tolerance is reported at once, "CROSS-CHECK FAILED"
with the key and every key's difference, in its CSV row (check_failed) and again at the end, its
timing goes on, and the run exits with status 1 after writing everything): in float32 / float64 max |x - gefx| / max |gefx| <= --tol (1e-3); in bf16 / fp16
max |x - gefx| divided by the largest Cauchy-Schwarz bound ||grad r_i|| ||grad L|| of the key's
entries (from gefx's norms, one extra untimed call) <= --tol-scaled (1e-2), because bf16 rounding
errors scale with the norm product, not with the nearly-cancelling retain values (e2e_providers,
"Agreement"; the CSV keeps the plain figure in max_rel_diff, the scaled one in max_scaled_diff and
the key in diff_key); that call is the warm-up. Then
`rounds` rounds, each running every provider once in a rotated order (interleaved, so all share the
machine's load); the reported time is the median over rounds and every ratio is a ratio of medians
from the same run. Peak extra memory comes from a second pass in a child process started with
MALLOC_MMAP_THRESHOLD_ = --mem-threshold (default 1 MiB: every buffer >= 1 MiB is a fresh mmap and is
counted; smaller ones, from malloc arenas, may not be; 65536 counts nearly everything, ~4x slower): the kernel's peak-RSS mark
is reset before each call (/proc/self/clear_refs) and the figure is VmHWM after the call minus
VmRSS before it (on CUDA: torch.cuda.max_memory_allocated minus memory allocated before).

Outputs in --out (default bench/out): e2e.csv (one row per case x provider), e2e.json (the same
plus machine and versions), e2e_*.png (log-log time and peak memory against batch size and
sequence length), and a markdown summary on stdout (e2e.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_providers as E  # noqa: E402

try:
    import opacus  # noqa: F401
    OPACUS = None
except Exception as exc:  # noqa: BLE001
    OPACUS = f"opacus not importable ({type(exc).__name__}: {exc}); its baseline is skipped"

HERE = Path(__file__).resolve().parent


# -- the grid -------------------------------------------------------------------------------------
def grid(args) -> list[dict]:
    """Cases in run order. Each: section, model, B, T, objective, providers, rounds (and op)."""
    m_small, m_big = args.models.split(",") if "," in args.models else (args.models, None)
    R = args.rounds
    eager = ["step_fr_eager", "gefx_online_eager"]  # the same step with eager attention (an extra column)
    full = ["step_f", "step_fr", "floor", "gefx_online", "gefx_online_grads", "gefx_geffect", "gefx_online_torch", "reference",
            "per_sample_loop", "torch_func", "opacus"] + eager
    short = ["step_f", "step_fr", "floor", "gefx_online", "gefx_online_grads", "gefx_geffect", "reference"] + eager
    sweep = ["step_fr", "gefx_online", "reference"] + eager  # + torch_func in the memory pass (mem_extra)
    B, T = args.batch, args.seq
    cases = [dict(section="headline", model=m_small, B=B, T=T, objective="ga", providers=full, rounds=R)]
    for obj in [o for o in args.objectives.split(",") if o in ("npo", "tnpo")]:
        cases.append(dict(section="headline", model=m_small, B=B, T=T, objective=obj, providers=short, rounds=max(2, R - 2)))
    for op in ("pairwise", "norms", "aggregate"):
        cases.append(dict(section="ops", model=m_small, B=args.ops_batch, T=T, objective="ga", op=op, rounds=max(2, R - 2),
                          providers=["gefx_op", "gefx_op_torch", "torch_func_op", "per_sample_loop_op", "opacus_op"]))
    sr = max(2, R - 2)
    for b in args.sweep_batch:
        if b != B:
            cases.append(dict(section="sweep_batch", model=m_small, B=b, T=T, objective="ga", providers=sweep, rounds=sr,
                              mem_extra=["torch_func"]))
    for t in args.sweep_seq:
        cases.append(dict(section="sweep_seq", model=m_small, B=args.sweep_seq_batch, T=t, objective="ga",
                          providers=sweep, rounds=sr, mem_extra=["torch_func"]))
    for obj, b, t in ((o, args.batch, args.seq) for o in ("npo", "ga")) if args.narrow else ():
        cases.append(dict(section="narrow", model="llama-narrow", B=b, T=t, objective=obj, rounds=sr,
                          providers=["step_fr", "floor", "gefx_online", "reference", "per_sample_loop"]))
    if args.narrow:  # fewer, longer sequences: where a per-sample loop is at its best
        cases.append(dict(section="narrow", model="llama-narrow", B=4, T=512, objective="ga", rounds=sr,
                          providers=["step_fr", "floor", "gefx_online", "reference", "per_sample_loop"]))
    if m_big:
        cases.append(dict(section="model_size", model=m_big, B=args.big_batch, T=args.big_seq, objective="ga",
                          providers=["step_f", "step_fr", "gefx_online", "reference", "torch_func"], rounds=sr))
    return cases


def make_provider(name: str, w: E.Workload, op: str | None):
    if name.endswith("_eager"):
        # "<base>_eager": the base provider with the model (and the NPO/TNPO reference) on eager attention
        base = make_provider(name[: -len("_eager")], w, op)

        def eager():
            with E.attention(w.model, "eager"), E.attention(w.ref, "eager"):
                return base()
        return eager
    if name == "step_f":
        return lambda: E.plain_step(w, retain_forward=False)
    if name == "step_fr":
        return lambda: step_fr(w)
    if name == "floor":
        return lambda: floor(w)
    if name == "gefx_online":
        return lambda: E.gefx_online(w)
    if name == "gefx_online_grads":
        return lambda: E.gefx_online_grads(w)
    if name == "gefx_online_torch":
        return lambda: E.gefx_online(w, "torch")
    if name == "gefx_geffect":
        return lambda: E.gefx_geffect(w)
    if name == "reference":
        ref = E.ReferenceProcedure()
        return lambda: ref(w)
    if name == "per_sample_loop":
        return lambda: E.per_sample_loop(w)
    if name == "torch_func":
        return lambda: E.torch_func(w)
    if name == "opacus":
        p = E.OpacusProvider(w)
        return lambda: p(w)
    if name == "gefx_op":
        return lambda: E.gefx_op(w, op)
    if name == "gefx_op_torch":
        return lambda: E.gefx_op(w, op, "torch")
    if name == "torch_func_op":
        return lambda: E.torch_func_op(w, op)
    if name == "per_sample_loop_op":
        return lambda: E.per_sample_loop_op(w, op)
    if name == "opacus_op":
        p = E.OpacusProvider(w)
        return lambda: p(w, op)
    raise ValueError(name)


def step_fr(w: E.Workload):
    """The plain step on the whole forget + retain batch: forward and backward of both
    (L + NLL(retain), a GradDiff-style step): the same tokens gefx processes."""
    w.zero()
    lf, lr = w.logits(w.f_ids), w.logits(w.r_ids)
    from gefx.losses import sequence_nll
    (w.objective_vec(lf, w.ref_logits(w.f_ids)).sum() + sequence_nll(lr, w.r_lab).mean()).backward()


def floor(w: E.Workload):
    """Structural floor of the online mode, measured: the step with the retain forward, plus one
    partial backward (torch.autograd.grad to every layer output, no weight gradients) for each
    risk whose gradients the step's own cannot give (retain; under TNPO the forget risk too),
    without any contraction."""
    import gefx
    from gefx.losses import sequence_nll
    w.zero()
    with gefx.trace(w.model) as tape:
        lf, lr = w.logits(w.f_ids), w.logits(w.r_ids)
        nll_f, nll_r = sequence_nll(lf, w.f_lab), sequence_nll(lr, w.r_lab)
        w.objective_vec(lf, w.ref_logits(w.f_ids)).sum().backward(retain_graph=True)
        outs = [o for c in tape.calls for o in c.outputs]
        for r in ((nll_f, nll_r) if w.objective == "tnpo" else (nll_r,)):
            torch.autograd.grad(r.sum(), outs, retain_graph=True, allow_unused=True)


MEM_SECTIONS = ("headline", "sweep_batch", "sweep_seq", "model_size")
NO_RESULT = {"step_f", "step_fr", "floor", "step_f_eager", "step_fr_eager", "floor_eager"}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def check_scales(w: E.Workload, ref: dict, op: str | None, dev, log) -> dict[str, float]:
    """Scales of the reduced-precision check: gefx's norm products (E.norm_scales, one untimed
    call); if that call fails (out of memory, or any error: said in the log, the run goes on),
    the reference's own largest forget values (E.forget_scales), or for an engine op its own
    largest value (the plain relative check)."""
    try:
        scales = E.norm_scales(w)
        _sync(dev)
        return scales
    except Exception as exc:  # noqa: BLE001
        w.zero()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        log(f"  norm scales failed on {w.label} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]}); "
            + ("plain relative check" if op else "scaled by the largest forget values instead"))
        if op:
            return {op: float(ref[op].double().abs().max())}
        return E.forget_scales(ref)


def run_case(case: dict, args, log) -> list[dict]:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    provs = [p for p in case["providers"] if not (p.startswith("opacus") and OPACUS)]
    w = E.Workload(case["model"], case["B"], case["T"], case["objective"], device=dev, dtype=dtype,
                   attn=getattr(args, "attn", "sdpa"))
    op = case.get("op")
    fns = {p: make_provider(p, w, op) for p in provs}
    ref_name = "gefx_op" if op else "gefx_online"
    order = [ref_name] + [p for p in provs if p != ref_name]
    rows = {p: dict(section=case["section"], model=case["model"], params_m=round(E.n_params(w.model) / 1e6, 2),
                    objective=case["objective"], op=op or "", B=case["B"], T=case["T"], provider=p,
                    times=[], max_rel_diff="", max_scaled_diff="", diff_key="") for p in provs}
    # check + warm-up call
    ref = scales = None
    reduced = dtype in E.REDUCED   # bf16 / fp16: the scale-aware check (e2e_providers, "Agreement")
    oom = []
    for p in order:
        try:
            out = fns[p]()
            _sync(dev)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            if p == ref_name:
                raise
            oom.append(p)
            log(f"  {p}: out of memory on {w.label} ({str(exc).splitlines()[0][:100]})")
            fns.pop(p)
            w.zero()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if p == ref_name:
            ref = {op: out} if op else out
            if reduced:
                scales = check_scales(w, ref, op, dev, log)
        elif p not in NO_RESULT and out is not None:
            res = {op: out} if op else out
            plain = E.compare(res, ref)
            rows[p]["max_rel_diff"] = f"{plain.diff:.1e}"
            check, tol, what = plain, args.tol, "max relative difference"
            if reduced:
                check = E.compare(res, ref, scales)
                rows[p]["max_scaled_diff"] = f"{check.diff:.1e}"
                tol, what = args.tol_scaled, "max scale-aware difference (max |x - gefx| / norm-product scale)"
            rows[p]["diff_key"] = check.key
            if check.diff > tol:  # reported beside the timings, which go on (the run exits 1 at the end)
                rows[p]["check_failed"] = (f"{what} {check.diff:.2e} > {tol} on {check.key!r}; per key: {check}"
                                           + (f"; plain relative per key: {plain}" if reduced else ""))
                log(f"  CROSS-CHECK FAILED: {p} disagrees with gefx on {w.label}: {rows[p]['check_failed']}")
    provs = [p for p in provs if p not in oom]
    for r in range(case["rounds"]):
        k = r % len(provs)
        for p in provs[k:] + provs[:k]:
            _sync(dev)
            t0 = time.perf_counter()
            fns[p]()
            _sync(dev)
            rows[p]["times"].append(time.perf_counter() - t0)
    out = []
    for p in oom:
        rows[p].pop("times")
        out.append(dict(rows[p], median_s=float("nan"), min_s=float("nan"), rounds=0, max_rel_diff="OOM"))
    for p in provs:
        ts = rows[p].pop("times")
        rows[p].update(median_s=statistics.median(ts), min_s=min(ts), rounds=len(ts))
        out.append(rows[p])
    skipped = [p for p in case["providers"] if p not in provs]
    log(f"  {case['section']:11s} {w.label}{' ' + op if op else ''}: "
        + ", ".join(f"{r['provider']} {r['median_s']:.3f}s" for r in out)
        + (f" (skipped: {', '.join(skipped)}: {OPACUS})" if skipped else ""))
    del w, fns
    return out


# -- memory pass (child process) ------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def mem_child(spec_path: str, args):
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cases = json.loads(Path(spec_path).read_text())
    res = []
    for i, case in enumerate(cases):
        provs = [p for p in case["providers"] if not (p.startswith("opacus") and OPACUS)]
        w = E.Workload(case["model"], case["B"], case["T"], case["objective"], device=dev, dtype=dtype,
                       attn=args.attn)
        for p in provs:
            fn = make_provider(p, w, case.get("op"))
            w.zero()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = _status("VmRSS")
                fn()
                peak = _status("VmHWM") - before
            res.append(dict(case=i, provider=p, peak_mib=peak / 2**20))
            del fn
        del w
    print("MEMJSON " + json.dumps(res), flush=True)


def memory_pass(cases, args, log) -> dict:
    spec = Path(args.out) / "_mem_cases.json"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(args.mem_threshold))
    cmd = [sys.executable, __file__, "--mem-child", str(spec), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads), "--attn", args.attn]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    spec.unlink(missing_ok=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON ")), None)
    if line is None:
        log(f"  memory pass failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return {}
    return {(r["case"], r["provider"]): r["peak_mib"] for r in json.loads(line[8:])}


# -- outputs ----------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:  # noqa: BLE001
        pass
    import transformers
    import gefx
    from gefx import backends
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                gefx=getattr(gefx, "__version__", "?"), backend_cpu=backends.choose(torch.device("cpu")),
                opacus=OPACUS or __import__("opacus").__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), load_avg=os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _scaled(r: dict) -> str:
    """The reduced-precision check's figure and the key that gave it (empty in float32)."""
    d = r.get("max_scaled_diff", "")
    return f"{d} ({r['diff_key']})" if d else ""


def summarize(rows: list[dict], info: dict) -> str:
    """Markdown tables of ratios (medians of the same run)."""
    lines = [f"Machine: {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']}"
             + (f", GPU {info['gpu']}" if "gpu" in info else "") + f"), torch {info['torch']}, transformers "
             f"{info['transformers']}, opacus {info['opacus']}, gefx backend {info['backend_cpu']}, "
             f"{info['date']}, load average at end {tuple(round(x, 1) for x in info['load_avg'])}.", ""]
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["section"], r["model"], r["B"], r["T"], r["objective"], r["op"]), {})[r["provider"]] = r
    lines += ["| section | model | objective / op | B | T | provider | median s | x step_fr | x step_f "
              "| gefx speed-up | peak extra MiB | max rel diff | scaled diff (key) |", "|" + "---|" * 13]
    for key, provs in by_case.items():
        sec, model, b, t, obj, op = key
        for p, r in provs.items():
            # an "_eager" row is compared with the eager step and eager gefx, the others with sdpa's
            sfx = "_eager" if p.endswith("_eager") else ""
            fr, f = provs.get("step_fr" + sfx), provs.get("step_f" + sfx)
            g = provs.get(("gefx_op" if op else "gefx_online") + sfx)
            if not r["rounds"]:
                mib = f"{r['peak_mib']:.0f}" if isinstance(r.get("peak_mib"), float) else ""
                lines.append(f"| {sec} | {model} | {op or obj} | {b} | {t} | {p} | "
                             + ("out of memory" if r["max_rel_diff"] == "OOM" else "(memory only)")
                             + f" | | | | {mib} | {r['max_rel_diff']} | |")
                continue
            lines.append("| " + " | ".join([
                sec, f"{model} ({r['params_m']}M)", op or obj, str(b), str(t), p, f"{r['median_s']:.3f}",
                f"{r['median_s'] / fr['median_s']:.2f}" if fr else "",
                f"{r['median_s'] / f['median_s']:.2f}" if f else "",
                f"{r['median_s'] / g['median_s']:.2f}x" if g and p not in NO_RESULT else "",
                f"{r['peak_mib']:.0f}" if isinstance(r.get("peak_mib"), float) else "",
                r["max_rel_diff"], _scaled(r)]) + " |")
    return "\n".join(lines)


def plots(rows: list[dict], out: Path, attn: str = "sdpa"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for sec, xkey, fixed in (("sweep_batch", "B", "T"), ("sweep_seq", "T", "B")):
        pts = [r for r in rows if r["section"] != "ops" and r["objective"] == "ga" and not r["op"]]
        sweep = [r for r in rows if r["section"] == sec]
        if not sweep:
            continue
        fix = sweep[0][fixed]
        pts = [r for r in pts if r[fixed] == fix and r["model"] == sweep[0]["model"]]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        names = sorted({r["provider"] for r in sweep}, key=lambda p: (p.endswith("_eager"), p))
        bases = list(dict.fromkeys(p.removesuffix("_eager") for p in names))
        for p in names:
            s = sorted((r for r in pts if r["provider"] == p), key=lambda r: r[xkey])
            xs = [r[xkey] for r in s]
            timed = [r for r in s if r["rounds"]]
            # "_eager" lines: the sdpa line's colour, dashed, open markers
            style = dict(color=f"C{bases.index(p.removesuffix('_eager'))}", label=p, marker="o",
                         linestyle="--" if p.endswith("_eager") else "-",
                         markerfacecolor="none" if p.endswith("_eager") else None)
            if len(timed) > 1:
                axes[0].plot([r[xkey] for r in timed], [r["median_s"] for r in timed], **style)
            if all(isinstance(r.get("peak_mib"), float) for r in s):
                axes[1].plot(xs, [max(r["peak_mib"], 0.1) for r in s], **style)
        for ax, yl in zip(axes, ("time per step (s, median)", "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{'batch size B' if xkey == 'B' else 'sequence length T'} ({fixed}={fix})")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"{sweep[0]['model']}: GA step + per-instance forget/retain G-effects "
                     f"({attn} attention; dashed: _eager)")
        fig.tight_layout()
        fig.savefig(out / f"e2e_{sec}.png", dpi=110)
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--models", default="llama-10m,llama-100m", help="small[,big] (keys of e2e_providers.MODELS)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sweep-batch", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 32])
    ap.add_argument("--sweep-seq", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256, 1024])
    ap.add_argument("--sweep-seq-batch", type=int, default=4)
    ap.add_argument("--big-batch", type=int, default=4)
    ap.add_argument("--ops-batch", type=int, default=8)
    ap.add_argument("--big-seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tol", type=float, default=1e-3,
                    help="float32 / float64: max relative difference allowed vs gefx, per key (max |x - gefx| / max |gefx|)")
    ap.add_argument("--tol-scaled", type=float, default=1e-2,
                    help="bfloat16 / float16: max scale-aware difference allowed vs gefx, per key (max |x - gefx| "
                         "divided by the largest norm product ||grad r_i|| ||grad L|| of the key's entries; see "
                         "e2e_providers, \"Agreement\")")
    ap.add_argument("--budget", type=float, default=400, help="stop starting new cases after this many seconds (0: none)")
    ap.add_argument("--quick", action="store_true", help="a small grid (~2 minutes on 2 cores)")
    ap.add_argument("--no-narrow", dest="narrow", action="store_false",
                    help="leave out the narrow 4-layer model (hidden 256: NPO and GA at B x T, GA at 4 x 512)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory pass (no timing)")
    ap.add_argument("--mem-threshold", type=int, default=1 << 20,
                    help="MALLOC_MMAP_THRESHOLD_ of the memory pass: buffers of at least this many bytes are "
                         "counted (65536 counts nearly everything but makes the pass ~4x slower)")
    ap.add_argument("--only", default="", help="comma-separated sections to run")
    ap.add_argument("--providers", default="", help="comma-separated providers to keep (default: all of each case)")
    ap.add_argument("--objectives", default="ga,npo,tnpo", help="headline objectives besides GA (npo, tnpo)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation of the models: sdpa (Hugging Face's "
                    "default, what users run) or eager; the \"_eager\" providers switch to eager either way")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        return mem_child(args.mem_child, args)
    if args.quick:
        args.models, args.batch, args.seq, args.rounds = "llama-10m", 8, 64, 3
        args.sweep_batch, args.sweep_seq, args.ops_batch = [4, 16], [32, 128], 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    cases = grid(args)
    if args.only:
        cases = [c for c in cases if c["section"] in args.only.split(",")]
    if args.providers:
        keep = args.providers.split(",")
        cases = [dict(c, providers=[p for p in c["providers"] if p in keep]) for c in cases]
    if OPACUS:
        log(f"note: {OPACUS} (pip install opacus to include it)")
    log(f"== timing ({len(cases)} cases, interleaved rounds, medians)")
    rows, done = [], []
    if args.memory_only:
        done = cases
        rows = [dict(section=c["section"], model=c["model"], params_m="", objective=c["objective"], op=c.get("op") or "",
                     B=c["B"], T=c["T"], provider=p, median_s=float("nan"), min_s=float("nan"), rounds=0,
                     max_rel_diff="", case=i) for i, c in enumerate(cases) for p in c["providers"]]
        cases = []
    for i, case in enumerate(cases):
        if args.budget and time.time() - start > args.budget:
            log(f"  budget of {args.budget:.0f}s reached: skipping {len(cases) - i} case(s) from {case['section']} on")
            break
        try:
            r = run_case(case, args, log)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            log(f"  {case['section']} {case['model']} B={case['B']} T={case['T']}: out of memory ({str(exc)[:120]})")
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            continue
        for row in r:
            row["case"] = len(done)
        done.append(case)
        rows += r
        write_csv(out / "e2e.csv", rows)  # what is measured so far survives a run cut short
    if not args.no_memory and done:
        log("== peak memory (child process, one call per provider)")
        mem_cases = [dict(c, providers=c["providers"] + c.get("mem_extra", []))
                     if c["section"] in MEM_SECTIONS and not (c["section"] == "headline" and c["objective"] != "ga")
                     else dict(c, providers=[]) for c in done]
        mem = memory_pass(mem_cases, args, log)
        extra = [dict(section=c["section"], model=c["model"], params_m="", objective=c["objective"], op="", B=c["B"],
                      T=c["T"], provider=p, median_s=float("nan"), min_s=float("nan"), rounds=0, max_rel_diff="",
                      case=i) for i, c in enumerate(mem_cases) for p in c.get("mem_extra", [])]
        rows += extra
        for row in rows:
            row["peak_mib"] = mem.get((row["case"], row["provider"]), "")
    info = machine()
    write_csv(out / "e2e.csv", rows)
    (out / "e2e.json").write_text(json.dumps({"machine": info, "args": {**vars(args), "out": os.path.relpath(args.out)}, "rows": rows}, indent=1, default=str))
    try:
        plots(rows, out, args.attn)
    except Exception as exc:  # noqa: BLE001
        log(f"plots skipped: {exc}")
    md = summarize(rows, info)
    (out / "e2e.md").write_text(md + "\n")
    log(md)
    log(f"== done in {time.time() - start:.0f}s; outputs in {out}")
    failed = [r for r in rows if r.get("check_failed")]
    if failed:
        for r in failed:
            log(f"CROSS-CHECK FAILED: {r['section']} {r['model']} B={r['B']} T={r['T']} {r['provider']}: {r['check_failed']}")
        sys.exit(1)


FIELDS = ["section", "model", "params_m", "objective", "op", "B", "T", "provider", "median_s", "min_s", "rounds",
          "peak_mib", "max_rel_diff", "max_scaled_diff", "diff_key", "check_failed"]


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
