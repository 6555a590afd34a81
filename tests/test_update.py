"""gefx.update: the change an optimizer's next step() will make, checked against a real step.

The oracle is independent of gefx: a deep copy of the model and the optimizer together, the
gradients copied over (``copy.deepcopy`` of a Parameter drops ``.grad``), ``step()``, and the
difference of the parameters. For torch's for-loop and foreach implementations the closed forms
replay the same operations in the parameter's dtype, so the result must be bit-identical
(``torch.equal``), in float64 and float32 alike. The fused kernels order their arithmetic
differently: there the tolerance is the rounding of the final ``theta + update`` (half an ulp of
``|theta_after|``) plus a few ulps of the update itself, i.e. 2 eps (|theta| + |delta|) per element.
Every call is also checked to leave the parameters, their .grad, the optimizer's state (tensors,
``step`` counters and keys) and its param groups bit-identical.
"""
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

from gefx.update import update

U = importlib.import_module("gefx.update")  # the module, even once gefx exports the function `update`

F64, F32 = torch.float64, torch.float32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: the fused CPU kernels' thread hand-off would cost ~13 ms a step on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(8, 5, generator=g, dtype=dtype), torch.randn(8, 3, generator=g, dtype=dtype)
    for p in model.parameters():
        p.grad = None
    nn.functional.mse_loss(model(x), y).backward()


def trained(model, opt, warm):
    """`warm` real steps, then fresh gradients for the step under test."""
    for i in range(warm):
        backward(model, 100 + i)
        opt.step()
    backward(model, 7)
    return model, opt


def oracle(model, opt, grads=None):
    """{original parameter: theta_after - theta_before} from a real step on deep copies."""
    m2, o2 = copy.deepcopy((model, opt))
    for p, p2 in zip(model.parameters(), m2.parameters()):
        g = p.grad if grads is None else grads.get(p)
        p2.grad = None if g is None else g.clone()
    o2.step()
    return {p: p2.detach() - p.detach() for p, p2 in zip(model.parameters(), m2.parameters())
            if (p.grad if grads is None else grads.get(p)) is not None}


def snapshot(opt):
    """Everything update() must leave alone, cloned."""
    def clone(v):
        return v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
    params = [p for group in opt.param_groups for p in group["params"]]
    return {"params": [(clone(p), None if p.grad is None else clone(p.grad)) for p in params],
            "state": [(p in opt.state, {k: clone(v) for k, v in opt.state[p].items()} if p in opt.state else None)
                      for p in params],
            "n_state": len(opt.state),
            "groups": [{k: clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]}


def assert_same(a, b):
    if torch.is_tensor(a) and a.is_sparse:
        assert b.is_sparse and torch.equal(a.to_dense(), b.to_dense())
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def checked_update(opt, grads=None):
    """update(), asserting it left the parameters and the optimizer bit-identical."""
    before = snapshot(opt)
    out = update(opt, grads)
    assert_same(snapshot(opt), before)
    return out


def assert_matches(delta, ref, exact=True, ulps=2):
    assert delta.keys() == ref.keys()
    for p, r in ref.items():
        d = delta[p]
        assert d.dtype == p.dtype and d.shape == p.shape and not d.requires_grad
        assert r.abs().max() > 0
        if exact:
            assert torch.equal(d, r), (d - r).abs().max()
        else:  # the rounding of theta + update, plus a few ulps of the update
            tol = ulps * torch.finfo(p.dtype).eps * (p.detach().abs() + r.abs())
            assert ((d - r).abs() <= tol).all(), ((d - r).abs() / tol).max()


@pytest.fixture
def no_fallback(monkeypatch):
    """The closed form must answer: stepping a copy would hide a wrong closed form."""
    def boom(*a, **k):
        raise AssertionError("fell back to stepping a copy")
    monkeypatch.setattr(U, "_fallback", boom)


# ----------------------------------------------------------------------------------------- SGD

SGD_CASES = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov": dict(momentum=0.8, nesterov=True),
    "weight_decay": dict(weight_decay=0.1),
    "all_maximize": dict(momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
}
IMPLS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("warm", [0, 3])
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd(case, warm, impl, dtype, no_fallback):
    model = make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **SGD_CASES[case], **IMPLS[impl])
    trained(model, opt, warm)
    assert_matches(checked_update(opt), oracle(model, opt), exact=impl != "fused")


def test_sgd_plain_is_minus_lr_grad(no_fallback):
    model = make_model(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trained(model, opt, 0)
    for p, d in checked_update(opt).items():
        torch.testing.assert_close(d, -0.05 * p.grad, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------ Adam(W)

ADAM_CASES = {
    "plain": dict(),
    "amsgrad": dict(amsgrad=True),
    "weight_decay": dict(weight_decay=0.1),
    "maximize": dict(maximize=True),
    "all": dict(amsgrad=True, weight_decay=0.1, maximize=True, betas=(0.8, 0.99), eps=1e-6),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("warm", [0, 1, 3])
@pytest.mark.parametrize("case", ADAM_CASES)
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_adam(cls, case, warm, impl, dtype, no_fallback):
    model = make_model(dtype)
    opt = cls(model.parameters(), lr=0.01, **ADAM_CASES[case], **IMPLS[impl])
    trained(model, opt, warm)
    assert_matches(checked_update(opt), oracle(model, opt), exact=impl != "fused")


def test_adamw_is_adam_with_decoupled_weight_decay():
    """torch 2.13: AdamW only sets decoupled_weight_decay=True and shares Adam's step; the first
    AdamW constructed replaces AdamW.step by a profiling wrapper (Optimizer._patch_step_function),
    so only the unwrapped functions compare equal."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    assert issubclass(torch.optim.AdamW, torch.optim.Adam)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert U._same(torch.optim.AdamW, torch.optim.Adam, "step")
    assert U._closed_form(opt) is U._adam


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("opt_kw", [dict(cls=torch.optim.Adam, weight_decay=0.1),
                                    dict(cls=torch.optim.AdamW, weight_decay=0.1, amsgrad=True),
                                    dict(cls=torch.optim.AdamW, weight_decay=0.1, fused=True),
                                    dict(cls=torch.optim.SGD, momentum=0.9, weight_decay=0.1)],
                         ids=["Adam", "AdamW_amsgrad", "AdamW_fused", "SGD"])
def test_tensor_lr(opt_kw, dtype, no_fallback):
    """A float32 tensor lr: torch uses its float32 value (also inside 1 - lr*wd)."""
    kw = dict(opt_kw)
    cls = kw.pop("cls")
    model = make_model(dtype)
    opt = cls(model.parameters(), lr=torch.tensor(0.01), **kw)
    trained(model, opt, 2)
    assert_matches(checked_update(opt), oracle(model, opt), exact=not kw.get("fused"))


@pytest.fixture
def capturable_on_cpu(monkeypatch):
    """torch refuses capturable=True on the CPU (an assertion on the device only: the arithmetic is
    device-agnostic); let the oracle run its capturable branches here."""
    import torch.optim.adam as adam_mod
    monkeypatch.setattr(adam_mod, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", "cuda"])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("warm", [0, 3])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_adam_capturable(cls, warm, foreach, dtype, capturable_on_cpu, no_fallback):
    """The tensor branch: bias corrections from the float32 step tensor, also for float64
    parameters (the float branch would differ by ~1e-7 relative there)."""
    model = make_model(dtype)
    opt = cls(model.parameters(), lr=torch.tensor(0.01), weight_decay=0.1, amsgrad=True,
              capturable=True, foreach=foreach)
    trained(model, opt, warm)
    assert opt.state == {} or opt.state[next(model.parameters())]["step"].dtype == F32
    assert_matches(checked_update(opt), oracle(model, opt))


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("warm", [0, 3])
def test_adam_differentiable(warm, dtype, no_fallback):
    """differentiable=True takes the tensor branch too (plain tensors: torch's step is in place)."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=dtype), torch.randn(3, dtype=dtype)]
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True, differentiable=True)
    for i in range(warm + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        if i < warm:
            opt.step()
    o2 = copy.deepcopy(opt)
    for p, p2 in zip(params, o2.param_groups[0]["params"]):
        p2.grad = p.grad.clone()
    o2.step()
    ref = {p: p2 - p for p, p2 in zip(params, o2.param_groups[0]["params"])}
    assert_matches(checked_update(opt), ref)


def test_adam_complex_parameter(no_fallback):
    torch.manual_seed(0)
    p = torch.randn(3, 2, dtype=torch.complex128)
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1, amsgrad=True)
    for i in range(3):
        p.grad = torch.randn_like(p)
        if i < 2:
            opt.step()
    o2 = copy.deepcopy(opt)
    q = o2.param_groups[0]["params"][0]
    q.grad = p.grad.clone()
    o2.step()
    d = checked_update(opt)[p]
    assert d.dtype == torch.complex128 and torch.equal(d, q - p)


BF16_OPTS = {
    "SGD": lambda ps, impl: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1, **impl),
    "Adam": lambda ps, impl: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, **impl),
    "AdamW": lambda ps, impl: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True, **impl),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", BF16_OPTS)
def test_bfloat16(name, impl):
    """bfloat16 parameters of 64+ elements (the fused kernels' SIMD blocks): the for-loop step is
    reproduced bit for bit; foreach and fused to a couple of bfloat16 ulps of theta (they round
    their intermediates differently). Fused SGD on the CPU goes through the fallback: in torch
    2.13 its kernel leaves full SIMD blocks unchanged (pytorch/pytorch#191763)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)).to(torch.bfloat16)
    opt = BF16_OPTS[name](model.parameters(), IMPLS[impl])
    for i in range(3):
        x, y = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if i < 2:
            opt.step()
    ref = oracle(model, opt)
    delta = checked_update(opt)
    if name == "SGD" and impl == "fused":
        for p, r in ref.items():
            assert torch.equal(delta[p], r)
    else:
        assert_matches(delta, ref, exact=impl == "loop", ulps=4)


# ---------------------------------------------------------- groups, missing grads, explicit grads

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("make", [
    lambda groups: torch.optim.AdamW(groups, lr=0.01, amsgrad=True),
    lambda groups: torch.optim.Adam(groups, lr=0.01, foreach=True),
    lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
], ids=["AdamW", "Adam_foreach", "SGD"])
def test_param_groups_and_missing_grad(make, dtype, no_fallback):
    model = make_model(dtype)
    first, norm, last = model[0], model[1], model[3]
    opt = make([{"params": list(first.parameters()) + list(norm.parameters()), "lr": 0.03, "weight_decay": 0.2},
                {"params": list(last.parameters()), "weight_decay": 0.0}])
    trained(model, opt, 2)
    norm.bias.grad = None  # has state from the warm steps, but no gradient now: torch skips it
    delta = checked_update(opt)
    assert norm.bias not in delta and len(delta) == 5
    assert_matches(delta, oracle(model, opt))


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
], ids=["AdamW", "SGD", "RMSprop"])
def test_explicit_grads(make, dtype):
    """grads= replaces .grad; a parameter missing from it (or None) has no gradient."""
    model = make_model(dtype)
    opt = make(model.parameters())
    trained(model, opt, 2)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    grads = {p: torch.randn(p.shape, generator=g, dtype=dtype) for p in params[:-2]}
    grads[params[-2]] = None  # params[-1] is missing altogether
    delta = checked_update(opt, grads)
    assert set(delta) == set(params[:-2])
    assert_matches(delta, oracle(model, opt, grads))
    assert not torch.equal(delta[params[0]], checked_update(opt)[params[0]])


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
                                  lambda ps: torch.optim.RMSprop(ps, lr=0.01)], ids=["AdamW", "RMSprop"])
def test_lr_scheduler(make):
    """The lr a scheduler has set is the one used; its extra group keys ("initial_lr") and its
    wrapper around opt.step change nothing."""
    model = make_model(F64)
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(2):
        backward(model, 100 + i)
        opt.step()
        sched.step()
    backward(model, 7)
    assert opt.param_groups[0]["lr"] == 0.0025
    assert_matches(checked_update(opt), oracle(model, opt), exact=True)


def test_bad_grads():
    model = make_model(F64)
    opt = torch.optim.Adam(model.parameters())
    p = next(model.parameters())
    with pytest.raises(ValueError, match="does not match"):
        update(opt, {p: torch.zeros(p.shape[::-1], dtype=F64)})
    with pytest.raises(ValueError, match="does not match"):
        update(opt, {p: torch.zeros(p.shape, dtype=F32)})
    with pytest.raises(ValueError, match="not one of them"):
        update(opt, {torch.zeros(2): torch.zeros(2)})
    with pytest.raises(ValueError, match="'0.weight' is not one of them"):
        update(opt, {"0.weight": torch.zeros(4, 5, dtype=F64)})
    assert update(opt) == {}  # no gradients at all: no step


# ------------------------------------------------------------------------------------ fallback

class ClippedAdam(torch.optim.Adam):
    """Overrides step: the closed form would be wrong, the fallback must be used."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-0.05, 0.05)
        return super().step(closure)


class SignSGD(torch.optim.Optimizer):
    """A user-written optimizer with its own state."""

    def __init__(self, params, lr=0.01, beta=0.9):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(group["beta"]).add_(p.grad)
                p.add_(m.sign(), alpha=-group["lr"])


FALLBACKS = {
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True, weight_decay=0.1),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01, weight_decay=0.1),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=0.01),
    "ClippedAdam": lambda ps: ClippedAdam(ps, lr=0.01, weight_decay=0.1),
    "SignSGD": lambda ps: SignSGD(ps, lr=0.01),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("warm", [0, 3])
@pytest.mark.parametrize("name", FALLBACKS)
def test_fallback(name, warm, dtype):
    model = make_model(dtype)
    opt = FALLBACKS[name](model.parameters())
    assert U._closed_form(opt) is None
    trained(model, opt, warm)
    model[1].bias.grad = None
    delta = checked_update(opt)
    assert model[1].bias not in delta
    assert_matches(delta, oracle(model, opt))


def test_fallback_param_groups():
    model = make_model(F64)
    opt = torch.optim.RMSprop([{"params": model[0].parameters(), "lr": 0.03, "alpha": 0.9},
                               {"params": model[3].parameters(), "weight_decay": 0.1}], lr=0.01)
    trained(model, opt, 2)
    for p in model[1].parameters():
        p.grad = None
    assert_matches(checked_update(opt), oracle(model, opt))


def test_subclass_overriding_step_differs_from_adam():
    model = make_model(F64)
    opt = ClippedAdam(model.parameters(), lr=0.01)
    trained(model, opt, 1)
    delta = checked_update(opt)
    plain = U._adam  # what the closed form would have said: not the clipped step
    p = model[0].weight
    assert not torch.equal(delta[p], plain(opt.state[p], opt.param_groups[0], "loop", p.detach(), p.grad, opt))


def test_sparse_gradients():
    """SGD supports sparse gradients (answered by the fallback); Adam does not: a clear error."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, sparse=True).double()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 4, 4])).sum().backward()
    assert emb.weight.grad.is_sparse
    delta = checked_update(opt)
    torch.testing.assert_close(delta[emb.weight], -0.1 * emb.weight.grad.to_dense(), rtol=1e-12, atol=0)
    adam = torch.optim.Adam(emb.parameters())
    before = snapshot(adam)
    with pytest.raises(TypeError, match=r"Adam.*sparse.*direction="):
        update(adam)
    assert_same(snapshot(adam), before)


def test_lbfgs_refused():
    model = make_model(F64)
    opt = torch.optim.LBFGS(model.parameters())
    trained(model, opt, 0)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"LBFGS.*closure.*direction="):
        update(opt)
    assert_same(snapshot(opt), before)


class NeedsArg(torch.optim.Optimizer):
    """Its constructor needs an argument the param groups do not hold."""

    def __init__(self, params, schedule):
        self.schedule = schedule
        super().__init__(params, dict(lr=0.1))

    def step(self, closure=None):
        pass


class Exploding(SignSGD):
    def step(self, closure=None):
        super().step(closure)
        raise RuntimeError("boom")


def test_fallback_refusals_leave_everything_alone():
    model = make_model(F64)
    for opt, match in [(NeedsArg(model.parameters(), schedule=[1, 2]), r"NeedsArg.*rebuilt.*schedule"),
                       (Exploding(model.parameters()), r"Exploding.*failed.*boom")]:
        trained(model, opt, 0)
        if isinstance(opt, Exploding):
            opt.state[model[0].weight]["m"] = torch.ones_like(model[0].weight)
        before = snapshot(opt)
        with pytest.raises(TypeError, match=match):
            update(opt)
        assert_same(snapshot(opt), before)


def test_step_hooks_warn():
    model = make_model(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trained(model, opt, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        update(opt)
    opt.register_step_post_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="step hooks"):
        update(opt)
