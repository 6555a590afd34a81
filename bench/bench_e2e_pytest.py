"""pytest-benchmark version of the end-to-end comparison (small case, for the JSON record):

    pytest bench/bench_e2e_pytest.py --benchmark-only --benchmark-json=bench/out/e2e_pytest.json

One group per workload (llama-10m, B=4, T=64; GA step + per-instance forget/retain G-effects, and the
engine ops pairwise / norms / aggregate), on sdpa attention (Hugging Face's default, what users run;
torch.func's vmap switches to eager attention, which it needs: e2e_providers.attention); every
provider's numbers are asserted equal to gefx's (max |x - gefx| / max |gefx| <= 1e-3 in float32)
before it is timed. The ratios of record come from bench/bench_e2e.py (interleaved rounds);
pytest-benchmark runs providers one after the other.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_providers as E  # noqa: E402

B, T, TOL = 4, 64, 1e-3
try:
    import opacus  # noqa: F401
    HAVE_OPACUS = True
except Exception:  # noqa: BLE001
    HAVE_OPACUS = False


@pytest.fixture(scope="module")
def work():
    w = E.Workload("llama-10m", B, T, "ga", attn="sdpa")
    return w, E.gefx_online(w), {op: E.gefx_op(w, op) for op in ("pairwise", "norms", "aggregate")}


STEP = ["step_f", "gefx_online", "gefx_online_torch", "gefx_geffect", "reference", "per_sample_loop", "torch_func", "opacus"]


def _step_provider(name, w):
    if name == "step_f":
        return lambda: E.plain_step(w, retain_forward=False)
    if name == "opacus":
        if not HAVE_OPACUS:
            pytest.skip("opacus not installed (optional bench extra: pip install opacus)")
        p = E.OpacusProvider(w)
        return lambda: p(w)
    return {"gefx_online": lambda: E.gefx_online(w), "gefx_online_torch": lambda: E.gefx_online(w, "torch"),
            "gefx_geffect": lambda: E.gefx_geffect(w), "reference": lambda: E.ReferenceProcedure()(w),
            "per_sample_loop": lambda: E.per_sample_loop(w), "torch_func": lambda: E.torch_func(w)}[name]


@pytest.mark.parametrize("provider", STEP)
def test_step_with_geffects(benchmark, work, provider):
    w, ref, _ = work
    benchmark.group = f"GA step + G-effects llama-10m B={B} T={T}"
    fn = _step_provider(provider, w)
    out = fn()
    if out is not None:
        agree = E.compare(out, ref)
        assert agree.diff <= TOL, f"{agree.key}: {agree}"
    benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)


OPS = ["gefx_op", "gefx_op_torch", "torch_func_op", "per_sample_loop_op", "opacus_op"]


@pytest.mark.parametrize("provider", OPS)
@pytest.mark.parametrize("op", ["pairwise", "norms", "aggregate"])
def test_engine_ops(benchmark, work, op, provider):
    w, _, refs = work
    benchmark.group = f"{op} llama-10m B={B} T={T}"
    if provider == "opacus_op":
        if not HAVE_OPACUS:
            pytest.skip("opacus not installed (optional bench extra: pip install opacus)")
        p = E.OpacusProvider(w)
        fn = lambda: p(w, op)  # noqa: E731
    else:
        fn = {"gefx_op": lambda: E.gefx_op(w, op), "gefx_op_torch": lambda: E.gefx_op(w, op, "torch"),
              "torch_func_op": lambda: E.torch_func_op(w, op), "per_sample_loop_op": lambda: E.per_sample_loop_op(w, op)}[provider]
    assert E.rel_diff(fn(), refs[op]) <= TOL
    benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)
