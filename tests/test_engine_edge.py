"""Structure the HF tests do not cover, restricted parameters, groups, and bad input."""
import pytest
import torch
from torch import nn

import gefx
from gefx.losses import sequence_nll
from helpers import batch, per_sample_grads, rel_err, slices, tiny_model


class Mix(nn.Module):
    """A parameterised module no rule knows: tanh(x @ W) + x * tanh(s) (generic fallback)."""

    def __init__(self, d):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.s = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x @ self.W) + x * torch.tanh(self.s)


class Gate(nn.Module):
    """A 1-D `weight` that is *not* elementwise-affine: the norm rule must reject it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.sigmoid(self.weight)


class Toy(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Linear applied twice -> Mix -> Gate -> head tied
    to the embedding, plus a Linear sharing its weight with another Linear."""

    def __init__(self, vocab=13, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.twice = nn.Linear(d, d)
        self.a = nn.Linear(d, d, bias=False)
        self.b = nn.Linear(d, d, bias=False)
        self.b.weight = self.a.weight  # one parameter, two modules
        self.mix = Mix(d)
        self.gate = Gate(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied input/output embedding

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = self.twice(torch.tanh(self.twice(h)))
        h = self.b(torch.relu(self.a(h)))
        return self.head(self.gate(self.mix(h)))


def toy_losses(model):
    ids1 = torch.tensor([[3, 5, 5, 7, 0], [2, 2, 9, 0, 0], [12, 4, 3, 1, 8]])
    ids2 = torch.tensor([[5, 6, 7, 8], [9, 3, 3, 0]])
    lab1, lab2 = ids1.masked_fill(ids1 == 0, -100), ids2.masked_fill(ids2 == 0, -100)
    return sequence_nll(model(ids1), lab1), sequence_nll(model(ids2), lab2)


@pytest.mark.parametrize("form", ["ghost", "dense"])
def test_toy_structures_match_brute_force(form, monkeypatch):
    monkeypatch.setenv("GEFX_DOT_FORM", form)
    torch.manual_seed(0)
    model = Toy().double()
    params = list(model.parameters())
    assert len(params) == 9  # tied and shared weights count once
    with gefx.trace(model) as tape:
        f, r = toy_losses(model)
        pair = gefx.grad_dots(tape, f, r, groups="param")
        norms = gefx.grad_dots(tape, f)
        vs = gefx.grad_dots(tape, f, r.sum())
        eff = gefx.g_effect(tape, -f, {"retain": r}, groups="module", objective_instances=True)
        Gf, Gr = per_sample_grads(f, params), per_sample_grads(r, params)
        where = slices(tape, params)
        # dense references given explicitly, e.g. an optimizer's .grad
        dense_ref = {p: torch.randn_like(p) for p in params}
        vs_map = gefx.grad_dots(tape, f, dense_ref)
    assert rel_err(pair.total, Gf @ Gr.T) < 1e-9
    assert rel_err(norms.total, (Gf * Gf).sum(1)) < 1e-9
    assert rel_err(vs.total, Gf @ Gr.sum(0)) < 1e-9
    assert rel_err(eff["retain"].per_instance, -(Gr @ Gf.sum(0))) < 1e-9
    assert rel_err(eff["retain"].per_objective_instance, -(Gf @ Gr.sum(0))) < 1e-9
    flat = torch.cat([dense_ref[p].flatten() for p in params])
    assert rel_err(vs_map.total, Gf @ flat) < 1e-9
    for name, s in where.items():
        assert rel_err(pair.per_group[name], Gf[:, s] @ Gr[:, s].T) < 1e-9, name
    assert eff.groups == ["emb", "norm", "twice", "a", "mix", "gate"]


def test_restricted_params_and_optimizer():
    model = tiny_model("llama", torch.float64)
    chosen = [model.model.layers[1].mlp.down_proj.weight, model.model.norm.weight, model.lm_head.weight]
    opt = torch.optim.SGD(chosen, lr=0.1)
    fi, fm, fl = batch(3, 8, seed=3)
    for spec in (chosen, opt, opt.param_groups):
        with gefx.trace(model, params=spec) as tape:
            f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
            norms = gefx.grad_dots(tape, f, groups="param")
            G = per_sample_grads(f, chosen)
        assert list(norms.per_group) == ["model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
        assert rel_err(norms.total, (G * G).sum(1)) < 1e-9


def test_group_presets():
    model = tiny_model("llama", torch.float64, layers=4)
    fi, fm, fl = batch(2, 6, seed=4)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        full = gefx.grad_dots(tape, f, groups="param").total
        seen = {}
        for spec in ("module", "block", "paper", "reference", lambda n: n.split(".")[0]):
            res = gefx.grad_dots(tape, f, groups=spec)
            assert rel_err(res.total, full) < 1e-12
            seen[spec if isinstance(spec, str) else "callable"] = res.groups
        with pytest.raises(ValueError, match="unknown groups 'layers'"):
            gefx.grad_dots(tape, f, groups="layers")
    assert seen["block"] == ["embed", "block.0", "block.1", "block.2", "block.3", "final_norm", "lm_head"]
    assert seen["paper"] == ["embed", "shallow", "middle", "deep", "final_norm", "lm_head"]
    assert seen["reference"] == ["embed", "layers.0-9", "final_norm", "lm_head"]
    assert seen["callable"] == ["model", "lm_head"]
    assert seen["module"][0] == "model.embed_tokens" and "model.layers.0.self_attn.q_proj" in seen["module"]


def test_gpt2_tied_embedding_is_in_embed_group():
    model = tiny_model("gpt2", torch.float64)
    ids, mask, labels = batch(2, 6, seed=5)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        res = gefx.grad_dots(tape, f, groups="block")
    assert res.groups == ["embed", "block.0", "block.1", "final_norm"]


# -- bad input: a clear error, and the model and its .grad untouched ---------------------------
def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, snap):
    return all(torch.equal(p, s) for p, s in zip(model.parameters(), snap)) and \
        all(p.grad is None for p in model.parameters())


@pytest.fixture
def traced():
    model = tiny_model("llama", torch.float64)
    snap = _snapshot(model)
    ids, mask, labels = batch(3, 7, seed=6)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        yield model, tape, f
    assert _unchanged(model, snap)


def test_scalar_where_vector_needed(traced):
    model, tape, f = traced
    with pytest.raises(ValueError, match="per-sample vector"):
        gefx.grad_dots(tape, f.sum())
    with pytest.raises(ValueError, match="per-sample vector"):
        gefx.g_effect(tape, -f, {"forget": f.mean()})


def test_loss_not_depending_on_traced_forward(traced):
    model, tape, f = traced
    other = tiny_model("llama", torch.float64, seed=1)
    ids, mask, labels = batch(3, 7, seed=6)
    g = sequence_nll(other(input_ids=ids, attention_mask=mask).logits, labels)
    with pytest.raises(ValueError, match="does not depend on any forward traced"):
        gefx.grad_dots(tape, g)
    with pytest.raises(ValueError, match="does not depend on the traced forward"):
        gefx.grad_dots(tape, f.detach())


def test_wrong_length_vector(traced):
    model, tape, f = traced
    with pytest.raises(ValueError, match="has 2 entries but the traced forward it depends on has batch size 3"):
        gefx.grad_dots(tape, f[:2])
    with pytest.raises(ValueError, match="has 6 entries"):
        gefx.grad_dots(tape, torch.cat([f, f]))


def test_nan_and_inf(traced):
    model, tape, f = traced
    with pytest.raises(ValueError, match=r"contains NaN at entries \[1\]"):
        gefx.grad_dots(tape, f * torch.tensor([1.0, float("nan"), 1.0], dtype=f.dtype))
    with pytest.raises(ValueError, match="objective contains inf"):
        gefx.g_effect(tape, f.sum() * float("inf"), {"forget": f})


def test_bad_b_mapping(traced):
    model, tape, f = traced
    with pytest.raises(ValueError, match="has shape"):
        gefx.grad_dots(tape, f, {"lm_head.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="does not count"):
        gefx.grad_dots(tape, f, {"no.such.param": torch.zeros(3)})


def test_trace_used_after_close():
    model = tiny_model("llama", torch.float64)
    ids, mask, labels = batch(2, 5, seed=7)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
    with pytest.raises(RuntimeError, match="closed"):
        gefx.grad_dots(tape, f)
    with pytest.raises(RuntimeError, match="closed"):
        with tape:
            pass


def test_no_parameterised_module_and_empty_params():
    with pytest.raises(ValueError, match="no parameterised module found"):
        gefx.trace(nn.Sequential(nn.ReLU(), nn.Tanh()))
    model = tiny_model("llama", torch.float64)
    with pytest.raises(ValueError, match="not a parameter of the traced model"):
        gefx.trace(model, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="no parameters to count"):
        gefx.trace(model, params=[])


def test_nothing_recorded_and_no_grad_forward():
    model = tiny_model("llama", torch.float64)
    ids, mask, labels = batch(2, 5, seed=8)
    with gefx.trace(model) as tape:
        with torch.no_grad():
            model(input_ids=ids)
        f = sequence_nll(tiny_model("llama", torch.float64)(input_ids=ids).logits, labels)
        with pytest.raises(ValueError, match="nothing was recorded"):
            gefx.grad_dots(tape, f)


def test_in_place_modified_input_is_detected():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with gefx.trace(model) as tape:
        y = x * 1.0
        out = model(y).squeeze(-1)
        y.add_(1.0)  # changes the recorded input of the first Linear after the forward
        with pytest.raises(gefx.Refused, match="modified in place"):
            gefx.grad_dots(tape, out)
