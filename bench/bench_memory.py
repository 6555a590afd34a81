"""Peak memory and time of a measured unlearning step against the plain step (issue 23), each case in
its own process, at a billion-parameter shape.

    python bench/bench_memory.py                              # TinyLlama-1.1B shape, float32, CPU
    python bench/bench_memory.py --dtype bfloat16
    python bench/bench_memory.py --model llama-10m --cases plain,online   # quick look
    python bench/bench_memory.py --device cuda --model llama-7b --batch 4 --seq 256 --dtype bfloat16

Workload: GA on B forget + B retain sequences of T tokens (random weights, sdpa attention, train
mode), the objective as a per-sample vector (as the README writes it), forget and retain risks
(``sequence_nll``). Cases (each in a fresh process, so that "first" really is the process's first
measurement): the measured step (*first*), a plain step, the measured step again (*steady*), a
plain step; each measured step is compared with the plain step after it (same process, same
.grad, same optimizer state). The plain step: forwards of both batches, ``loss.backward()``.
With ``--warm`` a plain step runs first: the first measurement's time over the steady one's is
then what gefx's one-time checks cost (rule verification, per-sample probe), without the costs
of any process's first step (page faults on fresh memory, kernel set-up) that the cold order
charges to it.
With ``--repeat N`` the later pair (measured step, plain step) runs N times: *steady* times are
medians over them (a single timing on a shared VM wanders by 10% and more), the steady peaks are
those of the pair with the largest extra.

    online      ``g_effect(tape, objective, risks, backward=True)``
    before      ``g_effect(tape, objective, risks)``, then ``loss.backward()``
    prepare     ``prepare(tape, risks)``, ``loss.backward()``, ``.against({p: p.grad})`` (the Trainer
                path under DeepSpeed ZeRO-3)
    prepare_obj ``prepare(tape, risks, objective=objective)``: the retain risk (a forward of its own)
                is left for ``.against``, streamed; the forget risk held
    trainer     the plain step, then each risk's own forward and ``g_effect(tape, {p: p.grad}, {name:
                risk})``, one risk at a time (the Trainer path: ``gefx.integrations.GEffectMixin``)
    norms       online with ``norms=True``
    accumulating online mid gradient accumulation: ``.grad`` holds an earlier micro-batch's nonzero
                gradient before the measured step (and before the plain step it is compared with)
    accumulating_optimizer  the same with ``optimizer=`` (AdamW with state)
    optimizer   online with ``optimizer=`` an AdamW that has stepped once (its state exists)

Peak: the process's resident set (RSS, sampled every 2 ms by a thread reading /proc/self/statm) on
the CPU, ``torch.cuda.max_memory_allocated`` on a GPU, during each step. On the CPU, glibc's malloc
keeps freed buffers of up to 32 MiB in its heap once it has seen them freed (its dynamic mmap
threshold), so the RSS also counts heap holes that no tensor occupies; ``--mmap-threshold BYTES``
(``MALLOC_MMAP_THRESHOLD_``, as ``make bench``'s memory pass) makes every buffer from that size a
fresh mapping returned on free: the RSS then follows the memory tensors occupy, the CPU's
counterpart of ``max_memory_allocated``; *left resident* is the growth of the resident set from before the first
measurement to after the last plain step (freed heap memory handed back with malloc_trim first),
i.e. what gefx keeps between measurements.
In bfloat16 / float16 on the CPU the matrix products run through float32 (``bench/cpu_gemm16.py``:
torch's own 16-bit CPU GEMM takes hours per step at the 1.1B shape on a CPU without AVX-512);
``--cpu-gemm torch`` keeps torch's.
Results: stdout (a markdown table) and --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = ("online", "before", "prepare", "prepare_obj", "trainer", "norms", "optimizer", "accumulating", "accumulating_optimizer")


class Peak:
    """The largest resident set of this process while active (CPU), or the CUDA peak."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self._on = 0, False

    def rss(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.peak = self.rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._on = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._on:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._on = False
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _step(case: str, w, opt):
    import gefx
    from gefx.losses import sequence_nll

    model = w.model
    if case in ("plain", "trainer"):
        lf, lr = w.logits(w.f_ids), w.logits(w.r_ids)
        (-sequence_nll(lf, w.f_lab)).sum().backward()
        del lf, lr  # the retain forward's graph was alive through the step, as in the measured steps
        if case == "trainer":
            for name, ids, labels in (("forget", w.f_ids, w.f_lab), ("retain", w.r_ids, w.r_lab)):
                with gefx.trace(model) as tape:
                    risk = {name: sequence_nll(w.logits(ids), labels)}
                    eff = gefx.g_effect(tape, {p: p.grad for p in model.parameters()}, risk)
                    del risk, eff
        return
    with gefx.trace(model) as tape:
        nll_f = sequence_nll(w.logits(w.f_ids), w.f_lab)
        nll_r = sequence_nll(w.logits(w.r_ids), w.r_lab)
        objective = -nll_f
        risks = {"forget": nll_f, "retain": nll_r}
        if case == "before":
            eff = gefx.g_effect(tape, objective, risks)
            objective.sum().backward()
        elif case.startswith("prepare"):
            prepared = gefx.prepare(tape, risks, objective=objective if case == "prepare_obj" else None)
            objective.sum().backward()
            eff = prepared.against({p: p.grad for p in model.parameters()})
        else:
            eff = gefx.g_effect(tape, objective, risks, backward=True, norms=case == "norms",
                                optimizer=opt if case.endswith("optimizer") else None)
        del eff


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc), so that RSS shows what is still allocated."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_case(args) -> dict:
    import e2e_providers as E

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if _gemm_in_float32(args):
        import cpu_gemm16
        cpu_gemm16.install()
    w = E.Workload(args.model, args.batch, args.seq, "ga", device=device, dtype=dtype)
    model = w.model
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # .grad exists from the start, as in a running loop
    opt = None
    if args.case.endswith("optimizer"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        opt.step()  # AdamW's state exists, as in a running loop
    meter = Peak(device)
    out = {"case": args.case, "params": E.n_params(model), "warm": args.warm}
    steps = [("first", args.case), ("plain_first", "plain")]
    steps += [(f"{label}{i}", case) for i in range(args.repeat) for label, case in (("steady", args.case), ("plain", "plain"))]
    for label, case in ((("plain_cold", "plain"),) if args.warm else ()) + tuple(steps):
        model.zero_grad(set_to_none=False)
        if args.case.startswith("accumulating"):
            for p in model.parameters():
                p.grad.fill_(1e-3)  # an earlier micro-batch's gradient, in place
        _trim()
        base = meter.rss()
        t = time.perf_counter()
        with meter:
            _step(case, w, opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[label] = {"seconds": time.perf_counter() - t, "peak": meter.peak, "before": base}
    model.zero_grad(set_to_none=False)
    _trim()
    out["resident"] = meter.rss() - out["first"]["before"]  # what stayed allocated since the first measurement
    out["steady"], out["plain_steady"] = _later(out, args.repeat)
    return out


def _gemm_in_float32(args) -> bool:
    return args.device == "cpu" and args.dtype in ("bfloat16", "float16") and args.cpu_gemm != "torch"


def _later(out: dict, repeat: int) -> tuple[dict, dict]:
    """The later measurements summed up: median times (steady and plain), and the peaks of the pair
    (measured step, the plain step after it) whose extra memory was the largest."""
    pairs = [(out.pop(f"steady{i}"), out.pop(f"plain{i}")) for i in range(repeat)]
    out["later"] = [{"steady": s, "plain": p} for s, p in pairs]
    worst = max(pairs, key=lambda sp: (sp[0]["peak"] - sp[1]["peak"]) / sp[1]["peak"])
    median = lambda xs: sorted(xs)[len(xs) // 2]
    return ({"seconds": median([s["seconds"] for s, _ in pairs]), "peak": worst[0]["peak"]},
            {"seconds": median([p["seconds"] for _, p in pairs]), "peak": worst[1]["peak"]})


def _spawn(args, case: str) -> dict:
    cmd = [sys.executable, __file__, "--one", case, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--dtype", args.dtype, "--device", args.device, "--repeat", str(args.repeat)]
    cmd += ["--cpu-gemm", args.cpu_gemm]
    cmd += ["--warm"] if args.warm else []
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}))
    got = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if got.returncode != 0:
        return {"case": case, "error": got.stderr.strip().splitlines()[-1] if got.stderr.strip() else "failed"}
    return json.loads(got.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Each measured step against the plain step that follows it in the same process."""
    gib = 2 ** 30
    lines = ["| case | plain peak (GiB) | measured peak first / steady (GiB) | extra first / steady | "
             "time first / steady (x plain) | first - steady (plain steps) | left resident (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | | |")
            continue
        f, s, pf, ps = r["first"], r["steady"], r["plain_first"], r["plain_steady"]
        lines.append(f"| {r['case']} | {ps['peak'] / gib:.2f} | {f['peak'] / gib:.2f} / {s['peak'] / gib:.2f} | "
                     f"{(f['peak'] - pf['peak']) / pf['peak']:+.1%} / {(s['peak'] - ps['peak']) / ps['peak']:+.1%} | "
                     f"{f['seconds'] / pf['seconds']:.2f} / {s['seconds'] / ps['seconds']:.2f} | "
                     f"{(f['seconds'] - s['seconds']) / ps['seconds']:+.2f} | {r['resident'] / 2 ** 20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="bench/out/memory.json")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="MALLOC_MMAP_THRESHOLD_ for the cases' processes (0: glibc's default, dynamic)")
    ap.add_argument("--warm", action="store_true",
                    help="run a plain step before the first measurement: its time then shows what gefx's one-time "
                         "checks cost, without the process's own first-step costs (page faults, kernel set-up)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="later measurements (each followed by a plain step): steady times are their medians, steady "
                         "peaks those of the pair with the largest extra")
    ap.add_argument("--cpu-gemm", choices=("float32", "torch"), default="float32",
                    help="16-bit matrix products on the CPU: through float32 (bench/cpu_gemm16.py; default), or "
                         "torch's own (hours per step at the 1.1B shape on a CPU without AVX-512)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        args.case = args.one
        print(json.dumps(run_case(args)))
        return 0
    torch.set_num_threads(torch.get_num_threads())
    results = []
    for case in args.cases.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {case} ...", file=sys.stderr, flush=True)
        results.append(_spawn(args, case))
    meta = {"model": args.model, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "device": args.device,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "mmap_threshold": args.mmap_threshold, "warm": args.warm,
            "repeat": args.repeat, "cpu_gemm16": "float32" if _gemm_in_float32(args) else "torch"}
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
