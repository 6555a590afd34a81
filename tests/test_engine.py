"""grad_dots and g_effect on tiny Hugging Face models against brute-force per-sample autograd."""
import copy

import pytest
import torch

import gefx
from gefx.losses import sequence_nll
from helpers import FAMILIES, batch, full_grad, per_sample_grads, rel_err, slices, tiny_model

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _forward_losses(model):
    fi, fm, fl = batch(3, 9, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
    r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
    weights = torch.tensor([0.7, 1.3, 0.4], dtype=f.dtype)
    objective = -(weights * f)                      # a weighted GA-style per-sample objective
    gd = -f.sum() + 0.5 * r.sum()                   # a scalar spanning both forwards (GD-style)
    return f, r, objective, gd


@pytest.fixture(scope="module", params=FAMILIES)
def oracle(request):
    """Per-sample gradients of the forget/retain risks and the objectives, float64."""
    model = tiny_model(request.param, torch.float64)
    params = list(model.parameters())
    f, r, objective, gd = _forward_losses(model)
    return dict(family=request.param, model=model, Gf=per_sample_grads(f, params),
                Gr=per_sample_grads(r, params), Go=per_sample_grads(objective, params),
                gd=full_grad(gd, params))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["ghost", "dense", "dense_by_columns"])
def test_matches_brute_force(oracle, dtype, form, monkeypatch):
    monkeypatch.setenv("GEFX_DOT_FORM", form.split("_")[0])
    if form == "dense_by_columns":  # every aggregate formed a few columns at a time (as a 1B head's)
        monkeypatch.setattr(gefx.pieces, "_BLOCK", 40)
    model = copy.deepcopy(oracle["model"]).to(dtype)
    Gf, Gr, Go, gd = oracle["Gf"], oracle["Gr"], oracle["Go"], oracle["gd"]
    tol = TOL[dtype]
    with gefx.trace(model) as tape:
        f, r, objective, gd_loss = _forward_losses(model)
        pair = gefx.grad_dots(tape, f, r, groups="param")
        norms = gefx.grad_dots(tape, f, groups="param")
        vs = gefx.grad_dots(tape, f, gd_loss, groups="param")
        eff = gefx.g_effect(tape, objective, {"forget": f, "retain": r}, groups="param",
                             objective_instances=True)
        eff_gd = gefx.g_effect(tape, gd_loss, {"retain": r}, groups="block")
        where = slices(tape, list(model.parameters()))
    assert rel_err(pair.total, Gf @ Gr.T) < tol
    assert rel_err(norms.total, (Gf * Gf).sum(1)) < tol
    assert rel_err(vs.total, Gf @ gd) < tol
    obj = Go.sum(0)
    assert rel_err(eff["forget"].per_instance, Gf @ obj) < tol
    assert rel_err(eff["retain"].per_instance, Gr @ obj) < tol
    assert rel_err(eff["retain"].per_objective_instance, Go @ Gr.sum(0)) < tol
    assert abs(eff["retain"].total - float(Gr.sum(0) @ obj)) < tol * abs(float(Gr.sum(0) @ obj)) + 1e-12
    assert rel_err(eff_gd["retain"].per_instance, Gr @ gd) < tol
    assert eff_gd["retain"].per_objective_instance is None
    # per parameter (groups="param"): every counted parameter, exact on its own slice
    for name, s in where.items():
        ref = Gf[:, s] @ Gr[:, s].T
        assert (pair.per_group[name] - ref).abs().max() <= tol * (Gf @ Gr.T).abs().max() + 1e-30, name
        ref = Gr[:, s] @ obj[s]
        assert abs(eff["retain"].per_group[name] - float(ref.sum())) <= tol * float((Gr @ obj).abs().max()) + 1e-30


def test_online_mode_with_the_steps_own_gradient():
    """g_effect against {n: p.grad} of the step's own backward equals g_effect of the loss."""
    model = tiny_model("gpt2", torch.float64)
    with gefx.trace(model) as tape:
        f, r, objective, gd = _forward_losses(model)
        expected = gefx.g_effect(tape, gd, {"forget": f, "retain": r})
        gd.backward(retain_graph=True)
        online = gefx.g_effect(tape, {n: p.grad for n, p in model.named_parameters()}, {"forget": f, "retain": r})
        with pytest.raises(ValueError, match=r"objective\['transformer.wte.weight'\] has shape \(2,\)"):
            gefx.g_effect(tape, {"transformer.wte.weight": torch.zeros(2)}, {"forget": f})
        with pytest.raises(ValueError, match="does not count"):
            gefx.g_effect(tape, {"lm_head.weight": torch.zeros(2)}, {"forget": f})  # tied: not a name of its own
    for name in ("forget", "retain"):
        assert rel_err(online[name].per_instance_group, expected[name].per_instance_group) < 1e-10
        assert online[name].per_objective_instance is None


def test_block_groups_and_objective_instances_against_the_oracle():
    """Every field of a RiskEffect with the default "block" groups equals the oracle restricted to
    the group's parameters (and to_dict carries them)."""
    model = tiny_model("llama", torch.float64, layers=3)
    params = list(model.parameters())
    with gefx.trace(model) as tape:
        f, r, objective, _ = _forward_losses(model)
        eff = gefx.g_effect(tape, objective, {"forget": f, "retain": r}, objective_instances=True)
        Gf, Gr, Go = (per_sample_grads(x, params) for x in (f, r, objective))
        where = slices(tape, params)
        group_of = gefx.groups.resolve(tape, "block")[0]
    assert eff.groups == ["embed", "block.0", "block.1", "block.2", "final_norm", "lm_head"]
    for e, G in ((eff["forget"], Gf), (eff["retain"], Gr)):
        for k, group in enumerate(e.groups):
            cols = torch.cat([torch.arange(where[n].start, where[n].stop) for n, g in group_of.items() if g == group])
            assert rel_err(e.per_instance_group[k], G[:, cols] @ Go.sum(0)[cols]) < 1e-9, group
            assert rel_err(e.per_objective_instance_group[k], Go[:, cols] @ G.sum(0)[cols]) < 1e-9, group
        assert abs(e.total - float((G @ Go.sum(0)).sum())) < 1e-9 * abs(e.total)
    d = eff.to_dict()
    assert set(d) == {"forget", "retain"}
    assert d["retain"]["per_instance"] == pytest.approx((Gr @ Go.sum(0)).tolist(), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """Half-precision models: results in float32; every per-parameter entry within the derived
    bound tol * S of the oracle on the same model (S = sum_k |x_k y_k|, tol = 4 u_model + 64 u_f32;
    see gefx.check), which a dropped parameter or a wrong factor would exceed."""
    from gefx.check import tolerance

    model = tiny_model("llama", torch.float32).to(dtype)
    params = list(model.parameters())
    with gefx.trace(model) as tape:
        f, r, objective, _ = _forward_losses(model)
        pair = gefx.grad_dots(tape, f, r, groups="param")
        eff = gefx.g_effect(tape, objective, {"retain": r}, groups="param")["retain"]
        Gf, Gr, Go = (per_sample_grads(x, params) for x in (f, r, objective))
        where = slices(tape, params)
    assert pair.total.dtype == torch.float32
    tol = tolerance(dtype)
    obj = Go.sum(0)
    for k, (name, s) in enumerate(where.items()):
        ref, bound = Gf[:, s] @ Gr[:, s].T, Gf[:, s].abs() @ Gr[:, s].abs().T
        assert ((pair.per_group[name] - ref).abs() <= tol * bound + 1e-30).all(), name
        row = eff.per_instance_group[eff.groups.index(name)]
        assert ((row - Gr[:, s] @ obj[s]).abs() <= tol * (Gr[:, s].abs() @ obj[s].abs()) + 1e-30).all(), name


def test_graph_and_grad_untouched_training_step_identical():
    """A training step after g_effect equals the same step without it, bit for bit."""
    base = tiny_model("qwen2", torch.float32)
    results = []
    for measure in (False, True):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with gefx.trace(model, params=opt) as tape:
            f, r, objective, _ = _forward_losses(model)
            if measure:
                gefx.g_effect(tape, objective, {"forget": f, "retain": r})
                assert all(p.grad is None for p in model.parameters())
            (objective.sum() + r.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        results.append((grads, [p.detach().clone() for p in model.parameters()]))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)
