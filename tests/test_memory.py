"""Memory of a measurement (issue 23): gefx adds no parameter-sized tensor per parameter.

The invariant the engine keeps: besides the step's own tensors and the risks' pieces (which scale
with B x T), a measurement holds at most a few parameter-sized tensors, all of one parameter at a
time (an aggregated gradient, an update and its temporaries), formed and dropped parameter by
parameter; ``.grad`` is contracted in place. So the extra memory of a measurement over the plain
step does not grow with the number of layers. Checked by counting, with a dispatch mode, the
bytes of every live tensor of at least half a layer weight's size created during the step (the
torch backend, so that every allocation goes through the dispatcher; ``gefx.memory.LiveBytes``), at
depths 2 and 6.
Also here: the online mode's .grad handling (zeros accumulated in place, nonzero earlier gradients
added back), and PG-effects being opt-in.
"""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gefx
from gefx.losses import sequence_nll
from gefx.memory import LiveBytes
from helpers import batch, per_sample_grads, rel_err, tiny_model

WIDTH, MLP = 64, 128          # the largest weights: the MLP's 64 x 128
MIN_NUMEL = WIDTH * WIDTH     # half the largest weight: counts every layer weight, no activation


def _model(layers: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def _step(model, case: str, opt=None):
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
        risks = {"forget": f, "retain": r}
        if case == "plain":
            (-f).sum().backward()
        elif case == "before":
            gefx.g_effect(tape, -f, risks)
            (-f).sum().backward()
        elif case == "prepare":
            prepared = gefx.prepare(tape, risks)
            (-f).sum().backward()
            prepared.against({p: p.grad for p in model.parameters()})
        else:
            gefx.g_effect(tape, -f, risks, backward=True, norms=case == "norms",
                          optimizer=opt if case == "optimizer" else None,
                          objective_instances=case == "instances")


def _extra(layers: int, case: str, monkeypatch) -> int:
    """Peak counted bytes of a measured step minus those of the plain step (both warm)."""
    monkeypatch.setenv("GEFX_BACKEND", "torch")
    monkeypatch.setenv("GEFX_DOT_FORM", "dense")  # the form that forms aggregated gradients
    model = _model(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    peaks = {}
    for c in ("plain", case, "plain", case):  # the second of each counts (first-time checks done)
        model.zero_grad(set_to_none=False)
        with LiveBytes(MIN_NUMEL) as meter:
            _step(model, c, opt)
        peaks[c] = meter.peak
    assert peaks["plain"] >= WIDTH * WIDTH * 4  # the meter sees the step's own weight gradients
    return peaks[case] - peaks["plain"]


@pytest.mark.parametrize("case", ["online", "before", "prepare", "norms", "optimizer", "instances"])
def test_extra_memory_does_not_grow_with_depth(case, monkeypatch):
    largest = WIDTH * MLP * 4
    shallow, deep = _extra(2, case, monkeypatch), _extra(6, case, monkeypatch)
    # six layers hold 4 more layers' worth of weights (4 x 6 weights): an engine that kept one
    # tensor per parameter would add >= 4 x 6 x WIDTH^2 x 4 bytes = 12 largest weights more
    assert deep <= shallow + largest, (case, shallow, deep, largest)
    assert deep <= 6 * largest, (case, deep, largest)


def test_online_contracts_grad_in_place_and_accumulates():
    """Zero .grad: the step's backward accumulates into it (no copy aside), values as without;
    nonzero earlier gradients: added back after the step, values of the step's gradient alone."""
    base = tiny_model("llama")
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    results = {}
    for start in ("none", "zeros", "earlier"):
        model = copy.deepcopy(base)
        params = list(model.parameters())
        earlier = [torch.randn_like(p) for p in params]
        for p, e in zip(params, earlier):
            p.grad = None if start == "none" else torch.zeros_like(p) if start == "zeros" else e.clone()
        storages = [None if p.grad is None else p.grad.untyped_storage().data_ptr() for p in params]
        with gefx.trace(model) as tape:
            f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
            r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
            eff = gefx.g_effect(tape, -f, {"forget": f, "retain": r}, backward=True)
            g = per_sample_grads(-f, params).sum(0)
            Gr = per_sample_grads(r, params)
        results[start] = eff["retain"].per_instance
        assert rel_err(eff["retain"].per_instance, Gr @ g) < 1e-9, start
        flat = torch.cat([p.grad.flatten() for p in params])
        if start == "earlier":
            assert rel_err(flat, g + torch.cat([e.flatten() for e in earlier])) < 1e-12
        else:
            assert rel_err(flat, g) < 1e-12
        if start == "zeros":  # accumulated in place: the same storages
            assert storages == [p.grad.untyped_storage().data_ptr() for p in params]
    assert torch.equal(results["none"], results["zeros"])


@pytest.mark.parametrize("extra", ["", "norms", "optimizer", "instances"])
def test_online_mid_accumulation_keeps_one_gradient_set(extra):
    """Nonzero earlier gradients (mid gradient accumulation): the step's backward accumulates into
    them in place, as loss.backward() does, instead of moving them aside while a second set is
    formed (a parameter-sized copy of every gradient). Seen through a hook of the test's own: at
    every parameter's accumulation, .grad is the earlier tensor. Values as the float64 oracle's
    (the step's gradient alone), .grad = earlier + step."""
    model = tiny_model("llama")
    params = list(model.parameters())
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    opt = torch.optim.AdamW(params, lr=1e-3)
    earlier = [torch.randn_like(p) for p in params]
    for p, e in zip(params, earlier):
        p.grad = e.clone()
    storages = [p.grad.untyped_storage().data_ptr() for p in params]
    seen = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, k=k: seen.append((k, p.grad.untyped_storage().data_ptr())))
             for k, p in enumerate(params)]
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
        g = per_sample_grads(-f, params).sum(0)
        Gr, Gf = per_sample_grads(r, params), per_sample_grads(f, params)
        eff = gefx.g_effect(tape, -f, {"forget": f, "retain": r}, backward=True, norms=extra == "norms",
                            optimizer=opt if extra == "optimizer" else None, objective_instances=extra == "instances")
    for h in hooks:
        h.remove()
    assert {k for k, _ in seen} == set(range(len(params)))
    assert all(ptr == storages[k] for k, ptr in seen), "a second set of gradients was formed"
    assert rel_err(eff["retain"].per_instance, Gr @ g) < 1e-9
    assert rel_err(eff["forget"].per_instance, Gf @ g) < 1e-9
    if extra == "norms":
        assert rel_err(eff["retain"].risk_norm ** 2, (Gr ** 2).sum(1)) < 1e-9
    if extra == "instances":  # <grad R, grad l_s> for l = -f
        assert rel_err(eff["retain"].per_objective_instance, -Gf @ Gr.sum(0)) < 1e-9
    flat = torch.cat([p.grad.flatten() for p in params])
    assert rel_err(flat, g + torch.cat([e.flatten() for e in earlier])) < 1e-12
    if extra == "optimizer":  # along the update the real step makes from the accumulated .grad
        before = [p.detach().clone() for p in params]
        opt.step()
        delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(params, before)])
        assert rel_err(eff["retain"].predicted_change, Gr @ delta) < 1e-9


def test_objective_instances_opt_in():
    model = tiny_model("llama")
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
        plain = gefx.g_effect(tape, -f, {"retain": r})
        full = gefx.g_effect(tape, -f, {"retain": r}, objective_instances=True)
        with pytest.raises(ValueError, match="per-sample vector"):
            gefx.g_effect(tape, -f.sum(), {"retain": r}, objective_instances=True)
    assert plain["retain"].per_objective_instance is None
    assert full["retain"].per_objective_instance is not None
    assert rel_err(plain["retain"].per_instance, full["retain"].per_instance) < 1e-12


def test_check_reports_memory():
    model = tiny_model("llama", dtype=torch.float32)
    report = gefx.check(model, modes=("eval",))
    m = report.memory
    assert m is not None and m["plain"] > 0 and m["steady"] >= m["plain"] and m["first"] >= m["plain"]
    assert m["largest_param"] == max(p.numel() * 4 for p in model.parameters())
    assert "memory (tensors" in str(report) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("start", ["none", "zeros", "earlier"])
@pytest.mark.parametrize("mixed", ["forget", "retain"])
def test_online_probe_refusal_restores_grad(start, mixed):
    """Online, a risk whose entries mix rows (one the step's gradients would serve, or one with its
    own backward) is refused and .grad is left exactly as it was, whatever it held (the step's
    backward accumulates into zeros in place)."""
    from gefx import soundness
    soundness.forget()  # the probe runs once per graph structure: make this its first time
    model = tiny_model("llama")
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    params = list(model.parameters())
    for p in params:
        p.grad = None if start == "none" else torch.zeros_like(p) if start == "zeros" else torch.randn_like(p)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
        risks = {"forget": f + f.mean() if mixed == "forget" else f, "retain": r + r.mean() if mixed == "retain" else r}
        with pytest.raises(gefx.Refused, match="not per-sample"):
            gefx.g_effect(tape, -f, risks, backward=True)
    for p, b in zip(params, before):
        assert (p.grad is None) if b is None else torch.equal(p.grad, b)


def _online_extra(layers: int, first: bool, monkeypatch, how: str = "online") -> int:
    """Peak bytes of all tensors (activations included) of an online measurement of a retain risk
    the step does not serve (`how`: "online", g_effect(backward=True); "prepared", prepare with the
    objective named, the caller's backward, .against) or of the forget risk it serves ("served"),
    minus the plain step's, on its first use or warm."""
    from gefx import soundness
    monkeypatch.setenv("GEFX_BACKEND", "torch")
    model = _model(layers)
    fi, fm, fl = batch(3, 7, seed=1)
    ri, rm, rl = batch(2, 6, seed=2)
    peaks = {}
    for case in ("plain", "online") if first else ("plain", "online", "plain", "online"):
        if first:
            soundness.forget()
        model.zero_grad(set_to_none=False)
        with LiveBytes(1) as meter, gefx.trace(model) as tape:
            f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
            r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
            if case == "plain":
                (-f).sum().backward()
            elif how == "online":
                gefx.g_effect(tape, -f, {"retain": r}, backward=True)
            elif how == "served":
                gefx.g_effect(tape, -f, {"forget": f}, backward=True)
            else:
                prepared = gefx.prepare(tape, {"retain": r}, objective=-f)
                (-f).sum().backward()
                prepared.against({p: p.grad for p in model.parameters()})
        peaks[case] = meter.peak
    return peaks["online"] - peaks["plain"]


@pytest.mark.parametrize("first", [True, False], ids=["first", "steady"])
@pytest.mark.parametrize("how", ["online", "prepared"])
def test_risk_output_gradients_are_streamed(first, how, monkeypatch):
    """A risk's backward (and, on first use, the per-sample probe's two passes, which are then its
    backward) hands each layer's output gradients on as they come (gefx.streaming): the extra
    memory of the measurement does not grow with depth even counting activation-sized tensors,
    online and with ``prepare(objective=...)`` (the retain risk, on its own forward, left for
    ``.against``). Holding them for the whole model, as a plain autograd.grad call returns them (and
    ``prepare`` without the objective holds them through the caller's backward), grows it by a
    layer's set (the retain batch's 12 tokens x ~700 outputs x 4 bytes) per layer."""
    layer_set = 2 * 6 * (4 * WIDTH + 3 * MLP + 2 * WIDTH) * 4
    shallow, deep = _online_extra(2, first, monkeypatch, how), _online_extra(6, first, monkeypatch, how)
    assert deep - shallow < layer_set, (shallow, deep, layer_set)


@pytest.mark.parametrize("first", [True, False], ids=["first", "steady"])
def test_served_risk_holds_no_set(first, monkeypatch):
    """A risk the step's gradients serve (GA's forget NLL): each layer's are rescaled, turned into
    pieces and contracted with .grad as soon as the backward has finished that parameter's
    (gefx.step.Serving.serve), on its first use too (its probe's two passes run after the step's
    backward, before its products are reported): the extra memory does not grow with depth.
    Holding them for the whole model (as an autograd.grad call returns them) grows it by a layer's
    set of the forget batch (21 tokens x ~700 outputs x 4 bytes) per layer."""
    layer_set = 2 * 6 * (4 * WIDTH + 3 * MLP + 2 * WIDTH) * 4
    shallow, deep = _online_extra(2, first, monkeypatch, "served"), _online_extra(6, first, monkeypatch, "served")
    assert deep - shallow < layer_set, (shallow, deep, layer_set)


@pytest.mark.parametrize("how", ["served", "own-backward", "before", "prepare"])
def test_measurement_leaves_no_reference_cycle(how):
    """Nothing of a measurement outlives it by a reference cycle (which only the garbage collector,
    at a time of its choosing, would free, with the step's whole graph and activations): with the
    collector off, the losses (the objective holds the step's graph) are freed as soon as the
    caller drops them, on the first measurement and on a later one (online, a risk the step serves
    is then streamed during the step's backward)."""
    import gc
    import weakref
    model = tiny_model("llama")
    fi, fm, fl = batch(3, 7, seed=1)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with gefx.trace(model) as tape:
                f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
                r = f if how != "own-backward" else sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
                obj = -f
                if how == "before":
                    eff = gefx.g_effect(tape, obj, {"forget": r}, norms=True)
                elif how == "prepare":
                    prepared = gefx.prepare(tape, {"forget": r}, norms=True)
                    obj.sum().backward()
                    eff = prepared.against({p: p.grad for p in model.parameters()})
                    del prepared
                else:
                    eff = gefx.g_effect(tape, obj, {"forget": r}, backward=True, norms=True)
            alive = [weakref.ref(obj), weakref.ref(f), weakref.ref(r)]
            del tape, obj, f, r, eff
            assert all(ref() is None for ref in alive)
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_squared_norms_form_no_parameter_sized_temporary(dtype):
    """||.grad||^2 (norms=True) is summed chunk by chunk in the accumulation dtype: as exact as a
    cascaded sum, no temporary the size of the parameter (x.pow(2).sum() formed one)."""
    from gefx.precision import sq_sum
    torch.manual_seed(0)
    x = torch.randn(4000, 1100, dtype=torch.float64).to(dtype)  # 16.8 chunks of 2^18 entries
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with LiveBytes(1) as meter:
        got = sq_sum(x)
    chunk = (1 << 18) * torch.finfo(acc).bits // 8
    assert meter.peak <= 2 * chunk + 4096 < x.numel() * x.element_size() / 4  # a chunk and its square
    assert got.dtype == acc
    exact = x.double().pow(2).sum()
    assert abs(float(got) - float(exact)) / float(exact) < (1e-12 if dtype == torch.float64 else 1e-6)


class _Largest(LiveBytes):
    """Also the size of the largest single tensor allocated while active."""

    def __init__(self):
        super().__init__(1)
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.now
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.largest = max(self.largest, self.now - before)
        return out


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", ["online", "before", "norms", "instances"])
def test_sixteen_bit_model_gets_no_float32_copy_of_a_parameter(case, backend, monkeypatch):
    """In a bfloat16 model, the products against a dense gradient (.grad, or the objective's
    aggregate before the step) convert it to float32 a block at a time: no single tensor a
    measurement allocates is larger than the largest parameter (a float32 copy of the head, or its
    float32 aggregate, was twice that), nor than the plain step's largest."""
    monkeypatch.setenv("GEFX_BACKEND", backend)
    monkeypatch.setenv("GEFX_DOT_FORM", "dense")
    monkeypatch.setattr(gefx.pieces, "_BLOCK", 2048)
    monkeypatch.setattr(gefx.ops, "_CONVERT_BLOCK", 2048)
    monkeypatch.setattr(gefx.precision, "_SQ_CHUNK_CPU", 2048)  # squared norms chunk by chunk
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    head = model.lm_head.weight.numel() * 2
    assert head == max(p.numel() * p.element_size() for p in model.parameters())
    largest = {}
    for c in ("plain", case, case):  # the second measurement counts (first-time checks done)
        model.zero_grad(set_to_none=False)
        with _Largest() as meter:
            _step(model, c)
        largest[c] = meter.largest
    assert largest[case] <= max(head, largest["plain"]), (largest, head)
