"""A rule verified on one call is trusted on another only under the same conditions (issue 24).

Every model here is measured in two or more successive traces, the module changing its behaviour
in between (a flag, the sequence length, train/eval, a forward replaced on the instance, a Linear
subclass switching on extra behaviour): each measurement is exact against float64 per-sample
autograd, or refused by name. A module changed between its recorded forward and the measurement
is refused, naming what changed."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gefx
from gefx import soundness
from helpers import per_sample_grads, rel_err

V, D = 11, 6


class Scale(nn.Module):
    """Norm-like (one weight vector, no children): y = x * w, or x * w**2 once `squared` is set, or
    when `by_length` is set and the sequence is longer than 5, or in eval mode when `eval_squares`."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, D, dtype=torch.float64))
        self.squared, self.by_length, self.eval_squares = False, False, False

    def forward(self, x):
        square = (self.squared or (self.by_length and x.shape[1] > 5)
                  or (self.eval_squares and not self.training))
        return x * (self.weight ** 2 if square else self.weight)


class Doubling(nn.Linear):
    """A Linear subclass whose extra behaviour (the weight counted twice) is switched on later."""

    doubled = False

    def forward(self, x):
        return F.linear(x, self.weight * 2 if self.doubled else self.weight, self.bias)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D).double()
        self.scale = Scale()
        self.proj = Doubling(D, D).double()
        self.head = nn.Linear(D, V).double()

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.scale(self.embed(ids)))))


def _nll(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(
        ids.shape[0], -1).sum(1)


def _ids(t, seed):
    return torch.randint(0, V, (3, t), generator=torch.Generator().manual_seed(seed))


def _measured_vs_oracle(model, ids) -> float:
    """The relative error of gefx's per-instance G-effects (GA on the batch, the batch as the risk)
    against float64 per-sample autograd of the same model as it is now."""
    with gefx.trace(model) as tape:
        r = _nll(model, ids)
        got = gefx.g_effect(tape, -r, {"r": r})["r"].per_instance
    params = list(model.parameters())
    G = per_sample_grads(_nll(model, ids), params)
    return rel_err(got, G @ -G.sum(0))


def _exact_or_refused(model, ids) -> str:
    try:
        err = _measured_vs_oracle(model, ids)
    except gefx.Refused as exc:
        return f"refused: {exc}"
    assert err < 1e-9, err
    return "exact"


CHANGES = {
    "flag": lambda m, mp: setattr(m.scale, "squared", True),
    "train/eval": lambda m, mp: (setattr(m.scale, "eval_squares", True), m.eval()),
    "forward replaced": lambda m, mp: setattr(m.scale, "forward", types.MethodType(
        lambda self, x: x * self.weight ** 2, m.scale)),
    "linear subclass": lambda m, mp: setattr(m.proj, "doubled", True),
    "linear subclass, class-wide": lambda m, mp: mp.setattr(Doubling, "doubled", True),
    "class's forward replaced": lambda m, mp: mp.setattr(Scale, "forward", lambda self, x: x * self.weight ** 2),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_module_changed_between_traces_is_reverified(change, monkeypatch):
    soundness.forget()
    model = Tiny()
    ids = _ids(7, 1)
    assert _exact_or_refused(model, ids) == "exact"
    assert _exact_or_refused(model, ids) == "exact"  # the verdict reused
    CHANGES[change](model, monkeypatch)
    assert _exact_or_refused(model, ids) == "exact"  # verified again: the rule replaced by the generic one
    assert _exact_or_refused(model, _ids(7, 2)) == "exact"


def test_a_forward_branching_on_the_sequence_length():
    """Short inputs first (x * w: the norm rule verified), then long ones (x * w**2: not
    elementwise-affine in w), then short again: each exact."""
    soundness.forget()
    model = Tiny()
    model.scale.by_length = True
    for t, seed in ((5, 1), (5, 2), (8, 3), (5, 4), (8, 5)):
        assert _exact_or_refused(model, _ids(t, seed)) == "exact", t


def test_the_flag_set_back_reuses_the_first_verdict():
    """Verdicts are kept per conditions: toggling back and forth verifies each state once."""
    from gefx.rules import CHECKED
    soundness.forget()
    model = Tiny()
    ids = _ids(6, 1)
    for squared in (False, True, False, True):
        model.scale.squared = squared
        assert _exact_or_refused(model, ids) == "exact"
    assert len(CHECKED[model.scale]) == 2


def test_a_module_changed_after_its_forward_is_refused_by_name():
    """The flag set between the forward and the measurement: the rule would re-run a forward that
    computes something else than the recorded one. Refused, naming the module and the attribute;
    .grad untouched."""
    soundness.forget()
    model = Tiny()
    ids = _ids(7, 1)
    with gefx.trace(model) as tape:
        r = _nll(model, ids)
        model.scale.squared = True
        with pytest.raises(gefx.Refused, match=r"scale \(Scale\) changed between its recorded forward.*'squared'"):
            gefx.g_effect(tape, -r, {"r": r})
    assert all(p.grad is None for p in model.parameters())


def test_a_forward_replaced_after_the_forward_is_refused():
    soundness.forget()
    model = Tiny()
    ids = _ids(7, 1)
    with gefx.trace(model) as tape:
        r = _nll(model, ids)
        model.scale.forward = types.MethodType(lambda self, x: x * self.weight ** 2, model.scale)
        with pytest.raises(gefx.Refused, match=r"scale \(Scale\) changed.*its forward\)"):
            gefx.g_effect(tape, -r, {"r": r})
