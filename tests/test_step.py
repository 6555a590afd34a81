"""g_effect(..., backward=True): the training step's own backward, reused (gefx.step)."""
import copy

import pytest
import torch

import gefx
from gefx import step as S
from gefx.losses import sequence_nll, token_nll
from helpers import FAMILIES, batch, full_grad, per_sample_grads, rel_err, served_live, slices, tiny_model

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _losses(model, objective: str):
    fi, fm, fl = batch(3, 9, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    lf = model(input_ids=fi, attention_mask=fm).logits
    lr = model(input_ids=ri, attention_mask=rm).logits
    f, r = sequence_nll(lf, fl), sequence_nll(lr, rl)
    if objective == "weighted_ga":  # a vector: one factor per forget sample
        obj = -(torch.tensor([0.7, 1.3, 0.4], dtype=f.dtype) * f)
    elif objective == "gd":         # a scalar spanning both forwards, a factor per row of each
        obj = -f.sum() + 0.5 * r.sum()
    elif objective == "token_weighted":  # TNPO-like: weights per token, not per sample
        nll, mask = token_nll(lf, fl)
        w = torch.linspace(0.2, 2.0, nll.shape[1], dtype=nll.dtype)
        obj = -(nll * w).sum(1) / mask.sum(1).clamp(min=1)
    else:
        raise ValueError(objective)
    return f, r, obj


@pytest.fixture
def reuse_log(monkeypatch):
    """Records, per numeric row-factor fit, whether the step's gradients were reused."""
    log = []
    orig = S.Serving._row_factors

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        log.append(out is not None)
        return out

    monkeypatch.setattr(S.Serving, "_row_factors", spy)
    return log


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("objective, reused", [("weighted_ga", [True]), ("gd", [True, True]),
                                               ("token_weighted", [False])])
def test_matches_brute_force_and_plain_backward(family, dtype, objective, reused, reuse_log):
    base = tiny_model(family, torch.float64)
    # the oracle: per-sample gradients in float64 on the same weights
    ref = copy.deepcopy(base)
    params = list(ref.parameters())
    f, r, obj = _losses(ref, objective)
    Gf, Gr, g_obj = per_sample_grads(f, params), per_sample_grads(r, params), full_grad(obj.sum(), params)
    Go = per_sample_grads(obj, params) if obj.dim() == 1 else None
    # the plain training step, for .grad
    plain = copy.deepcopy(base).to(dtype)
    _losses(plain, objective)[2].sum().backward()

    model = copy.deepcopy(base).to(dtype)
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model, objective)
        eff = gefx.g_effect(tape, obj, {"forget": f, "retain": r}, groups="param", backward=True,
                            objective_instances=obj.dim() == 1)
    tol = TOL[dtype]
    if dtype == torch.float64 and family != "gpt2" and any(reused):
        # Llama/Qwen2's RMSNorm computes in float32 even for float64 inputs: the step's backward
        # and the risk's (same ops, upstream gradients scaled by c_i) then agree to float32
        # roundoff, not float64 (GPT-2, float64 throughout, agrees to ~1e-15)
        tol = 1e-6
    assert rel_err(eff["forget"].per_instance, Gf @ g_obj) < tol
    assert rel_err(eff["retain"].per_instance, Gr @ g_obj) < tol
    if Go is not None:
        assert rel_err(eff["forget"].per_objective_instance, Go @ Gf.sum(0)) < tol
        assert rel_err(eff["retain"].per_objective_instance, Go @ Gr.sum(0)) < tol
    else:
        assert eff["forget"].per_objective_instance is None
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), n  # exactly what loss.backward() leaves
    assert reuse_log == reused


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("objective", ["weighted_ga", "gd", "token_weighted"])
def test_served_risks_are_contracted_during_the_backward(family, dtype, objective, monkeypatch):
    """A served risk's products are made while the step's backward runs (each parameter's as soon
    as its .grad is final; on first use the probe passes after it) and nothing is captured for it:
    brute force's numbers, norms included, on the first and a later measurement, the same .grad."""
    base = tiny_model(family, torch.float64)
    ref = copy.deepcopy(base)
    params = list(ref.parameters())
    f, r, obj = _losses(ref, objective)
    Gf, Gr, g_obj = per_sample_grads(f, params), per_sample_grads(r, params), full_grad(obj.sum(), params)
    plain = copy.deepcopy(base).to(dtype)
    _losses(plain, objective)[2].sum().backward()

    streamed, captured = served_live(monkeypatch), []
    hooks = S.Serving.hooks

    def spy_hooks(self):
        captured.append(self.captured)
        return hooks(self)
    monkeypatch.setattr(S.Serving, "hooks", spy_hooks)
    model = copy.deepcopy(base).to(dtype)
    got = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with gefx.trace(model) as tape:
            f, r, obj = _losses(model, objective)
            got.append(gefx.g_effect(tape, obj, {"forget": f, "retain": r}, groups="param", backward=True,
                                     norms=True))
    tol = TOL[dtype] if dtype == torch.float32 or family == "gpt2" else 1e-6  # RMSNorm: see above
    norms = torch.linalg.vector_norm(Gf, dim=1)
    for eff in got:
        assert rel_err(eff["forget"].per_instance, Gf @ g_obj) < tol
        assert rel_err(eff["retain"].per_instance, Gr @ g_obj) < tol
        assert rel_err(eff["forget"].risk_norm, norms) < tol
    # both stream (token weights: planned, the fit fails at the head, the risk's own backward runs)
    assert streamed == (["forget", "retain"] if objective == "gd" else ["forget"]) * 2
    assert all(c is None for cs in captured for c in cs)  # nothing held for the streamed risks
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_accumulates_onto_earlier_gradients_like_backward():
    base = tiny_model("llama", torch.float32)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    for m in (a, b):
        _losses(m, "gd")[2].backward()  # an earlier micro-batch
    _losses(b, "gd")[2].backward()
    with gefx.trace(a) as tape:
        f, r, obj = _losses(a, "gd")
        eff = gefx.g_effect(tape, obj, {"forget": f}, backward=True)
    with gefx.trace(base) as tape:  # the G-effect is the step's alone, not the accumulated one
        f, r, obj = _losses(base, "gd")
        expected = gefx.g_effect(tape, obj, {"forget": f})
    assert rel_err(eff["forget"].per_instance, expected["forget"].per_instance) < 1e-4
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_same_training_step_as_without_measurement():
    base = tiny_model("qwen2", torch.float32)
    results = []
    for measure in (False, True):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with gefx.trace(model, params=opt) as tape:
            f, r, obj = _losses(model, "weighted_ga")
            if measure:
                gefx.g_effect(tape, obj, {"forget": f, "retain": r}, backward=True)
            else:
                obj.sum().backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_bfloat16_model():
    """16-bit heads: the two gradients are rounded separately, so the reuse is refused unless
    exact; every per-parameter entry is within the derived bound tol * S of brute force on the
    same model (S = sum_k |x_k y_k|, tol = 4 u_bf16 + 64 u_f32: gefx.check)."""
    from gefx.check import tolerance

    model = tiny_model("llama", torch.float32).to(torch.bfloat16)
    params = list(model.parameters())
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model, "weighted_ga")
        Gf, Gr = per_sample_grads(f, params), per_sample_grads(r, params)
        g_obj = full_grad(obj.sum(), params)
        eff = gefx.g_effect(tape, obj, {"forget": f, "retain": r}, backward=True, groups="param")
        where = slices(tape, params)
    tol = tolerance(torch.bfloat16)
    for risk, G in (("forget", Gf), ("retain", Gr)):
        e = eff[risk]
        for name, s in where.items():
            got = e.per_instance_group[e.groups.index(name)]
            bound = tol * (G[:, s].abs() @ g_obj[s].abs()) + 1e-30
            assert ((got - G[:, s] @ g_obj[s]).abs() <= bound).all(), (risk, name)


def test_risk_reaching_the_forward_elsewhere_is_not_reused(reuse_log):
    """A risk that also depends on a hidden state (not only on the logits) is differentiated
    as usual, and still exact."""
    model = tiny_model("llama", torch.float64)
    params = list(model.parameters())
    fi, fm, fl = batch(3, 9, seed=1)
    with gefx.trace(model) as tape:
        out = model(input_ids=fi, attention_mask=fm, output_hidden_states=True)
        f = sequence_nll(out.logits, fl)
        risk = f + 0.1 * out.hidden_states[1].pow(2).mean((1, 2))
        obj = -f
        Gk, g_obj = per_sample_grads(risk, params), full_grad(obj.sum(), params)
        eff = gefx.g_effect(tape, obj, {"mixed": risk, "forget": f}, backward=True)
    assert rel_err(eff["mixed"].per_instance, Gk @ g_obj) < 1e-9
    assert reuse_log == [True]  # only "forget": "mixed" has two heads and never reaches the fit


def test_objective_bypassing_the_head_is_not_reused(reuse_log):
    """An objective that also reaches a layer upstream of the logits (RMU-like): the step's
    output gradients are not a multiple of the risk's, and the reuse is refused."""
    model = tiny_model("llama", torch.float64)
    params = list(model.parameters())
    fi, fm, fl = batch(3, 9, seed=1)
    with gefx.trace(model) as tape:
        out = model(input_ids=fi, attention_mask=fm, output_hidden_states=True)
        f = sequence_nll(out.logits, fl)
        obj = -f.sum() + out.hidden_states[1].pow(2).mean()
        Gf, g_obj = per_sample_grads(f, params), full_grad(obj, params)
        eff = gefx.g_effect(tape, obj, {"forget": f}, backward=True)
    assert rel_err(eff["forget"].per_instance, Gf @ g_obj) < 1e-9
    assert reuse_log == []  # refused on the graph alone: the numeric fit never runs


def test_bad_input_leaves_grad_untouched():
    model = tiny_model("gpt2", torch.float32)
    fi, fm, fl = batch(3, 9, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
        with pytest.raises(ValueError, match="contains NaN"):
            gefx.g_effect(tape, -f.sum(), {"forget": f, "bad": f * float("nan")}, backward=True)
        assert all(p.grad is None for p in model.parameters())
        with pytest.raises(ValueError, match="needs the objective as a tensor"):
            gefx.g_effect(tape, {n: torch.zeros_like(p) for n, p in model.named_parameters()}, {"forget": f},
                          backward=True)
        # a risk whose batch size does not match its forward fails after the backward: .grad restored
        with pytest.raises(ValueError, match="batch size"):
            gefx.g_effect(tape, -f.sum(), {"wrong": torch.cat([r, r[:1]])}, backward=True)
        assert all(p.grad is None for p in model.parameters())
        gefx.g_effect(tape, -f.sum(), {"forget": f}, backward=True)  # the graph is intact
        assert all(p.grad is not None for n, p in model.named_parameters() if "wpe" not in n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_factors(dtype):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 7, 300, generator=g, dtype=dtype)
    r[1] = 0                                           # a row the risk does not reach
    r[3, :, ::61] = 0                                  # the strided sign probe sees only zeros
    c = torch.tensor([-0.3, 2.0, 1.7, -4.0, 1e-3], dtype=dtype)
    a = r * c.view(-1, 1, 1)
    a[1] = torch.randn(7, 300, generator=g, dtype=dtype)  # whatever the loss does there
    inv = S._row_factors(a, r)
    expected = torch.where(c == 2.0, 0.0, 1 / c)
    assert torch.allclose(inv, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    bent = a.clone()
    bent[2, 3, 5] *= 1 + 1e-3                           # one entry off by 1e-3: not a multiple
    assert S._row_factors(bent, r) is None
    dead = a.clone()
    dead[4] = 0                                         # the loss does not reach a row the risk does
    assert S._row_factors(dead, r) is None
    assert S._row_factors(a.bfloat16(), (r * 1.1).bfloat16()) is None  # separately rounded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_factors_of_tiny_gradients(dtype):
    """Rows so small that their squares underflow are fitted exactly (scaled by powers of two), and
    a factor below the floor is refused: the step's gradients would underflow where the risk's do not."""
    g = torch.Generator().manual_seed(1)
    tiny = 1e-22 if dtype == torch.float32 else 1e-170     # squared: below the dtype's range
    r = torch.randn(3, 5, 64, generator=g, dtype=dtype) * tiny
    c = torch.tensor([-0.3, 2.0, 1e-5], dtype=dtype)
    a = r * c.view(-1, 1, 1)
    floor = S._floor([dtype])
    inv = S._row_factors(a, r, floor)
    assert inv is not None and torch.allclose(inv, 1 / c, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    a[2] *= 1e-5                                        # c = 1e-10: under float32's epsilon
    assert (S._row_factors(a, r, floor) is None) == (dtype == torch.float32)
    assert S._floor([torch.float16, torch.float32]) == 1.0
    assert S._floor([torch.bfloat16]) == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("weight, scale, served", [(1e-20, 1.0, False), (0.5, 1.0, True), (0.5, 1e-15, True)])
def test_tiny_weights_and_tiny_risks_stay_exact(weight, scale, served, reuse_log):
    """float32, GA weighted by `weight` on a risk scaled by `scale`: float64 brute force's numbers,
    whether the step serves the risk (its rows fitted on copies scaled by powers of two where their
    norms are too small to trust) or its own backward runs (a weight under the floor; served, the
    fit's norms underflowed and every number was 0.7% off)."""
    base = tiny_model("llama", torch.float64)
    ids, mask, labels = batch(3, 9, seed=1)
    ref = copy.deepcopy(base)
    f = scale * sequence_nll(ref(input_ids=ids, attention_mask=mask).logits, labels)
    params = list(ref.parameters())
    model = copy.deepcopy(base).float()
    with gefx.trace(model) as tape:
        f32 = scale * sequence_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        got = gefx.g_effect(tape, -weight * f32, {"forget": f32}, backward=True)["forget"].per_instance
    step = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    want = per_sample_grads(f, params) @ step
    assert reuse_log == [served]
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5, (got, want)


def test_two_risks_on_one_head(reuse_log):
    """Both reuse the step's gradients: the first gets rescaled copies, the last rescales the
    captured ones in place; both exact (an in-place rescale done too early would scale the
    second twice)."""
    model = tiny_model("gpt2", torch.float64)
    params = list(model.parameters())
    fi, fm, fl = batch(3, 9, seed=1)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        risks = {"nll": f, "scaled": f * torch.tensor([2.0, -1.0, 0.5], dtype=f.dtype)}
        obj = -f.sum()
        g_obj = full_grad(obj, params)
        expected = {k: per_sample_grads(v, params) @ g_obj for k, v in risks.items()}
        eff = gefx.g_effect(tape, obj, risks, backward=True)
    for k in risks:
        assert rel_err(eff[k].per_instance, expected[k]) < 1e-10, k
    assert reuse_log == [True, True]


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_then_against_the_loops_own_backward(family):
    """gefx.prepare: pieces collected inside the trace, contracted after a backward gefx did not run
    (and after the trace closed), against the per-sample float64 oracle; .grad as backward leaves it."""
    base = tiny_model(family, torch.float64)
    ref = copy.deepcopy(base)
    params = list(ref.parameters())
    f, r, obj = _losses(ref, "token_weighted")
    Gf, Gr, g_obj = per_sample_grads(f, params), per_sample_grads(r, params), full_grad(obj.sum(), params)
    model = copy.deepcopy(base)
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model, "token_weighted")
        prepared = gefx.prepare(tape, {"forget": f, "retain": r}, groups="param")
        obj.sum().backward()
    eff = prepared.against({p: p.grad for p in model.parameters()})
    assert rel_err(eff["forget"].per_instance, Gf @ g_obj) < 1e-9
    assert rel_err(eff["retain"].per_instance, Gr @ g_obj) < 1e-9
    with pytest.raises(TypeError, match="non-empty dict"):
        gefx.prepare(tape, {})


def test_gradient_taken_during_the_backward_is_refused():
    """An optimizer stepped inside the backward (a post-accumulate-grad hook that sets .grad to
    None) leaves no step's gradient in .grad to contract against: refused by name, not a G-effect
    with those parameters missing."""
    model = tiny_model("llama", torch.float32)
    params = dict(model.named_parameters())
    handle = params["model.layers.0.mlp.up_proj.weight"].register_post_accumulate_grad_hook(
        lambda p: setattr(p, "grad", None))
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model, "gd")
        with pytest.raises(ValueError, match="up_proj.weight.*taken from .grad"):
            gefx.g_effect(tape, obj, {"forget": f, "retain": r}, backward=True)
    handle.remove()
