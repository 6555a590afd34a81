"""PEFT LoRA on Linear and Embedding layers (lora_dropout > 0, train mode) against per-sample
autograd: only the adapters count (the frozen base weights have no gradient)."""
import copy

import pytest
import torch

import gefx
from gefx.losses import sequence_nll
from helpers import batch, per_sample_grads, rel_err, served_live, tiny_model

peft = pytest.importorskip("peft", reason="peft is a test extra (pip install -e '.[test]')")


def lora_model(targets, dtype=torch.float64, dropout=0.1):
    base = tiny_model("llama", torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                          init_lora_weights=False)  # non-zero B: every adapter has a gradient
    torch.manual_seed(1)
    return peft.get_peft_model(base, cfg).to(dtype)


def losses(model):
    fi, fm, fl = batch(3, 9, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    return (sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl),
            sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "embed_tokens", "lm_head"]])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("train", [False, True])
def test_lora_linear_and_embedding_adapters(targets, dtype, tol, train):
    model = lora_model(targets, dtype).train(train)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in names)
    if "embed_tokens" in targets:
        assert any("lora_embedding_A" in n for n in names)
    with gefx.trace(model) as tape:
        f, r = losses(model)
        pair = gefx.grad_dots(tape, f, r).total
        eff = gefx.g_effect(tape, -f, {"forget": f, "retain": r})
        Gf, Gr = per_sample_grads(f, params), per_sample_grads(r, params)
    assert set(tape.params) == names
    assert rel_err(pair, Gf @ Gr.T) < tol
    assert rel_err(eff["forget"].per_instance, -(Gf @ Gf.sum(0))) < tol
    assert rel_err(eff["retain"].per_instance, -(Gr @ Gf.sum(0))) < tol


def test_lora_online_mode_and_training_step_unchanged():
    model = lora_model(["q_proj", "v_proj", "embed_tokens"]).train()
    twin = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    with gefx.trace(model) as tape:
        f, r = losses(model)
        Gf, Gr = per_sample_grads(f, params), per_sample_grads(r, params)
        loss = -f + 0.0 * f.detach()
        eff = gefx.g_effect(tape, loss, {"forget": f, "retain": r}, backward=True)
    torch.manual_seed(5)
    f2, _ = losses(twin)
    (-f2).sum().backward()
    for p, q in zip(params, [p for p in twin.parameters() if p.requires_grad]):
        assert torch.equal(p.grad, q.grad)
    assert rel_err(eff["retain"].per_instance, -(Gr @ Gf.sum(0))) < 1e-9


def test_predicted_change_and_norms_on_lora_against_a_real_step():
    """g_effect(optimizer=, norms=True) on a LoRA model (AdamW over the adapters only): the
    predicted change equals <grad r_i, delta> for the delta the real step makes, float64."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("gpt2", torch.float64), LoraConfig(
        r=2, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    fi, fm, fl = batch(3, 8, seed=1)

    def losses(m):
        f = sequence_nll(m(input_ids=fi, attention_mask=fm).logits, fl)
        return f, -f
    twin, twin_opt = copy.deepcopy((model, opt))
    params = [p for p in twin.parameters() if p.requires_grad]
    G = per_sample_grads(losses(twin)[0], params)
    with gefx.trace(model, params=opt) as tape:
        f, obj = losses(model)
        eff = gefx.g_effect(tape, obj, {"forget": f}, backward=True, optimizer=opt, norms=True)
    before = [p.detach().clone() for p in params]
    losses(twin)[1].sum().backward()
    twin_opt.step()
    delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(params, before)])
    assert rel_err(eff["forget"].predicted_change, G @ delta) < 1e-9
    assert rel_err(eff["forget"].risk_norm, G.norm(dim=1)) < 1e-9


@pytest.mark.parametrize("weights,tol", [((0.5, 1.0, 2.0), 1e-12), ((0.7, 1.3, 0.4), 1e-6)])
@pytest.mark.parametrize("bypass", [False, True])
def test_forget_risk_served_with_a_frozen_lm_head(weights, tol, bypass, monkeypatch):
    """With only the adapters recorded the risk reaches several of them first; the step's gradients
    serve it through the last autograd node before them all (the factors fitted there): float64
    brute force's numbers (to one rounding with power-of-two weights; other weights round the
    float32 RMSNorm differently, gefx/step.py). An objective that also reaches the adapters around
    that node (a penalty on a hidden state) is not served, and exact all the same."""
    served = served_live(monkeypatch)
    model = lora_model(["q_proj", "v_proj"], dropout=0.0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    fi, fm, fl = batch(3, 9, seed=1)
    with gefx.trace(model) as tape:
        out = model(input_ids=fi, attention_mask=fm, output_hidden_states=True)
        f = sequence_nll(out.logits, fl)
        loss = -(torch.tensor(weights, dtype=f.dtype) * f)
        if bypass:
            loss = loss + 1e-3 * out.hidden_states[1].pow(2).sum((1, 2))
        Gf = per_sample_grads(f, params)
        eff = gefx.g_effect(tape, loss, {"forget": f}, backward=True)["forget"]
    step = torch.cat([p.grad.flatten() for p in params])
    assert served == ([] if bypass else ["forget"])
    assert rel_err(eff.per_instance, Gf @ step) < (1e-12 if bypass else tol)
