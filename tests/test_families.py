"""Every causal-LM family of the installed transformers that builds from a config (tests/zoo.py),
dense and mixture-of-experts: gefx exact against brute-force per-sample autograd, or refused by
name, in eval, train and train with dropout, in float64 and float32.

For each family, dtype and mode one tiny model is built and traces a forget batch (3 rows) and a
retain batch (2 rows); gefx's pairwise products, squared norms, the G-effects of a weighted GA
objective (per risk instance and per objective instance) and the online mode (the retain risk
with a backward of its own; the forget risk served by the step's backward: the objective's
per-sample gradients over their weights, powers of two so that no rounding differs) are compared with
per-sample autograd on the same forward (shared dropout masks):

* per parameter, every entry within gefx.check's bound tol(dtype) * S (S = sum_k |x_k y_k|, with
  its floor for gradients that vanish in exact arithmetic; gefx/check.py derives it), so that a
  wrong or missing contribution of any single parameter fails;
* the totals over all parameters to 1e-9 relative in float64 (1e-4 in float32), except for the
  families in FLOAT32_INSIDE, whose modules compute parts in float32 even in a float64 model (the
  oracle then carries float32 rounding there too; their per-parameter check still holds).
"""
import pytest
import torch

import gefx
import zoo
from gefx.check import relative_error, tolerance
from gefx.losses import sequence_nll
from helpers import per_sample_grads, rel_err, slices

BUILT = [f for f in zoo.FAMILIES if f not in zoo.UNBUILDABLE]

#: family -> a fragment of gefx's refusal: the families gefx refuses, and why (checked both ways)
REFUSED: dict[str, str] = {}

#: families with float32 arithmetic inside a float64 model: totals to 1e-6 instead of 1e-9. In each,
#: the only parameters off by more than 1e-12 (relative to S) are those of modules that compute in
#: float32 (Gemma-style norms `x * (1 + w.float())`, q/k norms, linear attention's conv and gates:
#: 3e-8 to 2e-7); every other parameter matches to float64 roundoff.
FLOAT32_INSIDE: set[str] = {"gemma4_text", "lara_mini", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"}

MODES = {"eval": (False, 0.0), "train": (True, 0.0), "train_dropout": (True, 0.1)}


def _nll(model, batch):
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out if isinstance(out, torch.Tensor) else out.logits
    labels = batch["labels"]
    if labels.dim() == 3:  # musicgen: [B, T, codebooks] with one codebook
        labels = labels[..., 0]
    return sequence_nll(logits, labels)


def _measure(model, params, fb, rb):
    """Per parameter, gefx's numbers and the oracle's (value, magnitude S) from one traced
    forward per batch."""
    with gefx.trace(model) as tape:
        f, r = _nll(model, fb), _nll(model, rb)
        # powers of two: the step's per-sample gradients are then exactly w_i times the forget
        # risk's, roundings included (other factors round differently: see gefx/step.py)
        w = 2.0 ** (torch.arange(f.shape[0], dtype=f.dtype) - 1)
        objective = -(w * f)
        got = {"pair": gefx.grad_dots(tape, f, r, groups="param").per_group,
               "norms": gefx.grad_dots(tape, f, groups="param").per_group}
        eff = gefx.g_effect(tape, objective, {"forget": f, "retain": r}, groups="param",
                            objective_instances=True)["retain"]
        got["retain"] = dict(zip(eff.groups, eff.per_instance_group))
        got["objective"] = dict(zip(eff.groups, eff.per_objective_instance_group))
        Gf, Gr, Go = (per_sample_grads(x, params) for x in (f, r, objective))
        for p in params:
            p.grad = None
        # the forget risk is served by the step (a per-sample multiple of the objective): streamed
        on = gefx.g_effect(tape, objective, {"forget": f, "retain": r}, groups="param", backward=True)
        got["online"] = dict(zip(on["retain"].groups, on["retain"].per_instance_group))
        got["online_forget"] = dict(zip(on["forget"].groups, on["forget"].per_instance_group))
        # online mode contracts against the step's own .grad (one backward of the summed objective)
        step = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None
                          else p.grad.detach().double().flatten() for p in params])
        for p in params:
            p.grad = None
        where = slices(tape, params)
    ref = {}
    o = Go.sum(0)
    for name, s in where.items():
        a, b, c = Gf[:, s], Gr[:, s], Go[:, s]
        ref[name] = {"pair": (a @ b.T, a.abs() @ b.abs().T), "norms": ((a * a).sum(1), (a * a).sum(1)),
                     "retain": (b @ o[s], b.abs() @ o[s].abs()), "objective": (c @ b.sum(0), c.abs() @ b.sum(0).abs()),
                     "online": (b @ step[s], b.abs() @ step[s].abs()),
                     "online_forget": (a @ step[s], a.abs() @ step[s].abs())}
    return got, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("family", BUILT)
def test_family_exact_or_refused(family, dtype):
    total_tol = 1e-4 if dtype == torch.float32 else (1e-6 if family in FLOAT32_INSIDE else 1e-9)
    for mode, (train, dropout) in MODES.items():
        model = zoo.build(family, dtype=dtype, dropout=dropout).train(train)
        params = [p for p in model.parameters() if p.requires_grad]
        fb, rb = zoo.batch(model, b=3, t=8, seed=1), zoo.batch(model, b=2, t=6, seed=2)
        torch.manual_seed(0)
        try:
            got, ref = _measure(model, params, fb, rb)
        except gefx.Refused as exc:
            assert family in REFUSED, f"{family} ({mode}) refused unexpectedly: {exc}"
            assert REFUSED[family] in str(exc), str(exc)
            continue
        assert family not in REFUSED, f"{family} ({mode}) is no longer refused: update REFUSED"
        for q in ("pair", "norms", "retain", "objective", "online", "online_forget"):
            top = torch.stack([ref[n][q][1] for n in ref]).amax(0)
            worst = max((float(relative_error(got[q][n], *ref[n][q], top, dtype).max()), n) for n in ref)
            assert worst[0] <= tolerance(dtype), (mode, q, worst)
            total = sum(got[q].values())
            assert rel_err(total, sum(ref[n][q][0] for n in ref)) < total_tol, (mode, q)
