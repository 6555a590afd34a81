"""What gefx's soundness checks cost (issue 14): the coverage walk on every loss, the per-sample
probe once per graph structure (default) or on every loss (check="full"), and the one-time work
on a model's first measurement (rule verification, the first probes).

    python bench/bench_soundness.py                       # headline: llama-10m, B=16, T=128, GA, CPU
    python bench/bench_soundness.py --device cuda --model llama-1b --batch 8 --seq 512

Method: the plain forget+retain step, gefx's online mode (g_effect(..., backward=True)) and
g_effect before the step, each with the default checks, with check="full", and with the checks
switched off (reach and probe replaced by no-ops and every call's conditions made equal, for this
measurement only), run in interleaved rounds on one workload; medians. The default checks' cost is
(default - off) / plain step, and, free of the machine's run-to-run noise, the time spent inside
the checks (Graph.reach, soundness.probe and the conditions a verdict is keyed on, issue 24, timed in
place) per call over the plain step. The first measurement of a fresh process (soundness.forget(): rules unverified, no structure probed)
is timed separately. Results go to stdout and --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_providers as E  # noqa: E402

import gefx  # noqa: E402
import gefx.rules  # noqa: E402
import gefx.tape  # noqa: E402
from gefx import soundness  # noqa: E402
from gefx.losses import sequence_nll  # noqa: E402


class Clock:
    """Seconds spent inside the checks while enabled: Graph.reach and the probe, and the
    conditions a rule's verdict is keyed on (gefx.rules.conditions at each recorded call of a
    non-stock module, gefx.rules.module_state at each use of its rule); nested calls count once."""

    def __init__(self):
        self.spent, self.on, self.depth = 0.0, False, 0
        soundness.Graph.reach = self._timed(soundness.Graph.reach)
        soundness.probe = self._timed(soundness.probe)
        gefx.tape.conditions = self._timed(gefx.tape.conditions)
        gefx.rules.state.module_state = self._timed(gefx.rules.state.module_state)

    def _timed(self, fn):
        def run(*a, **k):
            if not self.on or self.depth:
                return fn(*a, **k)
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.spent += time.perf_counter() - t
                self.depth -= 1
        return run


CLOCK = Clock()


@contextmanager
def checks_off():
    reach, probe = soundness.Graph.reach, soundness.probe
    conditions, state = gefx.tape.conditions, gefx.rules.state.module_state
    soundness.Graph.reach = lambda self, loss, what: soundness.Reach(list(self.tape.calls))
    soundness.probe = lambda *a, **k: False
    gefx.tape.conditions = lambda *a, **k: ((), ())  # every call under the same conditions
    gefx.rules.state.module_state = lambda *a, **k: ()
    try:
        yield
    finally:
        soundness.Graph.reach, soundness.probe = reach, probe
        gefx.tape.conditions, gefx.rules.state.module_state = conditions, state


def step(w):
    w.zero()
    lf, lr = w.logits(w.f_ids), w.logits(w.r_ids)
    (w.objective_vec(lf, None).sum() + sequence_nll(lr, w.r_lab).sum()).backward()


def measured(w, check="auto", online=True):
    w.zero()
    with gefx.trace(w.model, check=check) as tape:
        nll_f, nll_r, loss = E._traced_forwards(w)
        gefx.g_effect(tape, loss, {"forget": nll_f, "retain": nll_r}, backward=online)
        if not online:
            loss.backward()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-10m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa: what users run)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "soundness.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w = E.Workload(args.model, args.batch, args.seq, "ga", device=args.device, attn=args.attn)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    soundness.forget()
    first = timed(lambda: measured(w))           # rules verified, structures probed
    providers = {
        "step": lambda: step(w),
        "online": lambda: measured(w),
        "online_full": lambda: measured(w, "full"),
        "online_off": lambda: _off(lambda: measured(w)),
        "geffect": lambda: measured(w, online=False),
        "geffect_full": lambda: measured(w, "full", online=False),
        "geffect_off": lambda: _off(lambda: measured(w, online=False)),
    }
    times = {k: [] for k in providers}
    for fn in providers.values():
        fn()  # warm-up
    for r in range(args.rounds):
        order = list(providers)[r % len(providers):] + list(providers)[:r % len(providers)]
        for k in order:
            times[k].append(timed(providers[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    st = med["step"]
    inside = {}
    for m, fn in (("online", providers["online"]), ("geffect", providers["geffect"])):
        CLOCK.spent, CLOCK.on = 0.0, True
        for _ in range(args.rounds):
            fn()
        CLOCK.on = False
        inside[m] = CLOCK.spent / args.rounds
    res = {
        "machine": {"cpu": _cpu(), "threads": torch.get_num_threads(), "device": args.device,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d")},
        "workload": {"model": args.model, "B": args.batch, "T": args.seq, "objective": "ga", "attn": args.attn},
        "median_s": med,
        "first_call_s": first,
        "default_check_cost_of_step": {m: (med[m] - med[m + "_off"]) / st for m in ("online", "geffect")},
        "full_check_cost_of_step": {m: (med[m + "_full"] - med[m + "_off"]) / st for m in ("online", "geffect")},
        "first_call_extra_of_step": (first - med["online"]) / st,
        "time_inside_default_checks_s": inside,
        "time_inside_default_checks_of_step": {m: v / st for m, v in inside.items()},
    }
    print(f"{args.model} B={args.batch} T={args.seq} GA, {args.device} ({res['machine']['cpu']}), "
          f"{res['machine']['threads']} threads, attention {args.attn}, {args.rounds} rounds, medians")
    print(f"  plain step {st * 1e3:.1f} ms")
    for m in ("online", "geffect"):
        print(f"  {m:8s} checks off {med[m + '_off'] * 1e3:7.1f} ms | default {med[m] * 1e3:7.1f} ms "
              f"({res['default_check_cost_of_step'][m]:+.1%} of the step) | full {med[m + '_full'] * 1e3:7.1f} ms "
              f"({res['full_check_cost_of_step'][m]:+.1%})")
    for m in ("online", "geffect"):
        print(f"  {m:8s} time inside the default checks (reach, probe, conditions; timed in place): "
              f"{inside[m] * 1e3:.2f} ms per call = {inside[m] / st:.2%} of the step")
    print(f"  first measurement of a fresh process: {first * 1e3:.1f} ms "
          f"({res['first_call_extra_of_step']:+.1%} of the step over a steady online call)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return res


def _off(fn):
    with checks_off():
        fn()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
