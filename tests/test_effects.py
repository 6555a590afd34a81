"""Norms, cosines and predicted changes along a direction (gefx.effects) in every mode of
g_effect, against the float64 per-sample oracle."""
import copy

import pytest
import torch

import gefx
from gefx.groups import resolve
from gefx.losses import sequence_nll
from helpers import FAMILIES, batch, full_grad, per_sample_grads, rel_err, slices, tiny_model

MODES = ("before", "before_ghost", "before_dense", "mapping", "online", "prepared", "prepared_later")


def _losses(model):
    fi, fm, fl = batch(3, 9, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
    r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
    return f, r, -(torch.tensor([0.7, 1.3, 0.4], dtype=f.dtype) * f)  # weighted GA: a vector objective


def _measure(model, mode, direction, monkeypatch):
    if mode in ("before_ghost", "before_dense"):
        monkeypatch.setenv("GEFX_DOT_FORM", mode.split("_")[1])
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model)
        risks = {"forget": f, "retain": r}
        if mode.startswith("before"):
            eff = gefx.g_effect(tape, obj, risks, direction=direction, norms=True)
        elif mode == "mapping":
            obj.sum().backward(retain_graph=True)
            eff = gefx.g_effect(tape, {n: p.grad for n, p in model.named_parameters()}, risks, direction=direction,
                               norms=True)
        elif mode == "online":
            eff = gefx.g_effect(tape, obj, risks, backward=True, direction=direction, norms=True)
        else:
            prepared = _prepared(tape, risks, obj, mode, norms=True)
            obj.sum().backward()
            if mode == "prepared_later":  # the retain risk is differentiated now: inside the trace
                eff = prepared.against({p: p.grad for p in model.parameters()}, direction=direction)
    if mode == "prepared":
        eff = prepared.against({p: p.grad for p in model.parameters()}, direction=direction)
    return eff, tape


def _prepared(tape, risks, obj, mode, **kw):
    """prepare(); "prepared_later" names the objective, so that the retain risk, on a forward of its
    own, is left for .against (streamed) while the forget risk, sharing the objective's graph, is held."""
    if mode != "prepared_later":
        return gefx.prepare(tape, risks, **kw)
    prepared = gefx.prepare(tape, risks, objective=obj, **kw)
    assert set(prepared.later) == {"retain"} and set(prepared.pieces) == {"forget"}
    return prepared


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_norms_cosines_and_predicted_change(family, mode, monkeypatch):
    base = tiny_model(family, torch.float64)
    ref = copy.deepcopy(base)
    params = list(ref.parameters())
    f, r, obj = _losses(ref)
    G = {"forget": per_sample_grads(f, params), "retain": per_sample_grads(r, params)}
    g_obj = full_grad(obj.sum(), params)
    gen = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in base.named_parameters()}
    d = torch.cat([direction[n].flatten() for n, _ in ref.named_parameters()])

    model = copy.deepcopy(base)
    eff, tape = _measure(model, mode, direction, monkeypatch)
    mapping, order = resolve(tape, "block")
    where = slices(tape, list(model.parameters()))
    idx = {g: torch.cat([torch.arange(where[n].start, where[n].stop) for n in where if mapping[n] == g]) for g in order}
    obj_norm = torch.stack([g_obj[idx[g]].norm() for g in order])
    # online: the forget risk's pieces are the step's own, rescaled per sample; Llama/Qwen2's RMSNorm
    # computes in float32 even for float64 inputs, so those agree to float32 roundoff (test_step.py)
    tol = 1e-6 if mode == "online" and family != "gpt2" else 1e-9
    assert rel_err(eff["forget"].objective_norm_group, obj_norm) < 1e-9
    assert eff["forget"].objective_norm == pytest.approx(float(g_obj.norm()), rel=1e-9)
    for name, Gr in G.items():
        e = eff[name]
        norms = torch.stack([Gr[:, idx[g]].norm(dim=1) for g in order])
        dots = torch.stack([Gr[:, idx[g]] @ g_obj[idx[g]] for g in order])
        assert rel_err(e.risk_norm_group, norms) < tol
        assert rel_err(e.risk_norm, Gr.norm(dim=1)) < tol
        assert rel_err(e.cosine_group, dots / (norms * obj_norm[:, None])) < tol
        assert rel_err(e.cosine, Gr @ g_obj / (Gr.norm(dim=1) * g_obj.norm())) < tol
        assert rel_err(e.predicted_change_group, torch.stack([Gr[:, idx[g]] @ d[idx[g]] for g in order])) < tol
        assert rel_err(e.predicted_change, Gr @ d) < tol
        assert e.cosine.abs().max() <= 1 + 1e-12


def test_rows_and_dict_carry_the_predicted_change():
    model = tiny_model("llama", torch.float64)
    direction = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model)
        eff = gefx.g_effect(tape, obj, {"forget": f}, direction=direction, norms=False)
    assert eff["forget"].risk_norm is None and eff["forget"].cosine is None
    rows = eff.rows(step=0)
    total = next(row for row in rows if row["group"] == "total")
    assert total["predicted_change"] == pytest.approx(float(eff["forget"].predicted_change.sum()), rel=1e-12)
    assert sum(row["predicted_change"] for row in rows if row["group"] != "total") == pytest.approx(
        total["predicted_change"], rel=1e-9)
    assert eff.to_dict()["forget"]["predicted_change"] == eff["forget"].predicted_change.tolist()


def test_bad_direction_is_refused_and_grad_untouched():
    model = tiny_model("llama", torch.float64)
    names = [n for n, _ in model.named_parameters()]
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model)
        nan = {names[0]: torch.full_like(model.get_parameter(names[0]), float("nan"))}
        with pytest.raises(ValueError, match="NaN or inf.*" + names[0].split(".")[0]):
            gefx.g_effect(tape, obj, {"forget": f}, direction=nan, backward=True)
        with pytest.raises(ValueError, match="shape"):
            gefx.g_effect(tape, obj, {"forget": f}, direction={names[0]: torch.zeros(3)})
        with pytest.raises(ValueError, match="not both"):
            gefx.g_effect(tape, obj, {"forget": f}, direction={}, optimizer=torch.optim.SGD(model.parameters(), lr=1))
    assert all(p.grad is None for p in model.parameters())


def _optimizer(kind, model):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ("before", "online", "prepared", "prepared_later"))
@pytest.mark.parametrize("kind", ("adamw", "sgd"))
def test_predicted_change_is_along_the_optimizers_real_update(family, mode, kind):
    """optimizer=: <grad r_i, delta theta> for the delta the real opt.step() then makes (state from
    one earlier step, so moments and momentum buffers are in play); optimizer untouched by gefx."""
    base = tiny_model(family, torch.float64)
    opt0 = _optimizer(kind, base)
    _losses(base)[2].sum().backward()   # an earlier step: the optimizer has state
    opt0.step()
    opt0.zero_grad()
    model, opt = copy.deepcopy((base, opt0))
    params = list(model.parameters())
    f, r, obj = _losses(model)
    G = {"forget": per_sample_grads(f, params), "retain": per_sample_grads(r, params)}
    state = copy.deepcopy(opt.state_dict())
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model)
        risks = {"forget": f, "retain": r}
        if mode == "before":
            eff = gefx.g_effect(tape, obj, risks, optimizer=opt)
            assert all(p.grad is None for p in params)
            obj.sum().backward()
        elif mode == "online":
            eff = gefx.g_effect(tape, obj, risks, optimizer=opt, backward=True)
        else:
            prepared = _prepared(tape, risks, obj, mode)
            obj.sum().backward()
            if mode == "prepared_later":
                eff = prepared.against({p: p.grad for p in params}, optimizer=opt)
    if mode == "prepared":
        eff = prepared.against({p: p.grad for p in params}, optimizer=opt)
    assert str(opt.state_dict()) == str(state)  # untouched (values and step counts)
    before = [p.detach().clone() for p in params]
    opt.step()  # the real update
    delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(params, before)])
    tol = 1e-6 if mode == "online" and family != "gpt2" else 1e-9  # see test_norms_cosines_...
    for name, Gr in G.items():
        assert rel_err(eff[name].predicted_change, Gr @ delta) < tol, name


def test_optimizer_before_the_step_counts_earlier_micro_batches():
    """Without backward=True the update follows from .grad (earlier micro-batches) plus the
    objective's gradient, as the caller's backward will leave it."""
    base = tiny_model("gpt2", torch.float64)
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _losses(model)[2].sum().backward()  # an earlier micro-batch, not yet stepped
    params = list(model.parameters())
    f, r, obj = _losses(model)
    Gf = per_sample_grads(f, params)
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model)
        eff = gefx.g_effect(tape, obj, {"forget": f}, optimizer=opt)
        obj.sum().backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(params, before)])
    assert rel_err(eff["forget"].predicted_change, Gf @ delta) < 1e-9


def test_optimizer_before_the_step_is_refused_under_torch_distributed(monkeypatch):
    model = tiny_model("llama", torch.float64)
    monkeypatch.setattr(gefx.geffect.dist, "group_size", lambda group=None: 2)
    with gefx.trace(model) as tape:
        f, r, obj = _losses(model)
        with pytest.raises(ValueError, match="needs backward=True"):
            gefx.g_effect(tape, obj, {"forget": f}, optimizer=torch.optim.SGD(model.parameters(), lr=1))
    assert all(p.grad is None for p in model.parameters())
