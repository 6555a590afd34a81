"""Per-token G-effects by forward-mode AD (gefx.forward_ad.jvp) against the alternatives.

    python bench/bench_jvp.py            # ~2.5 minutes on 2 cores (most of it the naive baseline)
    python bench/bench_jvp.py --quick    # ~15 s

Workload (bench/e2e_providers.py): a Llama-architecture model from a config ("llama-10m" by
default, sdpa attention as Hugging Face defaults to, float32, train mode), a forget batch of B
sequences of T tokens (first quarter question), the GA objective. The direction d is the .grad the
step's backward of GA leaves (computed once per case, then fixed). Quantities:

    forward      a plain forward of the forget batch under torch.no_grad (for scale)
    jvp          gefx.forward_ad.jvp(model, token_nll of the forget batch, d): every token's
                 G-effect <grad nll[b, t], d>, [B, T-1], one forward carrying tangents
    grad_dots    a traced forward + gefx.grad_dots(tape, sequence_nll, {n: p.grad}): per-SEQUENCE
                 G-effects [B] only (one partial backward), the per-sample engine, for cost reference;
                 the grad_dots call alone is also timed (in a training loop the traced forward is
                 the step's own, so that is its extra cost there)
    naive        one forward with grad, then one torch.autograd.grad per answer token of the token
                 NLL, dotted with d: the same [B, T-1] as jvp (only for cases with at most
                 --naive-max answer tokens)

Method: every case builds its model and batch once; each provider runs once (warm-up, also the
agreement check), then --rounds rounds each running every provider once in a rotated order
(interleaved); times are medians over rounds and ratios are ratios of those medians, from the same
run. Agreement: jvp vs naive, max |a - c| / max |c| over all tokens; jvp's masked per-token means
vs grad_dots' per-sequence values (sequence_nll is the mean of each row's answer-token NLLs).
"""
from __future__ import annotations

import argparse
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

import gefx  # noqa: E402
from gefx.forward_ad import jvp  # noqa: E402
from gefx.losses import sequence_nll, token_nll  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:  # noqa: BLE001
        pass
    import transformers
    return (f"Machine: {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), torch "
            f"{torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, load average {tuple(round(x, 1) for x in os.getloadavg())}")


class Case:
    def __init__(self, model_name: str, b: int, t: int, naive_max: int, seed: int = 0):
        self.w = E.Workload(model_name, b, t, "ga", seed=seed, attn="sdpa")
        self.model, self.ids, self.lab = self.w.model, self.w.f_ids, self.w.f_lab
        E.plain_step(self.w, retain_forward=False)  # GA's backward: .grad = grad L
        self.direction = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.answer = self.lab[:, 1:] != -100
        self.n_answer = int(self.answer.sum())
        self.providers = {"forward": self.forward, "jvp": self.jvp, "grad_dots": self.grad_dots}
        if self.n_answer <= naive_max:
            self.providers["naive"] = self.naive

    @property
    def label(self) -> str:
        return f"{self.w.model_name} B={self.w.B} T={self.w.T}"

    def fn(self, m):
        return token_nll(m(input_ids=self.ids).logits, self.lab)[0]

    def forward(self):
        with torch.no_grad():
            return self.model(input_ids=self.ids).logits

    def jvp(self):
        return jvp(self.model, self.fn, self.direction)

    def grad_dots(self):
        with gefx.trace(self.model) as tape:
            nll = sequence_nll(self.model(input_ids=self.ids).logits, self.lab)
            t0 = time.perf_counter()
            out = gefx.grad_dots(tape, nll, self.direction).total.detach()
            self.inner = time.perf_counter() - t0  # the partial backward + contraction alone
            return out

    def naive(self):
        params = [p for n, p in self.model.named_parameters() if n in self.direction]
        dirs = [self.direction[n] for n, p in self.model.named_parameters() if n in self.direction]
        nll = self.fn(self.model)
        out = torch.zeros(nll.shape, dtype=torch.float64)
        idx = self.answer.nonzero().tolist()
        for k, (b, t) in enumerate(idx):
            gs = torch.autograd.grad(nll[b, t], params, retain_graph=k + 1 < len(idx), allow_unused=True)
            out[b, t] = sum(float((g.double() * d.double()).sum()) for g, d in zip(gs, dirs) if g is not None)
        return out

    def check(self, results: dict) -> dict[str, float]:
        """Agreement figures from the warm-up results."""
        value, deriv = results["jvp"]
        out = {}
        d64 = deriv.double()
        with torch.no_grad():
            plain = token_nll(results["forward"], self.lab)[0]
        out["value_vs_plain"] = float((value - plain).abs().max() / plain.abs().max())
        per_seq = (d64 * self.answer).sum(1) / self.answer.sum(1).clamp(min=1)
        gd = results["grad_dots"].double()
        out["jvp_vs_grad_dots"] = float((per_seq - gd).abs().max() / gd.abs().max())
        if "naive" in results:
            c = results["naive"]
            out["jvp_vs_naive"] = float((d64 - c).abs().max() / c.abs().max())
            out["masked_zero"] = float(d64[~self.answer].abs().max()) if (~self.answer).any() else 0.0
        return out


def run_case(case: Case, rounds: int, log) -> tuple[dict, dict]:
    names = list(case.providers)
    warm = {n: case.providers[n]() for n in names}
    agree = case.check(warm)
    del warm
    times = {n: [] for n in names + ["grad_dots_only"]}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            res = case.providers[n]()
            times[n].append(time.perf_counter() - t0)
            if n == "grad_dots":
                times["grad_dots_only"].append(case.inner)
            del res
    med = {n: statistics.median(v) for n, v in times.items()}
    log(f"  {case.label}: " + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in med.items()))
    return med, agree


def table(rows: list[tuple[Case, dict, dict]]) -> str:
    lines = ["| case | answer tokens | forward | jvp, per-token [B, T-1] | jvp / forward "
             "| grad_dots, per-seq [B]: traced fwd + partial bwd (of which grad_dots) | jvp / grad_dots "
             "| naive, one bwd per token | naive / jvp | jvp vs naive, max rel diff | jvp per-seq vs grad_dots |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, med, agree in rows:
        f, j, g, go = med["forward"], med["jvp"], med["grad_dots"], med["grad_dots_only"]
        nv = med.get("naive")
        lines.append(
            f"| {case.label} | {case.n_answer} | {f * 1e3:.1f} ms | {j * 1e3:.1f} ms | {j / f:.1f} | "
            f"{g * 1e3:.1f} ms ({go * 1e3:.1f} ms) | {j / g:.2f} | "
            + (f"{nv * 1e3:.0f} ms | {nv / j:.0f} | {agree['jvp_vs_naive']:.1e}" if nv else "- | - | -")
            + f" | {agree['jvp_vs_grad_dots']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-10m", choices=sorted(E.MODELS))
    ap.add_argument("--cases", default=None,
                    help="comma-separated BxT (default 2x32,4x64,4x128,8x256,8x512; --quick: 2x32,4x128)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 5; --quick 3)")
    ap.add_argument("--naive-max", type=int, default=200,
                    help="run the naive per-token baseline only on cases with at most this many answer tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases and rounds (~15 s)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.cases or ("2x32,4x128" if args.quick else "2x32,4x64,4x128,8x256,8x512")
    rounds = args.rounds or (3 if args.quick else 5)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    rows = []
    for spec in cases.split(","):
        b, t = (int(x) for x in spec.lower().split("x"))
        case = Case(args.model, b, t, args.naive_max)
        med, agree = run_case(case, rounds, log)
        log("    agreement: " + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
        rows.append((case, med, agree))
        del case
    print(machine() + f"; {rounds} interleaved rounds, medians; model {args.model} "
          f"({E.n_params(rows[0][0].model) / 1e6:.1f}M parameters, sdpa attention, float32); "
          f"total {time.perf_counter() - t_start:.0f} s.")
    print()
    print(table(rows))
    print()
    print("jvp: every answer token's G-effect <grad nll[b,t], grad L> in one forward with tangents; "
          "grad_dots: traced forward + one partial backward, per-sequence values only; naive: one backward "
          "per answer token. value_vs_plain (jvp's value vs a plain sdpa forward, relative): "
          + ", ".join(f"{c.label} {a['value_vs_plain']:.1e}" for c, _, a in rows) + ".")
    return rows


if __name__ == "__main__":
    main()
