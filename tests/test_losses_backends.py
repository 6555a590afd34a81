"""Risks (gefx.losses) and the backend seam (gefx.backends)."""
import pytest
import torch

import gefx
from gefx import backends, losses
from helpers import batch, tiny_model


def test_sequence_nll_against_a_loop():
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, 2, 3, 4, 5, -100], [-100, -100, 1, 1, -100, -100], [-100] * 6])
    got = losses.sequence_nll(logits, labels)
    for k in range(3):
        terms = [-torch.log_softmax(logits[k, t - 1], -1)[labels[k, t]] for t in range(1, 6) if labels[k, t] != -100]
        want = torch.stack(terms).mean() if terms else torch.tensor(0.0, dtype=torch.float64)
        torch.testing.assert_close(got[k], want)


def test_sequence_nll_gradient_and_vmap():
    """The logits' gradient is that of the loop's; per-sample use under torch.func.vmap works
    (torch.func baselines and DP libraries call it one sample at a time)."""
    logits = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 2, 3, 4, 5, -100], [-100, -100, 1, 1, -100, -100], [-100, 7, 0, 10, 9, 8]],
                          dtype=torch.int32)
    (g,) = torch.autograd.grad(losses.sequence_nll(logits, labels).sum(), logits)
    want = torch.zeros_like(logits)
    for k in range(3):
        n = int((labels[k, 1:] != -100).sum())
        for t in range(1, 6):
            if labels[k, t] != -100:
                want[k, t - 1] = (torch.softmax(logits[k, t - 1].detach(), -1)
                                  - torch.nn.functional.one_hot(labels[k, t].long(), 11)) / n
    torch.testing.assert_close(g, want)
    per = torch.func.vmap(lambda x, y: losses.sequence_nll(x[None], y[None])[0])(logits, labels)
    torch.testing.assert_close(per, losses.sequence_nll(logits, labels))


def test_token_mean_nll_sums_to_the_models_loss():
    model = tiny_model("llama", torch.float64)
    ids, mask, labels = batch(3, 8, seed=1)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    vec = losses.token_mean_nll(out.logits, labels)
    assert vec.shape == (3,)
    torch.testing.assert_close(vec.sum().float(), out.loss.float())  # HF computes its loss in float32
    counts = (labels[:, 1:] != -100).sum(1).to(vec.dtype)
    torch.testing.assert_close(losses.sequence_nll(out.logits, labels) * counts / counts.sum(), vec)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        losses.sequence_nll(torch.randn(3, 5), torch.zeros(3, 5, dtype=torch.long))


def test_backend_status_and_forcing(monkeypatch):
    state = backends.status()
    assert state["torch"] == "available"
    monkeypatch.setenv("GEFX_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GEFX_BACKEND"):
        gefx.ops.self_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    for name, why in state.items():
        if why != "available":  # a forced backend that cannot run says why
            monkeypatch.setenv("GEFX_BACKEND", name)
            with pytest.raises(backends.BackendUnavailable, match=name):
                gefx.ops.self_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    monkeypatch.setenv("GEFX_BACKEND", "torch")
    assert backends.choose(torch.device("cpu")) == "torch"


def test_env_command(capsys):
    from gefx.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "backends:" in out and "default backend for cpu tensors" in out
    assert main(["frobnicate"]) == 2
