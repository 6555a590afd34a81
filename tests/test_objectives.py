"""Objective formulas against independent loop computations in float64, and gradient weights
against their closed forms (docs/METHOD.md §2)."""
import math

import pytest
import torch

from gefx import objectives as O

B, T, V = 3, 7, 11


def _batch(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale)
    ref = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100          # question tokens
    labels[1, :2] = -100
    labels[1, 5:] = -100          # padding
    labels[2, :4] = -100
    return logits, ref, labels


def _tokens(labels):
    """(s, t, y) for every answer token: logits[s, t] predicts y = labels[s, t+1]."""
    return [(s, t, int(labels[s, t + 1])) for s in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
            if labels[s, t + 1] != -100]


def _p(logits, s, t, y):
    row = logits[s, t]
    return math.exp(float(row[y]) - math.log(sum(math.exp(float(v)) for v in row)))


def _seq_logp(logits, labels, s):
    return sum(math.log(_p(logits, s_, t, y)) for s_, t, y in _tokens(labels) if s_ == s)


def _close(a, b, tol=1e-9):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a, b)


def _token_weighted_loop(logits, labels, weight):
    """-(1/N) sum_s sum_i weight(s,t,y,p) * CE_i per sample (token mean over the batch)."""
    toks = _tokens(labels)
    out = [0.0] * B
    for s, t, y in toks:
        p = _p(logits, s, t, y)
        out[s] += -weight(s, t, y, p) * -math.log(p)
    return [v / len(toks) for v in out]


# ---------------------------------------------------------------------------- formulas
def test_ga_is_negated_token_mean_nll():
    logits, _, labels = _batch()
    vec, w = O.ga(logits, labels)
    _close(vec, _token_weighted_loop(logits, labels, lambda *a: 1.0))
    # the batch objective is minus the usual (HF) token-mean cross-entropy
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
    _close(vec.sum(), -ce)
    for s, t, y in _tokens(labels):
        _close(w["inverse_confidence"][s, t], 1 / _p(logits, s, t, y))


def test_wga_tnpo_wtnpo_formulas():
    logits, ref, labels = _batch(1)
    a, b = 0.7, 2.5
    vec, w = O.wga(logits, labels, alpha=a)
    _close(vec, _token_weighted_loop(logits, labels, lambda s, t, y, p: p ** a))
    vec, w = O.tnpo(logits, labels, ref, beta=b)
    tw = lambda s, t, y, p: 2 * p ** b / (p ** b + _p(ref, s, t, y) ** b + 1e-5)  # noqa: E731
    _close(vec, _token_weighted_loop(logits, labels, tw))
    for s, t, y in _tokens(labels):
        _close(w["token_weight"][s, t], tw(s, t, y, _p(logits, s, t, y)))
    vec, w = O.wtnpo(logits, labels, ref, alpha=a, beta=b)
    tw2 = lambda s, t, y, p: 2 * p ** (b + a) / (p ** b + _p(ref, s, t, y) ** b + 1e-5)  # noqa: E731
    _close(vec, _token_weighted_loop(logits, labels, tw2))


def test_token_weights_are_zero_off_answer_tokens():
    logits, ref, labels = _batch(2)
    for w in (O.wga(logits, labels)[1]["token_weight"], O.tnpo(logits, labels, ref)[1]["token_weight"]):
        assert (w[labels[:, 1:] == -100] == 0).all()
        assert (w[labels[:, 1:] != -100] > 0).all()


def test_npo_formula_and_weight():
    logits, ref, labels = _batch(3)
    beta = 0.8
    vec, w = O.npo(logits, labels, ref, beta=beta)
    for s in range(B):
        lp, lpo = _seq_logp(logits, labels, s), _seq_logp(ref, labels, s)
        # (2/beta) log(1 + (p/p_o)^beta), averaged over the batch
        _close(vec[s], (2 / beta) * math.log1p(math.exp(beta * (lp - lpo))) / B)
        p_b, po_b = math.exp(beta * lp), math.exp(beta * lpo)
        _close(w["instance_weight"][s], 2 * p_b / (p_b + po_b))


def test_npo_weight_is_one_at_the_start():
    logits, _, labels = _batch(4)
    vec, w = O.npo(logits, labels, logits.clone(), beta=0.5)
    _close(w["instance_weight"], torch.ones(B))
    _close(vec, torch.full((B,), (2 / 0.5) * math.log(2) / B, dtype=torch.float64))


def test_simnpo_formula():
    logits, _, labels = _batch(5)
    beta, gamma = 2.0, 0.3
    vec, w = O.simnpo(logits, labels, beta=beta, gamma=gamma)
    for s in range(B):
        n = sum(1 for s_, _, _ in _tokens(labels) if s_ == s)
        z = -(beta / n) * _seq_logp(logits, labels, s) - gamma
        _close(vec[s], -(2 / beta) * math.log(1 / (1 + math.exp(-z))) / B)
        _close(w["instance_weight"][s], 2 / (1 + math.exp(z)))


def test_dpo_formula():
    lw, rw, labw = _batch(6)
    ll, rl, labl = _batch(7)
    beta = 0.3
    vec, w = O.dpo(lw, labw, ll, labl, rw, rl, beta=beta)
    for s in range(B):
        m = (_seq_logp(lw, labw, s) - _seq_logp(rw, labw, s)) - (_seq_logp(ll, labl, s) - _seq_logp(rl, labl, s))
        _close(vec[s], -(2 / beta) * math.log(1 / (1 + math.exp(-beta * m))) / B)
    v0, w0 = O.dpo(lw, labw, ll, labl, lw, ll, beta=beta)
    _close(w0["instance_weight"], torch.ones(B))


def test_nll_matches_cross_entropy_token_mean():
    logits, _, labels = _batch(8)
    vec, _ = O.nll(logits, labels)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
    _close(vec.sum(), ce)
    _close(vec, [-v for v in _token_weighted_loop(logits, labels, lambda *a: 1.0)])


def test_kl_formula():
    logits, ref, labels = _batch(9)
    vec, _ = O.kl(logits, ref, labels)
    toks = _tokens(labels)
    out = [0.0] * B
    for s, t, _y in toks:
        po = [_p(ref, s, t, v) for v in range(V)]
        pc = [_p(logits, s, t, v) for v in range(V)]
        out[s] += sum(a * (math.log(a) - math.log(b)) for a, b in zip(po, pc))
    _close(vec, [v / len(toks) for v in out])
    assert float(O.kl(logits, logits, labels)[0].abs().max()) < 1e-12


def test_kl_over_all_positions_is_the_reference_codes_batchmean():
    """kl:positions=all gives the reference code's KL (tmlr-group/G-effect dataloader.py: kl_div of
    the flattened log-probabilities of every position, batchmean), question and padding included;
    the default (answer positions) gives another value on the same batch."""
    import torch.nn.functional as F
    logits, ref, labels = _batch(9)
    reg = O.make("ga+kl:positions=all:lambda=1").regs[0][1]
    assert reg.spec() == "kl:positions=all"
    f = O.Forward(logits, labels)
    out = reg({"retain": f}, {"retain": O.Forward(ref, labels)})
    want = F.kl_div(F.log_softmax(logits, -1).view(-1, V), F.log_softmax(ref, -1).view(-1, V),
                    reduction="batchmean", log_target=True)
    _close(out.loss, want)
    assert abs(float(O.kl(logits, ref, labels)[0].sum()) - float(want)) > 1e-3
    with pytest.raises(ValueError, match="kl:positions='some'"):
        O.make("ga+kl:positions=some").regs[0][1]({"retain": f}, {"retain": O.Forward(ref, labels)})
    with pytest.raises(ValueError, match="beta='x' must be a float"):
        O.make("npo:beta=x")


def test_rmu_and_rr_formulas():
    g = torch.Generator().manual_seed(10)
    D = 5
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    ho = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    _, _, labels = _batch(10)
    u = O.control_vector(D, seed=3, dtype=torch.float64)
    c = 1.7
    pos = [(s, t) for s in range(B) for t in range(T) if labels[s, t] != -100]
    vec, _ = O.rmu(h, labels, u, c=c)
    want = [0.0] * B
    for s, t in pos:
        want[s] += sum((float(h[s, t, d]) - c * float(u[d])) ** 2 for d in range(D)) / D
    _close(vec, [v / len(pos) for v in want])
    vec, _ = O.rr(h, ho, labels)
    want = [0.0] * B
    for s, t in pos:
        want[s] += sum((float(h[s, t, d]) - float(ho[s, t, d])) ** 2 for d in range(D))
    _close(vec, [v / len(pos) for v in want])


def test_control_vector_seeded_unit_nonnegative():
    u1, u2, u3 = O.control_vector(33, 0), O.control_vector(33, 0), O.control_vector(33, 1)
    assert torch.equal(u1, u2)
    assert not torch.equal(u1, u3)
    assert (u1 >= 0).all()
    assert abs(float(u1.norm()) - 1) < 1e-6


# ---------------------------------------------------------------------------- gradient weights
def _dlogits(fn, logits, *args, **kw):
    x = logits.clone().requires_grad_(True)
    vec, w = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(vec.sum(), x)
    return g, w


def _closed_form(logits, labels, coef):
    """sum over answer tokens of coef(s,t) * d log p_i / d logits = coef * (onehot(y) - softmax)."""
    want = torch.zeros_like(logits)
    for s, t, y in _tokens(labels):
        sm = torch.softmax(logits[s, t], -1)
        want[s, t] = coef(s, t) * (torch.nn.functional.one_hot(torch.tensor(y), V).double() - sm)
    return want


def test_ga_gradient_weight_is_one_over_n_on_grad_logp():
    logits, _, labels = _batch(11)
    g, w = _dlogits(O.ga, logits, labels)
    n = len(_tokens(labels))
    _close(g, _closed_form(logits, labels, lambda s, t: 1.0 / n))
    # equivalently weight (1/N) * (1/p_i) on grad p_i: d obj / d p_i, with p_i a free variable
    s, t, y = _tokens(labels)[0]
    p = torch.tensor(_p(logits, s, t, y), dtype=torch.float64, requires_grad=True)
    (gp,) = torch.autograd.grad(torch.log(p) / n, p)
    _close(gp, w["inverse_confidence"][s, t] / n)


def test_npo_gradient_weight_is_instance_weight_over_b():
    logits, ref, labels = _batch(12, scale=1.0)
    g, w = _dlogits(O.npo, logits, labels, ref, beta=0.6)
    iw = w["instance_weight"]
    assert ((iw > 0) & (iw < 2)).all()
    _close(g, _closed_form(logits, labels, lambda s, t: float(iw[s]) / B), tol=1e-8)


@pytest.mark.parametrize("fn,kw", [(O.wga, {"alpha": 0.5}), (O.tnpo, {"beta": 3.0}),
                                   (O.wtnpo, {"alpha": 0.5, "beta": 3.0})])
def test_token_weighted_gradients_are_detached_weights(fn, kw):
    logits, ref, labels = _batch(13)
    args = (labels,) if fn is O.wga else (labels, ref)
    g, w = _dlogits(fn, logits, *args, **kw)
    n = len(_tokens(labels))
    tw = w["token_weight"]
    _close(g, _closed_form(logits, labels, lambda s, t: float(tw[s, t]) / n), tol=1e-8)


# ---------------------------------------------------------------------------- objects and specs
def _fwd(seed):
    logits, ref, labels = _batch(seed)
    return O.Forward(logits, labels), O.Forward(ref, labels)


def test_make_and_combined_parts():
    f, fr = _fwd(20)
    r, rr_ = _fwd(21)
    obj = O.make("gd:lambda=0.5")
    out = obj({"forget": f, "retain": r}, {"forget": fr, "retain": rr_})
    assert set(out.rows.values()) == {"forget", "retain"}
    ga_vec, _ = O.ga(f.logits, f.labels)
    nll_vec, _ = O.nll(r.logits, r.labels)
    _close(out.loss, ga_vec.sum() + 0.5 * nll_vec.sum())
    assert out.vector is None and out.for_g_effect().dim() == 0
    out = O.make("npo:beta=0.25+kl:lambda=2")({"forget": f, "retain": r}, {"forget": fr, "retain": rr_})
    npo_vec, _ = O.npo(f.logits, f.labels, fr.logits, beta=0.25)
    kl_vec, _ = O.kl(r.logits, rr_.logits, r.labels)
    _close(out.loss, npo_vec.sum() + 2 * kl_vec.sum())
    single = O.make("wga:alpha=0.5")({"forget": f})
    _close(single.for_g_effect(), O.wga(f.logits, f.labels, 0.5)[0])
    assert 0 < single.weight_means()["token_weight"] <= 1


@pytest.mark.parametrize("spec", ["nope", "ga+bogus", "npo:gamma=1", "wga:alpha=x", "ga:alpha"])
def test_bad_specs_raise_value_error(spec):
    with pytest.raises(ValueError):
        O.make(spec)


def test_hparams_are_floats_and_needs():
    assert O.make("npo:beta=0.37").hp["beta"] == pytest.approx(0.37)
    assert O.make("npo").needs_ref and not O.make("ga").needs_ref and not O.make("simnpo").needs_ref
    assert O.make("po").batches == ("idk",)
    assert "retain" in O.make("ga+rr").hidden


def test_rmu_object_reads_hidden_state_layer_index():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    _, _, labels = _batch(22)
    ids = labels.clamp(min=0)
    out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 5
    fwd = O.Forward(out.logits, labels, out.hidden_states)
    for layer in (0, 2, 4):
        got = O.make(f"rmu:layer={layer}:c=3")({"forget": fwd}).loss
        want = O.rmu(out.hidden_states[layer], labels, O.control_vector(16, 0), 3.0)[0].sum()
        _close(got, want, tol=1e-5)
    # default: the middle decoder layer, hidden_states[2] for 4 layers
    _close(O.make("rmu")({"forget": fwd}).loss, O.rmu(out.hidden_states[2], labels, O.control_vector(16, 0), 2.0)[0].sum(), tol=1e-5)
    with pytest.raises(ValueError):
        O.make("rmu:layer=9")({"forget": fwd})
