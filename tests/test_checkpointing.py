"""Gradient checkpointing under gefx.trace (gefx/checkpointing.py): exact against brute-force
per-sample autograd in float64 and equal to the same model without checkpointing, or refused by
name with .grad untouched.

* Hugging Face families (Llama, GPT-2, Qwen2; tiny configs; train mode with and without dropout;
  and Doge, whose checkpointed layers have parameters of their own, handled by the generic rule)
  with ``gradient_checkpointing_enable()``, use_reentrant False and True: grad_dots (pairwise,
  norms, against a scalar), g_effect before the step, online (backward=True) and prepare/against
  after a backward run outside the trace (as the Trainer does);
* torch.utils.checkpoint.checkpoint in user code (both variants, nested, a reentrant segment whose
  inputs need no gradient, a checkpoint inside a module that gefx's generic rule re-runs);
* the training step's .grad is bit-identical to the untraced checkpointed step's (float32);
* the Trainer mixin with TrainingArguments(gradient_checkpointing=True);
* refusals: context_fn (selective checkpointing), preserve_rng_state=False with dropout, a reentrant
  checkpoint nested in another segment, a batch-shared position embedding inside a segment.
"""
import copy
import functools
import inspect
import warnings

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch.utils.checkpoint import checkpoint

import gefx
import zoo
from gefx.losses import sequence_nll
from helpers import per_sample_grads, rel_err

TOL = 1e-9  # float64, as tests/test_engine.py
# per-objective-instance effects (opt-in where g_effect has objective_instances)
PG = {"objective_instances": True} if "objective_instances" in inspect.signature(gefx.g_effect).parameters else {}
FAMILIES = ("llama", "gpt2", "qwen2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (OpenMP's spin-waits cost more than they give at these
    sizes, and far more when other processes load the cores: 15 s instead of minutes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _enable(model, reentrant, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradient_checkpointing_enable is a deprecated alias in transformers 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant, **extra})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    return model


def _nll(model, b):
    return sequence_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])


def _flat(params):
    return torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None else p.grad.double().flatten()
                      for p in params])


def _patches_off():
    assert "apply" not in vars(cp.CheckpointFunction)
    assert cp._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"


def _measure(model, fb, rb, oracle: bool):
    """Every quantity from one traced forward per batch (dropout masks fixed by the seed), and with
    `oracle` the float64 per-sample gradients of the same forward."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    torch.manual_seed(0)
    with gefx.trace(model) as tape:
        f, r = _nll(model, fb), _nll(model, rb)
        w = torch.linspace(0.5, 1.5, f.shape[0], dtype=f.dtype)
        objective = -(w * f)
        risks = {"forget": f, "retain": r}
        recorded = [*tape.calls, *tape.hosts]
        # outputs kept as stand-ins (shape only): the linear layers' inside checkpointed segments
        out["stand_ins"] = sorted({c.name for c in tape.calls for o in c.outputs
                                   if o.numel() > 1 and o.untyped_storage().nbytes() == o.element_size()})
        out["pair"] = gefx.grad_dots(tape, f, r).total
        out["norms"] = gefx.grad_dots(tape, f).total
        out["vs_scalar"] = gefx.grad_dots(tape, f, r.sum()).total
        eff = gefx.g_effect(tape, objective, risks, **PG)
        out["forget"], out["retain"] = eff["forget"].per_instance, eff["retain"].per_instance
        out["objective"] = eff["retain"].per_objective_instance
        prepared = gefx.prepare(tape, risks)
        if oracle:
            Gf, Gr, Go = (per_sample_grads(x, params) for x in (f, r, objective))
        on = gefx.g_effect(tape, objective, risks, backward=True, **PG)
        out["online_forget"], out["online_retain"] = on["forget"].per_instance, on["retain"].per_instance
        out["online_objective"] = on["retain"].per_objective_instance
        out["step"] = _flat(params)
        for p in params:
            p.grad = None
        loss = (objective.sum() + 0.5 * r.sum())
        # the recomputes inside every backward above recorded nothing
        assert [*tape.calls, *tape.hosts] == recorded and not tape._before
    loss.backward()  # after the trace, as a Trainer's backward (recomputes with the hooks gone)
    ag = prepared.against({p: p.grad for p in params})
    out["against_forget"], out["against_retain"] = ag["forget"].per_instance, ag["retain"].per_instance
    out["step2"] = _flat(params)
    _patches_off()
    if not oracle:
        return out, None
    o = Go.sum(0)
    step2 = Go.sum(0) + 0.5 * Gr.sum(0)
    ref = {"pair": Gf @ Gr.T, "norms": (Gf * Gf).sum(1), "vs_scalar": Gf @ Gr.sum(0), "forget": Gf @ o,
           "retain": Gr @ o, "objective": Go @ Gr.sum(0), "online_forget": Gf @ o, "online_retain": Gr @ o,
           "online_objective": Go @ Gr.sum(0), "step": o, "against_forget": Gf @ step2,
           "against_retain": Gr @ step2, "step2": step2}
    return out, ref


_PLAIN: dict = {}


def _plain(family, dropout):
    """The same model and batches without checkpointing: gefx's values and the oracle's."""
    if (family, dropout) not in _PLAIN:
        model = zoo.build(family, dtype=torch.float64, dropout=dropout).train()
        fb, rb = zoo.batch(model, b=3, t=8, seed=1), zoo.batch(model, b=2, t=6, seed=2)
        _PLAIN[family, dropout] = (model, fb, rb, *_measure(model, fb, rb, oracle=True))
    return _PLAIN[family, dropout]


# and Doge, whose checkpointed decoder layer has parameters of its own: the generic rule re-runs
# the layer, checkpoint included (plainly: gefx.checkpointing.plain)
CASES = [(f, d) for f in FAMILIES for d in (0.0, 0.1)] + [("doge", 0.1)]


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("family,dropout", CASES, ids=[f"{f}-{'train_dropout' if d else 'train'}" for f, d in CASES])
def test_hf_gradient_checkpointing_exact(family, dropout, reentrant):
    base, fb, rb, plain, ref = _plain(family, dropout)
    model = _enable(copy.deepcopy(base), reentrant)
    got, _ = _measure(model, fb, rb, oracle=False)
    # the outputs of the linear layers inside the checkpointed blocks are kept as stand-ins (views
    # keep their value: Qwen2's biased q/k/v, GPT-2's Conv1D)
    assert plain["stand_ins"] == []
    inside = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n)
    assert set(got["stand_ins"]) <= set(inside)
    if family == "llama":
        assert got["stand_ins"] == inside and inside
    for key, want in ref.items():
        # the online forget risk reuses the step's gradients (gefx/step.py); Llama/Qwen2's RMSNorm
        # computes in float32 even for float64 inputs, so that agrees to float32 roundoff, as in
        # tests/test_step.py (GPT-2, float64 throughout, to float64 roundoff)
        tol = 1e-6 if key == "online_forget" and family != "gpt2" else TOL
        assert rel_err(plain[key], want) < tol, ("no checkpointing vs oracle", key)
        assert rel_err(got[key], want) < tol, ("checkpointing vs oracle", key)
        assert rel_err(got[key], plain[key]) < TOL, ("checkpointing vs none", key)


# -- user code: torch.utils.checkpoint.checkpoint in a plain module -----------------------------
class Block(nn.Module):
    def __init__(self, d, p):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, h):
        return h + self.down(self.drop(torch.tanh(self.up(self.norm(h)))))


class Mixer(nn.Module):
    """No rule of its own (a parameter used functionally): the generic rule re-runs it, checkpoint included."""

    def __init__(self, d, p, how):
        super().__init__()
        self.w, self.drop, self.how = nn.Parameter(torch.randn(d, d) / d ** 0.5), nn.Dropout(p), how

    def inner(self, h):
        return h + self.drop(torch.tanh(h @ self.w))

    def forward(self, h):
        return self.inner(h) if self.how is None else checkpoint(self.inner, h, use_reentrant=self.how)


class Net(nn.Module):
    """how: None (no checkpointing), False / True (use_reentrant). `frozen_input`: the first segment
    takes the raw input (no gradient), so under reentrant checkpointing its parameters get none."""

    def __init__(self, how, nested=None, frozen_input=False, d=8, p=0.2):
        super().__init__()
        self.first = Block(d, p)
        self.inp = nn.Linear(5, d)
        self.blocks = nn.ModuleList([Block(d, p) for _ in range(3)])
        self.mixer = Mixer(d, p, how)
        self.head = nn.Linear(d, 3)
        self.how, self.nested, self.frozen_input = how, nested, frozen_input

    def ck(self, fn, h, how):
        return fn(h) if how is None else checkpoint(fn, h, use_reentrant=how)

    def segment(self, h):
        h = self.blocks[1](h)
        return self.ck(self.blocks[2], h, self.nested)

    def forward(self, x):
        x = torch.nn.functional.pad(x, (0, 3))
        if self.frozen_input:  # reentrant: no input requires grad, so `first` gets no gradient
            x = self.ck(self.first, x, self.how)
            if self.how is True:
                x = x.detach()
        h = self.inp(x[..., :5])
        h = self.ck(self.blocks[0], h, self.how)
        h = self.ck(self.segment, h, self.how)
        return self.head(self.mixer(h))


def _user_run(model, x, y, oracle=False):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    with gefx.trace(model) as tape:
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        out = {"norms": gefx.grad_dots(tape, loss).total, "pair": gefx.grad_dots(tape, loss, loss).total}
        if oracle:
            G = per_sample_grads(loss, params)
        out["online"] = gefx.g_effect(tape, loss, {"l": loss}, backward=True)["l"].per_instance
        out["grad"] = _flat(params)
    _patches_off()
    if not oracle:
        return out, None
    return out, {"norms": (G * G).sum(1), "pair": G @ G.T, "online": G @ G.sum(0), "grad": G.sum(0)}


@pytest.mark.parametrize("frozen_input", [False, True], ids=["free_input", "frozen_input"])
@pytest.mark.parametrize("nested", [None, False], ids=["flat", "nested"])
@pytest.mark.parametrize("how", [False, True], ids=["nonreentrant", "reentrant"])
def test_user_checkpoint_exact(how, nested, frozen_input):
    torch.manual_seed(1)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    plain = Net(None, frozen_input=frozen_input).double().train()
    model = Net(how, nested=nested, frozen_input=frozen_input).double().train()
    model.load_state_dict(plain.state_dict())
    if how is True and frozen_input:  # the reentrant pitfall, kept: `first` gets no gradient at all
        plain.first.requires_grad_(False)
        model.first.requires_grad_(False)
    want, ref = _user_run(plain, x, y, oracle=True)
    got, _ = _user_run(model, x, y)
    for key in ref:
        assert rel_err(want[key], ref[key]) < TOL, key
        assert rel_err(got[key], ref[key]) < TOL, key


def test_reentrant_segment_without_input_gradient_stays_reentrant():
    """Its parameters get no gradient in training (torch's reentrant pitfall): gefx counts none either."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    model = Net(True, frozen_input=True).double().train()
    model.first.requires_grad_(True)
    with gefx.trace(model) as tape:
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        norms = gefx.grad_dots(tape, loss, groups="param").per_group
        loss.sum().backward()
    assert all(p.grad is None for p in model.first.parameters())
    assert all(float(norms[n].abs().max()) == 0 for n in norms if n.startswith("first."))
    assert all(float(norms[n].abs().max()) > 0 for n in norms if n.startswith("blocks."))


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_lora_with_gradient_checkpointing(reentrant):
    """PEFT LoRA adapters (lora_dropout, train mode) in checkpointed layers: the frozen embedding's
    output is made to require grad (transformers' enable_input_require_grads), so even reentrant
    segments are differentiated."""
    peft = pytest.importorskip("peft", reason="peft is a test extra (pip install -e '.[test]')")
    base = zoo.build("llama", dtype=torch.float64)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)
    torch.manual_seed(1)
    plain = peft.get_peft_model(base, cfg).train()
    model = copy.deepcopy(plain)
    _enable(model, reentrant)
    fb, rb = zoo.batch(base, b=3, t=8, seed=1), zoo.batch(base, b=2, t=6, seed=2)
    results = []
    for m in (plain, model):
        params = [p for p in m.parameters() if p.requires_grad]
        torch.manual_seed(0)
        with gefx.trace(m) as tape:
            f, r = _nll(m, fb), _nll(m, rb)
            pair = gefx.grad_dots(tape, f, r).total
            on = gefx.g_effect(tape, -f, {"retain": r}, backward=True)["retain"].per_instance
            Gf, Gr = per_sample_grads(f, params), per_sample_grads(r, params)
        assert rel_err(pair, Gf @ Gr.T) < TOL
        assert rel_err(on, -(Gr @ Gf.sum(0))) < TOL
        results.append((pair, on))
    assert all(rel_err(a, b) < TOL for a, b in zip(*results))


# -- the training step is unchanged --------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_step_grad_bit_identical(family, reentrant):
    """float32, dropout: .grad after the user's backward (inside the trace, after it) and after the
    online step equals the untraced checkpointed step's, bit for bit."""
    base = _enable(zoo.build(family, dtype=torch.float32, dropout=0.1).train(), reentrant)
    fb, rb = zoo.batch(base, b=3, t=8, seed=1), zoo.batch(base, b=2, t=6, seed=2)

    def step(mode):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        if mode == "untraced":
            f, r = _nll(model, fb), _nll(model, rb)
            (-f.sum() + r.sum()).backward()
        else:
            with gefx.trace(model) as tape:
                f, r = _nll(model, fb), _nll(model, rb)
                loss = -f.sum() + r.sum()
                if mode == "online":
                    gefx.g_effect(tape, loss, {"forget": f, "retain": r}, backward=True)
                elif mode == "before":
                    gefx.g_effect(tape, loss, {"forget": f, "retain": r})
                    assert all(p.grad is None for p in model.parameters())
                    loss.backward()
                else:
                    gefx.prepare(tape, {"forget": f, "retain": r})
            if mode == "after":
                loss.backward()
        return [p.grad for p in model.parameters()]

    want = step("untraced")
    for mode in ("online", "before", "after"):
        got = step(mode)
        assert all(torch.equal(a, b) for a, b in zip(want, got)), mode


# -- the Trainer mixin ------------------------------------------------------------------------------
def test_trainer_mixin_with_gradient_checkpointing(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gefx.integrations import measured

    class GradDiff(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            f, r = inputs["forget"], inputs["retain"]
            loss = -model(**f).loss + model(**r).loss
            return (loss, None) if return_outputs else loss

    base = zoo.build("llama", dtype=torch.float64, dropout=0.1)
    fb, rb = zoo.batch(base, b=4, t=8, seed=11), zoo.batch(base, b=4, t=7, seed=12)
    items = [{"forget": {k: v[i] for k, v in fb.items()}, "retain": {k: v[i] for k, v in rb.items()}} for i in range(4)]

    def collate(xs):
        return {s: {k: torch.stack([x[s][k] for x in xs]) for k in xs[0][s]} for s in ("forget", "retain")}

    def run(ckpt, measure, reentrant=False):
        model = copy.deepcopy(base).train()
        extra = {"gradient_checkpointing": True,
                 "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}} if ckpt else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = transformers.TrainingArguments(
                output_dir=str(tmp_path / f"{ckpt}{measure}{reentrant}"), per_device_train_batch_size=2,
                max_steps=2, learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                remove_unused_columns=False, dataloader_num_workers=0, seed=0, max_grad_norm=1.0, **extra)
            cls = measured(GradDiff, every=1, out=None) if measure else GradDiff
            trainer = cls(model=model, args=args, train_dataset=items, data_collator=collate)
            trainer.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == ckpt
        return trainer, model

    plain, _ = run(False, True)
    assert plain.gefx_mode == "online"
    for reentrant in (False, True):
        unmeasured, m_plain = run(True, False, reentrant)
        trainer, m_meas = run(True, True, reentrant)
        assert trainer.gefx_mode == "online"
        for p, q in zip(m_plain.parameters(), m_meas.parameters()):
            assert torch.equal(p, q)  # training unchanged by the measurement
        assert len(trainer.gefx_records) == len(plain.gefx_records) == 2
        for (s0, a), (s1, b) in zip(plain.gefx_records, trainer.gefx_records):
            assert s0 == s1
            for risk in ("forget", "retain"):
                assert rel_err(b[risk].per_instance_group, a[risk].per_instance_group) < TOL, (reentrant, s0, risk)
        _patches_off()


# -- refusals --------------------------------------------------------------------------------------
def test_selective_checkpointing_refused_by_name():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    model = zoo.build("llama", dtype=torch.float64).train()
    _enable(model, False, context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
    b = zoo.batch(model, b=2, t=6, seed=1)
    with pytest.raises(gefx.Refused, match=r"`model\.layers\.0` \(LlamaDecoderLayer\) has a context_fn.*"
                                           r"without context_fn") as exc:
        with gefx.trace(model) as tape:
            f = _nll(model, b)
            gefx.g_effect(tape, f.sum(), {"f": f}, backward=True)
    assert "model.layers.0.self_attn.q_proj.weight" in exc.value.names
    assert all(p.grad is None for p in model.parameters())
    _patches_off()
    _nll(model, b).sum().backward()  # the user's own step still runs outside a trace


def test_unpreserved_rng_with_dropout_refused_by_name():
    class Seg(nn.Module):
        def __init__(self, preserve, p):
            super().__init__()
            self.block, self.head, self.preserve = Block(8, p), nn.Linear(8, 3), preserve

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=False, preserve_rng_state=self.preserve))

    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    model = Seg(False, 0.2).double().train()
    with pytest.raises(gefx.Refused, match=r"`block` \(Block\) draws random numbers.*preserve_rng_state=False"
                                           r".*keep preserve_rng_state=True"):
        with gefx.trace(model) as tape:
            out = model(x).sum(1)
            gefx.grad_dots(tape, out)
    assert all(p.grad is None for p in model.parameters())
    _patches_off()
    for preserve, p in ((False, 0.0), (True, 0.2)):  # no random numbers, or the state preserved: exact
        model = Seg(preserve, p).double().train()
        torch.manual_seed(0)
        with gefx.trace(model) as tape:
            out = model(x).sum(1)
            norms = gefx.grad_dots(tape, out).total
            G = per_sample_grads(out, list(model.parameters()))
        assert rel_err(norms, (G * G).sum(1)) < TOL


def test_nested_reentrant_checkpoint_refused_by_name():
    torch.manual_seed(1)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    for outer in (False, True):
        model = Net(outer, nested=True).double().train()
        with pytest.raises(gefx.Refused, match=r"`blocks\.2` \(Block\) is a reentrant checkpoint .* nested.*"
                                               r"use use_reentrant=False for the inner"):
            with gefx.trace(model) as tape:
                loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
                gefx.grad_dots(tape, loss)
        assert all(p.grad is None for p in model.parameters())
        _patches_off()


def test_batch_shared_position_embedding_inside_a_segment_refused_by_name():
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(11, 8), nn.Embedding(6, 8), nn.Linear(8, 3)

        def embed(self, ids):
            return self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])

        def forward(self, ids):
            return self.head(checkpoint(self.embed, ids, use_reentrant=False))

    model = Pos().double().train()
    ids = torch.randint(0, 11, (3, 6))
    with pytest.raises(gefx.Refused, match=r"pos \(Embedding\) is looked up once for the whole batch .* "
                                           r"inside a checkpointed segment"):
        with gefx.trace(model) as tape:
            out = model(ids).sum((1, 2))
            gefx.grad_dots(tape, out)
    assert all(p.grad is None for p in model.parameters())
    _patches_off()


def test_patches_restored_on_error_and_checkpoint_untouched_outside():
    model = Net(True).double().train()
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="boom"):
        with gefx.trace(model):
            assert "apply" in vars(cp.CheckpointFunction)
            raise RuntimeError("boom")
    _patches_off()
    with gefx.trace(model), gefx.trace(model.blocks[0]):  # nested traces: installed once, removed by the last
        pass
    _patches_off()
    model(x).sum().backward()  # reentrant again outside a trace
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        torch.autograd.grad(model(x).sum(), [model.inp.weight])


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gefx_check_with_checkpointing(reentrant):
    """gefx.check's own oracle differentiates per sample through the checkpoints too."""
    model = _enable(zoo.build("gpt2", dtype=torch.float32, dropout=0.1), reentrant)
    report = gefx.check(model, modes=("train",))
    assert report.ok and all(r.status == "exact" for r in report.rows), str(report)
    _patches_off()
