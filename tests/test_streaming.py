"""gefx.streaming: a partial backward whose output gradients are handed on as they come.

The gradients must be those of one ``torch.autograd.grad`` call at every recorded output, bit for
bit, whatever the graph's shape: several sinks (GPT-2's token and position embeddings), tied
weights, a side branch that reaches the loss without passing the embeddings, outputs the loss
does not reach. And the G-effects computed from streamed pieces must equal float64 per-sample
autograd (the oracle), on first use (the probe's two passes are the backward) and warm.
"""
import pytest
import torch
from torch import nn

import gefx
import gefx.products
from gefx import soundness
from gefx.losses import sequence_nll
from gefx.streaming import stream
from helpers import batch, per_sample_grads, rel_err, tiny_model


def _same_as_autograd(loss, reach):
    slots = reach.slots()
    ref = torch.autograd.grad(loss.sum(), [e for *_, e in slots], retain_graph=True, allow_unused=True)
    ref = [c.as_output(k, g) for (c, k, _), g in zip(slots, ref)]
    got, order = {}, []

    def visit(j, g):
        assert j not in got, "a slot was visited twice"
        got[j] = g
        order.append(j)

    stream(loss.sum(), slots, visit)
    assert sorted(order) == list(range(len(slots)))
    for j, r in enumerate(ref):
        assert (r is None and got[j] is None) or torch.equal(r, got[j]), slots[j][0].name
    return order


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_stream_equals_one_autograd_call(family):
    model = tiny_model(family, layers=3)
    ids, mask, labels = batch(3, 7, seed=1)
    with gefx.trace(model) as tape:
        loss = sequence_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        order = _same_as_autograd(loss, tape.graph.reach(loss, "loss"))
    assert order[0] > order[-1]  # handed on from the head down, as the backward runs


class _Branchy(nn.Module):
    """A side branch (gate) from a second input that reaches the loss around the trunk, an output
    used twice, and a layer the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.gate, self.unused = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(2, 3), nn.Linear(4, 3)

    def forward(self, x, z):
        h = torch.tanh(self.a(x))
        self.unused(x)
        return self.b(h) * torch.sigmoid(self.gate(z)) + self.b(h * h)


def test_stream_side_branches_and_unreached():
    torch.manual_seed(0)
    model = _Branchy().double()
    x, z = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with gefx.trace(model) as tape:
        out = model(x, z)
        loss = (out ** 2).sum(1)
        _same_as_autograd(loss, tape.graph.reach(loss, "loss"))
        slots = [(c, k, e) for c in tape.calls for k, e in enumerate(c.targets())]
        got = {}
        stream(loss.sum(), slots, got.__setitem__)
        names = [c.name for c, *_ in slots]
        assert got[names.index("unused")] is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["online", "before"])
def test_streamed_effects_match_oracle_first_and_warm(family, mode, monkeypatch):
    """...and on first use, each probe pass's products are taken over its own part of the samples
    only (the other part's pieces are zeros): per parameter, the two passes handle B samples in all."""
    handled = []
    real = gefx.products._Products.take

    def spy(self, n, P, rows=None):
        handled.append((len(rows), P[0].batch, int(rows.sum())) if rows is not None else None)
        return real(self, n, P, rows)
    monkeypatch.setattr(gefx.products._Products, "take", spy)
    model = tiny_model(family, layers=2).train()
    params = [p for p in model.parameters() if p.requires_grad]
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    for first in (True, False):
        if first:
            soundness.forget()
        model.zero_grad(set_to_none=True)
        with gefx.trace(model) as tape:
            f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
            r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
            g = per_sample_grads(-f, params).sum(0)
            Gf, Gr = per_sample_grads(f, params), per_sample_grads(r, params)
            eff = gefx.g_effect(tape, -f, {"forget": f, "retain": r}, backward=mode == "online", norms=True)
        assert rel_err(eff["forget"].per_instance, Gf @ g) < 1e-9, (mode, first)
        assert rel_err(eff["retain"].per_instance, Gr @ g) < 1e-9, (mode, first)
        assert rel_err(eff["retain"].risk_norm, Gr.norm(dim=1)) < 1e-9, (mode, first)
        parts = [h for h in handled if h is not None]
        if first:  # each probed risk's two passes: pieces of the part's samples only (1 + 1 of the retain's 2)
            assert parts and all(0 < b == k < total for total, b, k in parts), handled
        else:
            assert not parts, handled
        handled.clear()


def test_prepare_with_objective_refuses_what_it_cannot_finish():
    """prepare(objective=...) leaves a risk on a forward of its own for .against(): refused clearly
    when .against() comes after the trace closed, when the backward run in between was not of the
    named objective (it freed the risk's graph), and when the objective is not a graph's loss."""
    model = tiny_model("llama", torch.float64)
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)

    def losses():
        return (sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl),
                sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl))

    grads = lambda: {p: p.grad for p in model.parameters()}  # noqa: E731
    with gefx.trace(model) as tape:
        f, r = losses()
        prepared = gefx.prepare(tape, {"forget": f, "retain": r}, objective=-f)
        (-f).sum().backward()
    with pytest.raises(RuntimeError, match="trace is closed"):
        prepared.against(grads())
    model.zero_grad()
    with gefx.trace(model) as tape:
        f, r = losses()
        prepared = gefx.prepare(tape, {"retain": r}, objective=-f)
        (r.sum() - f.sum()).backward()
        with pytest.raises(RuntimeError, match=r"risks \['retain'\] were left for .against.*name the loss"):
            prepared.against(grads())
        with pytest.raises(ValueError, match="objective=.*loss tensor"):
            gefx.prepare(tape, {"retain": r}, objective=torch.tensor(1.0))
