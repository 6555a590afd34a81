"""Reference-compatible mode against a straightforward re-implementation of the reference
procedure: one backward per gradient, full-gradient copies, moving averages, 3rd/7th reports."""
import copy

import pytest
import torch

import gefx
from gefx.integrations.compat import ReferenceCompat
from gefx.losses import token_mean_nll
from helpers import batch, tiny_model

MICRO_BATCHES = 8
LR = 0.05


def micro_batches():
    return [(batch(2, 7, seed=100 + k), batch(2, 6, seed=200 + k)) for k in range(MICRO_BATCHES)]


def losses(model, fb, rb):
    (fi, fm, fl), (ri, rm, rl) = fb, rb
    nll_f = token_mean_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
    nll_r = token_mean_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
    return -nll_f.sum(), nll_f, nll_r  # GA objective, forget and retain risks


def group_of(name):
    """The reference code's grouping by parameter names (Llama naming), done independently."""
    if "embed_tokens" in name:
        return "embed"
    if ".layers." in name:
        i = int(name.split(".layers.")[1].split(".")[0])
        return "layers.0-9" if i < 10 else "layers.10-19" if i < 20 else "layers.20+"
    return "lm_head" if "lm_head" in name else "final_norm"


def reference_procedure(model, dtype):
    ema = {"objective": {}, "forget": {}, "retain": {}}
    reports = []
    for count, (fb, rb) in enumerate(micro_batches(), start=1):
        for idx, key in ((1, "forget"), (0, "objective"), (2, "retain")):
            model.zero_grad()
            losses(model, fb, rb)[idx].sum().backward()
            for name, p in model.named_parameters():
                g = p.grad.detach().clone().to(dtype)
                ema[key][name] = g if name not in ema[key] else 0.6 * ema[key][name] + 0.4 * g
        if count % 4 == 3:
            rep = {}
            for out, risk in (("ge_u", "forget"), ("ge_r", "retain")):
                groups = {}
                for name in ema["objective"]:
                    g = group_of(name)
                    groups[g] = groups.get(g, 0.0) + float((ema["objective"][name] * ema[risk][name]).sum())
                rep[out], rep[out + "_groups"] = sum(groups.values()), groups
            reports.append(rep)
        model.zero_grad()
        losses(model, fb, rb)[0].backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return reports


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_reference_compat_matches_full_gradient_procedure(dtype, tol):
    base = tiny_model("llama", dtype)
    expected = reference_procedure(copy.deepcopy(base), dtype)
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    compat = ReferenceCompat()
    got = []
    for fb, rb in micro_batches():
        with gefx.trace(model) as tape:
            objective, nll_f, nll_r = losses(model, fb, rb)
            rep = compat.update(tape, objective, nll_f, nll_r)
            if rep is not None:
                got.append(rep)
            objective.backward()
        opt.step()
        opt.zero_grad()
    assert [r["micro_batch"] for r in got] == [3, 7] and len(expected) == 2
    for g, e in zip(got, expected):
        for key in ("ge_u", "ge_r"):
            assert abs(g[key] - e[key]) <= tol * abs(e[key])
            assert set(g[key + "_groups"]) == set(e[key + "_groups"])
            for name, v in e[key + "_groups"].items():
                assert abs(g[key + "_groups"][name] - v) <= tol * abs(e[key]), (key, name)
    assert "ge u |" in ReferenceCompat.format(got[0])


def test_bf16_emulation_is_close_but_rounded():
    base = tiny_model("llama", torch.float32)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base)
        compat = ReferenceCompat(dtype=dtype)
        for fb, rb in micro_batches()[:3]:
            with gefx.trace(model) as tape:
                rep = compat.update(tape, *losses(model, fb, rb))
        results[dtype] = rep["ge_u"]
    assert results[torch.float32] != results[torch.bfloat16]
    assert abs(results[torch.bfloat16] - results[torch.float32]) < 2e-2 * abs(results[torch.float32])
