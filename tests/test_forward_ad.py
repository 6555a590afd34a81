"""gefx.forward_ad.jvp against reverse-mode autograd in float64.

Oracle: for every output entry y_k, one torch.autograd.grad of y_k, dotted with the direction
(<grad y_k, d>), in float64. Sizes are tiny (B = 2, T = 7: 12 entries, 12 backwards).

Hugging Face's Llama / Qwen2 / MoE code computes some pieces in float32 even in a float64 model
(RMSNorm casts to float32, eager attention's softmax and the MoE router's softmax take
dtype=torch.float32): forward and reverse mode then each differentiate through float32 roundoff and
agree to ~1e-7 only. ``Float64Only`` (a TorchFunctionMode that turns every float32 the model code
asks for into float64) removes those casts, for the oracle and jvp alike; under it the agreement is
at float64 roundoff (~1e-16) and the tests ask for 1e-9. Without it, 1e-6 (GPT-2, which has no such
cast, keeps 1e-9).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gefx.forward_ad import jvp
from gefx.losses import token_nll

from helpers import FAMILIES, batch, rel_err, tiny_model

B, T = 2, 7


class Float64Only(TorchFunctionMode):
    """Every float32 requested by model code (dtype=, .float(), .to(float32)) becomes float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        elif func in (torch.Tensor.to, torch.Tensor.type):
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


def oracle(model, fn, direction: dict[str, torch.Tensor]) -> torch.Tensor:
    """<grad y_k, d> for every entry of y = fn(model), one reverse-mode backward each, float64.
    `direction` keyed by canonical name (model.named_parameters())."""
    with torch.enable_grad():
        out = fn(model)
        params = dict(model.named_parameters())
        ref = torch.zeros(out.shape, dtype=torch.float64)
        for k in range(out.numel()):
            gs = torch.autograd.grad(out.reshape(-1)[k], list(params.values()), retain_graph=True, allow_unused=True)
            ref.view(-1)[k] = sum((g.double() * direction[n].double()).sum()
                                  for g, n in zip(gs, params) if g is not None and n in direction)
    return ref


def random_direction(model, seed=1, dtype=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype or p.dtype)
            for n, p in model.named_parameters()}


def nll_fn(ids, mask, labels):
    return lambda m: token_nll(m(input_ids=ids, attention_mask=mask).logits, labels)[0]


def snapshot(model):
    return {n: (p, p.detach().clone(), None if p.grad is None else (p.grad, p.grad.clone()), p.requires_grad)
            for n, p in model.named_parameters()}


def assert_untouched(model, snap):
    now = dict(model.named_parameters())
    assert list(now) == list(snap)
    for n, (p, val, grad, flag) in snap.items():
        q = now[n]
        assert q is p and torch.equal(q.detach(), val) and q.requires_grad == flag, n
        if grad is None:
            assert q.grad is None, n
        else:
            assert q.grad is grad[0] and torch.equal(q.grad, grad[1]), n


# -- per-token NLL on the HF families ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_token_nll_float64(family):
    model = tiny_model(family)
    ids, mask, labels = batch(B, T, seed=0)
    fn = nll_fn(ids, mask, labels)
    # (1) a random direction keyed by name
    d = random_direction(model)
    with Float64Only():
        value, deriv = jvp(model, fn, d)
        ref = oracle(model, fn, d)
        assert torch.equal(value, fn(model).detach()) and not value.requires_grad and not deriv.requires_grad
    assert deriv.shape == (B, T - 1) and deriv.dtype == torch.float64
    assert rel_err(deriv, ref) <= 1e-9
    # without the mode: HF's own float32 casts bound the agreement (module docstring)
    value, deriv = jvp(model, fn, d)
    assert rel_err(deriv, oracle(model, fn, d)) <= (1e-9 if family == "gpt2" else 1e-6)
    # (2) the step's .grad after backward, keyed by the parameter tensors
    model.zero_grad(set_to_none=True)
    with Float64Only():
        (-fn(model).sum()).backward()  # gradient ascent on the forget tokens
        grads = {p: p.grad for p in model.parameters()}
        snap = snapshot(model)
        value, deriv = jvp(model, fn, grads)
        assert_untouched(model, snap)
        ref = oracle(model, fn, {n: p.grad for n, p in model.named_parameters()})
    assert rel_err(deriv, ref) <= 1e-9
    # every answer token's G-effect: masked positions are 0
    answer = labels[:, 1:] != -100
    assert torch.all(deriv[~answer] == 0) and deriv[answer].abs().min() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_token_nll_float32(family):
    """float32 model: jvp in float32 against the float64 oracle on the same (float32-rounded)
    weights. Measured: 2e-7 relative to the largest entry (the same as reverse mode in float32,
    i.e. a couple of float32 ulp); the bound is 1e-5 (84 ulp)."""
    model32 = tiny_model(family).to(torch.float32)
    model64 = tiny_model(family).to(torch.float32).to(torch.float64)  # the same weights, exactly
    ids, mask, labels = batch(B, T, seed=1)
    fn = nll_fn(ids, mask, labels)
    d64 = random_direction(model64, seed=2)
    d32 = {n: t.float() for n, t in d64.items()}
    value, deriv = jvp(model32, fn, d32)
    assert deriv.dtype == torch.float32 and value.dtype == torch.float32
    with Float64Only():
        ref = oracle(model64, fn, {n: t.double() for n, t in d32.items()})
    assert rel_err(deriv, ref) <= 1e-5
    # a float64 direction for a float32 model is cast to the parameter's dtype
    _, deriv2 = jvp(model32, fn, d64)
    assert deriv2.dtype == torch.float32 and rel_err(deriv2, ref) <= 1e-5
    assert torch.equal(value, fn(model32).detach())


# -- sdpa -------------------------------------------------------------------------------------
def test_sdpa_default_attention():
    """HF's default attention (sdpa) runs the CPU flash kernel, which has no forward-AD formula;
    jvp runs fn on the math kernel and restores the caller's backend settings."""
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    ids, mask, labels = batch(B, T, seed=0)
    fn = lambda m: token_nll(m(input_ids=ids).logits, labels)[0]  # no mask: is_causal, flash kernel
    d = random_direction(model)

    # a plain call runs a fused kernel here, and torch.func.jvp on its own fails on it (torch 2.13)
    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            return func(*args, **(kwargs or {}))

    seen = set()
    with torch.no_grad(), Ops():
        model(input_ids=ids)
    assert any("_scaled_dot_product_flash_attention" in op for op in seen), seen
    names = list(d)
    params = dict(model.named_parameters())

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (), {"input_ids": ids}).logits

    try:
        torch.func.jvp(f, tuple(params[n].detach() for n in names), tuple(d[n] for n in names))
    except NotImplementedError as e:  # a later torch may give the fused kernels a forward-AD formula
        assert "forward AD" in str(e)

    flags = lambda: (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    before = flags()
    with Float64Only():
        value, deriv = jvp(model, fn, d)
        ref = oracle(model, fn, d)  # reverse mode through the flash kernel
        assert flags() == before
        # a caller that disabled the math kernel: jvp still works, the setting comes back
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            inner = flags()
            _, deriv_user = jvp(model, fn, d)
            assert flags() == inner and not inner[2]
        assert flags() == before
        model.set_attn_implementation("eager")
        value_e, deriv_e = jvp(model, fn, d)
    assert rel_err(deriv, ref) <= 1e-9
    assert torch.equal(deriv_user, deriv)
    assert rel_err(deriv_e, deriv) <= 1e-12 and rel_err(value_e, value) <= 1e-12


# -- tied weights -------------------------------------------------------------------------------
def test_tied_gpt2():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    names = dict(model.named_parameters())
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    ids, mask, labels = batch(B, T, seed=2)
    fn = nll_fn(ids, mask, labels)
    emb = torch.randn(model.lm_head.weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rest = {n: t for n, t in random_direction(model).items() if n != "transformer.wte.weight"}
    ref = oracle(model, fn, {**rest, "transformer.wte.weight": emb})  # one tensor: both uses
    derivs = [jvp(model, fn, {**rest, key: emb})[1]
              for key in ("transformer.wte.weight", "lm_head.weight", model.lm_head.weight)]
    for deriv in derivs:
        assert rel_err(deriv, ref) <= 1e-9
    # only the embedding direction: both uses (input embedding and head) see it
    only = jvp(model, fn, {"lm_head.weight": emb})[1]
    assert rel_err(only, oracle(model, fn, {"transformer.wte.weight": emb})) <= 1e-9
    # both names: the same tensor (or equal values) is fine, different tensors are refused
    same = jvp(model, fn, {**rest, "transformer.wte.weight": emb, "lm_head.weight": emb})[1]
    assert torch.equal(same, derivs[0])
    with pytest.raises(ValueError, match="tied") as e:
        jvp(model, fn, {"transformer.wte.weight": emb, "lm_head.weight": emb * 2})
    assert "lm_head.weight" in str(e.value) and "transformer.wte.weight" in str(e.value)


# -- mixture of experts ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_moe(family):
    import zoo

    model = zoo.build(family)  # eager experts, top-2 of 4
    assert family in zoo.MOE
    bt = zoo.batch(model, B, T)
    fn = nll_fn(bt["input_ids"], bt["attention_mask"], bt["labels"])
    d = random_direction(model)
    with Float64Only():
        _, deriv = jvp(model, fn, d)
        ref = oracle(model, fn, d)
        assert rel_err(deriv, ref) <= 1e-9
        # transformers' default experts implementation, grouped_mm, has no forward-AD formula:
        # jvp runs it as batched_mm and restores the setting
        model.set_experts_implementation("grouped_mm")
        assert model.config._experts_implementation == "grouped_mm"
        _, deriv_g = jvp(model, fn, d)
        assert model.config._experts_implementation == "grouped_mm"
        with pytest.raises(ValueError, match="no tensor"):  # restored on an error inside fn too
            jvp(model, lambda m: (m(input_ids=bt["input_ids"]), None)[1], d)
        assert model.config._experts_implementation == "grouped_mm"
        assert all(getattr(m.config, "_experts_implementation", "grouped_mm") == "grouped_mm"
                   for m in model.modules() if hasattr(m, "config"))
    assert rel_err(deriv_g, ref) <= 1e-9


# -- plain modules: in-place ops, hooks, buffers, dropout ------------------------------------------
class InPlaceNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.b = torch.nn.Linear(6, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6, dtype=torch.float64))

    def forward(self, x):
        h = self.a(x)
        h.relu_()  # in place on an activation
        h = h * self.scale
        h = self.bn(h)
        return self.b(h)


@pytest.mark.parametrize("train", [False, True])
def test_plain_module_inplace_hook_buffers(train):
    torch.manual_seed(0)
    net = InPlaceNet().double().train(train)
    net.b.weight.requires_grad_(False)  # a frozen parameter still gets its direction
    hook = net.a.register_forward_hook(lambda mod, inp, out: out * 2.0 + inp[0].sum(-1, keepdim=True))
    x = torch.randn(4, 5, dtype=torch.float64)
    fn = lambda m: m(x)
    d = random_direction(net)
    stats = {n: b.clone() for n, b in net.named_buffers()}
    snap = snapshot(net)
    value, deriv = jvp(net, fn, d)
    assert_untouched(net, snap)
    after_jvp = {n: b.clone() for n, b in net.named_buffers()}
    for n, b in net.named_buffers():  # reset, then a plain call from the same state
        b.copy_(stats[n])
    with torch.no_grad():
        plain = fn(net)
    for n, b in net.named_buffers():  # buffers: as a plain call left them (running stats in train mode)
        assert torch.equal(after_jvp[n], b), n
        if train and n in ("bn.running_mean", "bn.num_batches_tracked"):
            assert not torch.equal(b, stats[n])
        b.copy_(stats[n])
    assert torch.equal(value, plain)
    net.b.weight.requires_grad_(True)  # the oracle needs its gradient
    ref = oracle(net, fn, d)
    assert rel_err(deriv, ref) <= 1e-12
    hook.remove()


def test_dropout_rng():
    """Train-mode dropout: jvp consumes the RNG as a plain call does; the value equals a plain call
    under the same RNG state and the derivative is the one with that dropout mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)  # sdpa attention (the default)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).double().train()
    ids, mask, labels = batch(B, T, seed=4)
    fn = lambda m: token_nll(m(input_ids=ids, use_cache=False).logits, labels)[0]
    d = random_direction(model)
    torch.manual_seed(7)
    value, deriv = jvp(model, fn, d)
    after = torch.rand(3)
    torch.manual_seed(7)
    with torch.no_grad():
        plain = fn(model)
    assert torch.equal(torch.rand(3), after)
    assert torch.equal(value, plain)
    torch.manual_seed(7)
    assert rel_err(deriv, oracle(model, fn, d)) <= 1e-9
    torch.manual_seed(8)
    assert not torch.equal(jvp(model, fn, d)[0], value)  # dropout is live


# -- output structures ----------------------------------------------------------------------------
def test_output_structures():
    model = tiny_model("gpt2")
    ids, mask, labels = batch(B, T, seed=5)
    d = random_direction(model)
    ref = jvp(model, lambda m: m(input_ids=ids, use_cache=False).logits, d)[1]

    def fn(m):
        logits = m(input_ids=ids, use_cache=False).logits
        nll, answer = token_nll(logits, labels)
        return {"nll": nll, "pair": (logits, answer), "n": 3, "tag": "x"}

    value, deriv = jvp(model, fn, d)
    assert set(deriv) == {"nll", "pair", "n", "tag"}
    assert torch.equal(deriv["pair"][0], ref) and deriv["pair"][1] is None
    assert value["pair"][1].dtype == torch.bool and value["n"] == 3 and value["tag"] == "x"
    assert deriv["n"] is None and deriv["tag"] is None
    # a Hugging Face ModelOutput is a pytree: fields come back by name
    value, deriv = jvp(model, lambda m: m(input_ids=ids, use_cache=False), d)
    assert type(deriv) is type(value) and torch.equal(deriv.logits, ref)
    # fn may call the model it closes over instead of its argument: the same, reparametrised object
    assert torch.equal(jvp(model, lambda _: model(input_ids=ids, use_cache=False).logits, d)[1], ref)
    # no direction (or only None entries): one forward, zero derivative
    value, deriv = jvp(model, lambda m: m(input_ids=ids, use_cache=False).logits, {"lm_head.weight": None})
    assert torch.equal(deriv, torch.zeros_like(value))


def test_grad_modes():
    """Under no_grad or inference_mode: the same values; never a graph."""
    model = tiny_model("llama")
    ids, mask, labels = batch(B, T, seed=6)
    fn = nll_fn(ids, mask, labels)
    d = random_direction(model)
    v0, d0 = jvp(model, fn, d)
    with torch.no_grad():
        v1, d1 = jvp(model, fn, d)
    with torch.inference_mode():
        v2, d2 = jvp(model, fn, d)
    for v, dv in ((v0, d0), (v1, d1), (v2, d2)):
        assert v.grad_fn is None and dv.grad_fn is None and not v.requires_grad
    assert torch.equal(d0, d1) and torch.equal(d0, d2) and torch.equal(v0, v2)


# -- errors -----------------------------------------------------------------------------------
def test_errors_and_untouched():
    model = tiny_model("qwen2")
    model.model.embed_tokens.weight.requires_grad_(False)
    ids, mask, labels = batch(B, T, seed=7)
    fn = nll_fn(ids, mask, labels)
    fn(model).sum().backward()
    d = random_direction(model)
    snap = snapshot(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="not a parameter name") as e:
        jvp(model, fn, {"model.layers.0.self_attn.q_prj.weight": d[name]})
    assert name in str(e.value)  # the suggestion
    with pytest.raises(ValueError, match="not a parameter of the model"):
        jvp(model, fn, {torch.zeros(3): torch.zeros(3)})
    with pytest.raises(ValueError, match=r"shape \(16, 17\).*" + name.replace(".", r"\.")):
        jvp(model, fn, {name: torch.zeros(16, 17, dtype=torch.float64)})
    for bad, kind in ((float("nan"), "NaN"), (float("inf"), "inf")):
        t = d[name].clone()
        t[3, 4] = bad
        with pytest.raises(ValueError, match=f"{kind}.*" if kind == "NaN" else kind) as e:
            jvp(model, fn, {name: t})
        assert name in str(e.value)
    with pytest.raises(ValueError, match="no tensor"):
        jvp(model, lambda m: None, d)
    with pytest.raises(ValueError, match="no tensor"):
        jvp(model, lambda m: {"n": 3}, d)
    with pytest.raises(ValueError, match="no floating-point tensor"):
        jvp(model, lambda m: m(input_ids=ids).logits.argmax(-1), d)
    with pytest.raises(TypeError, match="mapping"):
        jvp(model, fn, [d[name]])
    with pytest.raises(TypeError, match="tensor or None"):
        jvp(model, fn, {name: 1.0})
    assert_untouched(model, snap)
    assert model.config._attn_implementation == "eager"
