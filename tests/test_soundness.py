"""Exact or refused: models gefx did not write, against brute-force per-sample autograd (float64).

Each pattern is a small model a user might bring. gefx must either match the oracle (per-sample
autograd on the same forward, so dropout masks are shared) to 1e-9, in both dot forms and in the
online mode, or refuse with an error naming the parameter or module and what to do.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gefx
from helpers import per_sample_grads, rel_err

TOL = 1e-9


def nll(logits, ids):
    """Per-sample next-token NLL of a toy LM, [B]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1).mean(1)


def ids(b, t, seed, vocab=13):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def lm_losses(model):
    a, b = ids(3, 6, 1), ids(4, 5, 2)
    return nll(model(a), a), nll(model(b), b)


def counted(model):
    return [p for p in model.parameters() if p.requires_grad]


def assert_exact(model, losses=lm_losses, params=None, tol=TOL, online=True):
    """gefx's pairwise products, norms and G-effects equal the oracle's, in both dot forms and in
    the online mode."""
    params = counted(model) if params is None else params
    for form in ("ghost", "dense"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GEFX_DOT_FORM", form)
            with gefx.trace(model, params=params) as tape:
                a, b = losses(model)
                pair = gefx.grad_dots(tape, a, b).total
                norms = gefx.grad_dots(tape, a).total
                eff = gefx.g_effect(tape, -a, {"b": b}, objective_instances=True)["b"]
                Ga, Gb = per_sample_grads(a, params), per_sample_grads(b, params)
        assert rel_err(pair, Ga @ Gb.T) < tol, form
        assert rel_err(norms, (Ga * Ga).sum(1)) < tol, form
        assert rel_err(eff.per_instance, -(Gb @ Ga.sum(0))) < tol, form
        assert rel_err(eff.per_objective_instance, -(Ga @ Gb.sum(0))) < tol, form
    if online:
        for p in model.parameters():
            p.grad = None
        with gefx.trace(model, params=params) as tape:
            a, b = losses(model)
            Ga, Gb = per_sample_grads(a, params), per_sample_grads(b, params)
            eff = gefx.g_effect(tape, -a, {"a": a, "b": b}, backward=True)
        assert rel_err(eff["a"].per_instance, -(Ga @ Ga.sum(0))) < tol
        assert rel_err(eff["b"].per_instance, -(Gb @ Ga.sum(0))) < tol
        for p in model.parameters():
            p.grad = None


def refused(model, match, losses=lm_losses, params=None):
    with gefx.trace(model, params=params) as tape:
        a, b = losses(model)
        with pytest.raises(gefx.Refused, match=match):
            gefx.grad_dots(tape, a, b)
        assert all(p.grad is None for p in model.parameters())


class LM(nn.Module):
    """Embedding -> body -> head, the body given."""

    def __init__(self, body, d=8, vocab=13):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = body
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.body(self.emb(x)))


def make(body, seed=0, **kw):
    torch.manual_seed(seed)
    return LM(body, **kw).double()


# -- outputs changed after recording ----------------------------------------------------------
def test_inplace_relu_after_a_recorded_linear():
    assert_exact(make(nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8),
                                    nn.Tanh(), nn.Linear(8, 8))))


def test_inplace_arithmetic_on_an_output_used_downstream():
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, h):
            y = self.a(h)
            y.mul_(2.0).add_(h)  # rewrites the recorded output of `a` in place
            return self.b(torch.tanh(y))
    assert_exact(make(Body()))


def test_forward_hook_that_rewrites_an_output_and_a_pre_hook_that_rewrites_an_input():
    model = make(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    model.body[0].register_forward_hook(lambda m, a, out: out * 2 + 1)
    model.body[2].register_forward_pre_hook(lambda m, a: (a[0] * 3,))
    before = (dict(model.body[0]._forward_hooks), dict(model.body[2]._forward_pre_hooks))
    assert_exact(model)
    assert (dict(model.body[0]._forward_hooks), dict(model.body[2]._forward_pre_hooks)) == before


def test_global_forward_hook_is_refused():
    model = make(nn.Sequential(nn.Linear(8, 8)))
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        with pytest.raises(gefx.Refused, match="global forward hook"):
            gefx.trace(model).__enter__()
    finally:
        handle.remove()


def test_input_modified_in_place_after_the_forward_is_refused():
    model = make(nn.Sequential(nn.Linear(8, 8)))
    with gefx.trace(model) as tape:
        x = ids(3, 5, 1)
        h = model.emb(x)
        out = model.head(model.body(h))
        with torch.no_grad():
            h.add_(1.0)
        with pytest.raises(gefx.Refused, match="modified in place"):
            gefx.grad_dots(tape, nll(out, x))


# -- parameters used outside their module's call ----------------------------------------------
class TiedFunctional(nn.Module):
    def __init__(self, d=8, vocab=13):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)

    def forward(self, x):
        return F.linear(torch.tanh(self.mid(self.emb(x))), self.emb.weight)


def test_tied_head_written_functionally_is_refused_by_name():
    torch.manual_seed(0)
    refused(TiedFunctional().double(), r"`emb.weight` reaches the loss .* F.linear")


def test_parameter_left_out_of_params_is_not_needed():
    torch.manual_seed(0)
    model = TiedFunctional().double()
    assert_exact(model, params=[model.mid.weight, model.mid.bias])


def test_bare_parameter_in_a_parent_forward_is_exact():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.gamma = nn.Parameter(torch.randn(8))
            self.table = nn.ParameterList([nn.Parameter(torch.randn(8, 8))])

        def forward(self, h):
            return self.lin(h) * self.gamma + torch.tanh(h @ self.table[0])
    assert_exact(make(Block()))


def test_functional_use_of_a_child_inside_a_generic_module_is_exact():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))
            self.proj = nn.Linear(8, 8)  # never called: used through F.linear below

        def forward(self, h):
            return F.linear(h * self.scale, self.proj.weight, self.proj.bias)
    assert_exact(make(Block()))


def test_weight_norm_parametrization_is_refused_by_name():
    body = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    refused(make(body), r"body.parametrizations.weight.original0.*parametrization")


def test_monkeypatched_forward_falls_back_to_the_exact_generic_rule():
    model = make(nn.Sequential(nn.Linear(8, 8), nn.Tanh()))
    lin = model.body[0]
    lin.forward = lambda x: F.linear(x, lin.weight * 2, lin.bias) + lin.bias
    assert_exact(model)


def test_linear_subclass_with_extra_math_is_exact():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(torch.tanh(x)) * 0.5
    assert_exact(make(nn.Sequential(Scaled(8, 8), nn.Tanh(), nn.Linear(8, 8))))


@pytest.mark.filterwarnings("ignore")
def test_compiled_submodule_and_compiled_model():
    # gefx's hooks break the compiled graph around each recorded call and run eagerly
    assert_exact(make(torch.compile(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))))
    assert_exact(torch.compile(make(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))))


def test_module_whose_outputs_feed_each_other():
    """A router-like module returns logits and scores computed from them; the loss uses both."""
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8))

        def forward(self, h):
            logits = F.linear(h, self.weight)
            scores, _ = torch.topk(torch.softmax(logits, -1), 2)
            scores /= scores.sum(-1, keepdim=True)  # in place, inside the forward (as HF's routers)
            return logits, scores

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.out = Router(), nn.Linear(4, 8)

        def forward(self, h):
            logits, scores = self.router(h)
            return self.out(torch.tanh(logits) * scores[..., :1] + logits.exp())
    assert_exact(make(Body()))


# -- modules that re-run, norms ---------------------------------------------------------------
class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: y = x / rms(x) * (1 + w), computed in float32 (`upcast`) or in x's dtype."""

    def __init__(self, d, upcast):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.3)
        self.upcast = upcast

    def forward(self, x):
        h = x.float() if self.upcast else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + (self.weight.float() if self.upcast else self.weight))).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_offset_norm_measured_twice_in_one_trace(dtype):
    # Computed in float32 inside, the norm's weight gradient is float32 arithmetic in the oracle
    # too: the float64 test uses a norm computing in float64.
    norm = OffsetRMSNorm(8, upcast=dtype != torch.float64)
    model = make(nn.Sequential(nn.Linear(8, 8), norm, nn.Linear(8, 8))).to(dtype)
    assert_exact(model, tol=TOL if dtype == torch.float64 else 1e-4)


def test_norm_like_module_with_extra_arguments():
    class CondNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d))

        def forward(self, x, gain, *, eps=1e-5):
            return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * self.weight * gain

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = CondNorm(8), nn.Linear(8, 8)

        def forward(self, h):
            return self.lin(self.norm(h, 1.5, eps=1e-3))
    assert_exact(make(Body()))


def test_generic_module_with_dropout_in_train_mode_reuses_the_mask():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8) / 3)
            self.drop = nn.Dropout(0.3)

        def forward(self, h):
            return torch.tanh(self.drop(h) @ self.w)
    model = make(nn.Sequential(Noisy(), nn.Dropout(0.2), nn.Linear(8, 8))).train()
    state = torch.get_rng_state()
    assert_exact(model)
    torch.set_rng_state(state)
    with gefx.trace(model) as tape:
        a, _ = lm_losses(model)
        after_forward = torch.get_rng_state()
        gefx.grad_dots(tape, a)
        assert torch.equal(torch.get_rng_state(), after_forward)  # measuring draws nothing


def test_batchnorm_eval_exact_and_train_refused_without_touching_its_buffers():
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

        def forward(self, h):
            b, t, d = h.shape
            return self.bn(self.lin(h).reshape(b * t, d)).reshape(b, t, d)

    model = make(Body()).eval()
    assert_exact(model)
    model.train()
    with gefx.trace(model) as tape:
        a, b = lm_losses(model)
        buffers = {n: x.clone() for n, x in model.named_buffers()}
        with pytest.raises(gefx.Refused, match="mixes batch rows"):
            gefx.grad_dots(tape, a)
        assert all(torch.equal(x, buffers[n]) for n, x in model.named_buffers())


# -- the per-sample contract -------------------------------------------------------------------
def test_risk_that_mixes_rows_is_refused():
    model = make(nn.Sequential(nn.Linear(8, 8)))

    def losses(m):
        a, b = lm_losses(m)
        return a - a.mean(), b
    refused(model, "is not per-sample", losses)

    def rolled(m):
        a, b = lm_losses(m)
        return a.roll(1), b
    refused(model, "is not per-sample", rolled)


def test_model_that_mixes_rows_is_refused():
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, h):
            h = self.a(h)
            return self.b(h - h.mean(0, keepdim=True))
    refused(make(Body()), "mixes batch rows.*`body.a`")


def test_full_check_probes_every_loss(monkeypatch):
    model = make(nn.Sequential(nn.Linear(8, 8)))
    calls = []
    real = gefx.soundness.probe

    def spy(tape, reach, *rest, **kw):
        calls.append(tape.check == "full" or reach.signature not in gefx.soundness.PROBED.get(model, ()))
        return real(tape, reach, *rest, **kw)
    monkeypatch.setattr(gefx.soundness, "probe", spy)
    for check in ("auto", "full"):
        with gefx.trace(model, check=check) as tape:
            a, _ = lm_losses(model)
            gefx.grad_dots(tape, a)
    assert calls[-1] is True  # "full" probes although this structure was probed before


# -- attention modules ------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first):
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=0.0)

        def forward(self, h):
            x = h if batch_first else h.transpose(0, 1)
            y, _ = self.attn(x, x, x, need_weights=False)
            return y if batch_first else y.transpose(0, 1)
    assert_exact(make(Body()))


# -- measuring changes nothing ----------------------------------------------------------------
def test_measuring_changes_nothing():
    """Buffers, the RNG state, training flags, hooks and .grad are as before a measurement (a model
    in train mode with dropout, a BatchNorm left in eval, norms and generic modules that re-run)."""
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn, self.norm = nn.Linear(8, 8), nn.BatchNorm1d(8), OffsetRMSNorm(8, upcast=False)
            self.drop, self.w = nn.Dropout(0.3), nn.Parameter(torch.randn(8))
            self.register_buffer("calls", torch.zeros(()))  # updated by every forward of the block

        def forward(self, h):
            self.calls += 1
            b, t, d = h.shape
            h = self.bn(self.lin(h).reshape(b * t, d)).reshape(b, t, d)
            return self.norm(self.drop(h)) * self.w

    model = make(Body()).train()
    model.body.bn.eval()
    model.body.lin.register_forward_hook(lambda m, a, out: None)

    def state():
        return ({k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state(),
                {n: m.training for n, m in model.named_modules()},
                {n: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks))
                 for n, m in model.named_modules()},
                [p.grad for p in model.parameters()])

    def same(x, y):
        assert all(torch.equal(x[0][k], y[0][k]) for k in x[0]) and torch.equal(x[1], y[1])
        assert x[2:] == y[2:]

    before = state()
    with gefx.trace(model) as tape:
        a, b = lm_losses(model)
        during = state()
        gefx.grad_dots(tape, a, b)
        gefx.grad_dots(tape, a)
        gefx.g_effect(tape, -a, {"a": a, "b": b})
        same(during, state())
    after = state()
    assert after[0]["body.calls"] == before[0]["body.calls"] + 2  # the two forwards, no re-run
    before[0]["body.calls"] += 2
    same((before[0], after[1], *before[2:]), after)  # the forwards drew the dropout masks


def test_registered_generic_rule_over_a_block_makes_a_double_use_exact():
    """A parameter used both through its module's call and functionally by the parent is refused
    by default, and exact once the parent is given the generic rule over all its parameters."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))
            self.proj = nn.Linear(8, 8)

        def forward(self, h):
            return self.proj(h) * self.scale + F.linear(h, self.proj.weight)

    refused(make(Block()), r"`body.proj.weight` is used inside the forward of `body`")
    n = len(gefx.rules._RULES)
    gefx.register_rule(Block, gefx.rules.GENERIC, covers="all")
    try:
        assert_exact(make(Block()))
    finally:
        del gefx.rules._RULES[:len(gefx.rules._RULES) - n]
