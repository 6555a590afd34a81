"""The README's open-unlearning recipe on a stand-in of its trainer package in its real shape
(tests/open_unlearning.py): the registry with transformers' own Trainer beside the unlearning
trainers, preference batches (DPO), a trainer that trains a subset of parameters and toggles
requires_grad (RMU), options given as plain functions; values against float64 autograd."""
import copy
import importlib
import re
from pathlib import Path

import pytest
import torch

import gefx
from gefx.integrations import measured
from gefx.losses import token_mean_nll
from helpers import batch, full_grad, per_sample_grads, rel_err, tiny_model

transformers = pytest.importorskip("transformers")
import open_unlearning  # noqa: E402  (needs transformers)

README = Path(__file__).resolve().parents[1] / "README.md"


def _recipe() -> str:
    """The README's lines for the end of src/trainer/__init__.py, as written there."""
    text = README.read_text()
    at = text.index("**open-unlearning**")
    return re.search(r"```python\n(.*?)```", text[at:], re.S).group(1)


@pytest.fixture
def ou():
    """open-unlearning's trainer package, the README's recipe pasted at the end of its __init__."""
    module = importlib.reload(open_unlearning)
    exec(compile(_recipe(), "src/trainer/__init__.py (the README's recipe)", "exec"), vars(module))
    return module


class Items(torch.utils.data.Dataset):
    """ForgetRetainDataset's items: {"forget": ..., "retain": ...}; with `preference`, the forget
    side is {"original": ..., "alternate": ...} as open-unlearning's DPO data gives it."""

    def __init__(self, n=2, preference=False):
        fi, fm, fl = batch(n, 8, seed=11)
        ai, am, al = batch(n, 8, seed=13)
        ri, rm, rl = batch(n, 7, seed=12)
        one = lambda i, m, l, k: {"input_ids": i[k], "attention_mask": m[k], "labels": l[k]}  # noqa: E731
        self.items = [{"forget": {"original": one(fi, fm, fl, k), "alternate": one(ai, am, al, k)} if preference
                       else one(fi, fm, fl, k), "retain": one(ri, rm, rl, k)} for k in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.items[k]


def collate(items):
    def stack(xs):
        if isinstance(xs[0], dict):
            return {k: stack([x[k] for x in xs]) for k in xs[0]}
        return torch.stack(xs)
    return stack(items)


def train(cls, base, tmp_path, preference=False, steps=2, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, remove_unused_columns=False, seed=0, max_grad_norm=1.0)
    model = copy.deepcopy(base).train()
    trainer = cls(model=model, args=args, train_dataset=Items(2, preference), data_collator=collate,
                  evaluators=None, template_args=None, **kw)
    trainer.train()
    return trainer, model


def risk_grads(model, b, params):
    """Each risk's aggregate gradient (token_mean, the mixin's default) in float64."""
    r = token_mean_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    return per_sample_grads(r, params)


def test_the_recipe_registers_a_twin_of_each_unlearning_trainer_only(ou):
    """Importing the registry with the recipe at its end works; transformers' Trainer and
    FinetuneTrainer (the plain LM loss) get no twin and stay as they were."""
    twins = {name for name in ou.TRAINER_REGISTRY if name.startswith("Measured")}
    assert twins == {"MeasuredGradAscent", "MeasuredGradDiff", "MeasuredNPO", "MeasuredDPO", "MeasuredRMU"}
    assert ou.TRAINER_REGISTRY["Trainer"] is transformers.Trainer
    assert ou.TRAINER_REGISTRY["FinetuneTrainer"] is ou.FinetuneTrainer
    assert issubclass(ou.TRAINER_REGISTRY["MeasuredNPO"], ou.NPO)
    text = README.read_text()
    lines = len([x for x in _recipe().splitlines() if x.strip()])
    assert f"add {['zero', 'one', 'two', 'three'][lines]} line" in text[text.index("**open-unlearning**"):][:200]


@pytest.mark.parametrize("cls", ["GradDiff", "NPO", "DPO"])
def test_each_trainer_and_batch_format_measured_with_both_risks(ou, cls, tmp_path):
    """Chosen by name from the registry with method_args as keywords, as load_trainer does. DPO's
    forget sub-batch is a preference pair: its forget risk is the NLL of the original (the data
    being unlearned). Step 0 against float64 per-sample autograd of the loss compute_loss returns."""
    base = tiny_model("llama", torch.float32)
    pref = cls == "DPO"
    trainer, _ = train(ou.TRAINER_REGISTRY[f"Measured{cls}"], base, tmp_path, preference=pref,
                       gefx_every=1, **({"beta": 0.5} if cls != "GradDiff" else {}))
    first = trainer.gefx_records[0][1]
    assert set(first) == {"forget", "retain"} and trainer.gefx_mode == "online"
    assert "deep" in first.groups  # the paper preset on two blocks: shallow and deep
    lines = (tmp_path / "gefx" / "g_effects.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in lines[1:]} == {cls}  # the objective: the trainer's name

    ref = copy.deepcopy(base).double().train()
    params = list(ref.parameters())
    b = collate(Items(2, pref).items)
    stub = ou.TRAINER_REGISTRY[cls].__new__(ou.TRAINER_REGISTRY[cls])
    stub.gamma, stub.alpha, stub.beta = 1.0, 1.0, 0.5
    stub.ref_model = copy.deepcopy(base).double().eval()
    g_loss = full_grad(ou.TRAINER_REGISTRY[cls].compute_loss(stub, ref, b), params)
    for name, sub in (("forget", b["forget"]["original"] if pref else b["forget"]), ("retain", b["retain"])):
        want = risk_grads(ref, sub, params) @ g_loss
        assert rel_err(first[name].per_instance.double(), want) < 1e-4, name


def test_a_preference_batch_without_a_default_is_refused_naming_the_key(ou, tmp_path):
    """A sub-batch that is neither a batch nor a preference pair: refused with the key and the
    option that picks a part of it (a dotted path, from Hydra: gefx_risks=[forget.alternate,retain])."""
    base = tiny_model("llama", torch.float32)
    cls = ou.TRAINER_REGISTRY["MeasuredDPO"]
    trainer, _ = train(cls, base, tmp_path / "a", preference=True, beta=0.5, gefx_every=1,
                       gefx_risks=["forget.alternate", "retain"])
    assert set(trainer.gefx_records[0][1]) == {"forget.alternate", "retain"}
    with pytest.raises(ValueError, match=r"'forget\.win' names no batch.*inputs\['forget'\] holds \['alternate', "
                                         r"'original'\].*gefx_risks=\['forget\.original', 'retain'\]"):
        train(cls, base, tmp_path / "b", preference=True, beta=0.5, gefx_every=1, gefx_risks=["forget.win", "retain"])


def test_partial_training_is_measured_over_the_optimizers_parameters(ou, tmp_path):
    """RMU builds its optimizer over a regex-chosen subset and then sets requires_grad on every
    parameter (so the backward fills .grad for all): the online G-effect is over the parameters
    the optimizer updates, no error names a parameter by its shape, and training is unchanged."""
    base = tiny_model("llama", torch.float32)
    plain, m_plain = train(ou.RMU, base, tmp_path / "p")
    trainer, m_meas = train(ou.TRAINER_REGISTRY["MeasuredRMU"], base, tmp_path / "m", gefx_every=1)
    assert trainer.gefx_mode == "online"
    assert all(torch.equal(p, q) for p, q in zip(m_plain.parameters(), m_meas.parameters()))

    ref = copy.deepcopy(base).double().train()
    names = [n for n, _ in ref.named_parameters()]
    trained = [k for k, n in enumerate(names) if re.fullmatch(r"model\.layers\.1\.mlp\.down_proj\.weight", n)]
    params = list(ref.parameters())
    stub = ou.RMU.__new__(ou.RMU)
    stub.gamma, stub.alpha, stub.steering_coeff, stub.control_vec = 1.0, 1.0, 20, None
    stub.model_module = ref.model.layers[1]
    b = collate(Items(2).items)
    g = [full_grad(ou.RMU.compute_loss(stub, ref, b), [params[k]]) for k in trained]
    for name in ("forget", "retain"):
        G = [risk_grads(ref, b[name], [params[k]]) for k in trained]
        want = sum(Gk @ gk for Gk, gk in zip(G, g))
        assert rel_err(trainer.gefx_records[0][1][name].per_instance.double(), want) < 1e-4, name


@pytest.mark.parametrize("how", ["measured", "class attribute", "constructor"])
def test_options_taking_callables_accept_plain_functions(ou, how, tmp_path):
    """risk= and groups= as a lambda or a plain function: a keyword of measured(), a class
    attribute, or a gefx_<option>= keyword of the constructor."""
    risk = lambda model, b: token_mean_nll(model(input_ids=b["input_ids"]).logits, b["labels"])  # noqa: E731

    def groups(name):
        return "embed" if "embed" in name else "rest"

    base = tiny_model("llama", torch.float32)
    if how == "measured":
        cls, kw = measured(ou.GradDiff, risk=risk, groups=groups, every=1), {}
    elif how == "class attribute":
        cls = type("M", (gefx.integrations.GEffectMixin, ou.GradDiff),
                   {"gefx_risk": risk, "gefx_groups": groups, "gefx_every": 1})
        kw = {}
    else:
        cls, kw = measured(ou.GradDiff, every=1), {"gefx_risk": risk, "gefx_groups": groups}
    trainer, _ = train(cls, base, tmp_path, **kw)
    assert trainer.gefx_records[0][1].groups == ["embed", "rest"]


def test_a_gradient_of_an_uncounted_parameter_is_refused_by_name():
    """g_effect against a gradient mapping that holds a parameter the trace does not count (a
    partial-training loop passing every .grad): refused naming the parameter, not its shape."""
    model = tiny_model("llama", torch.float64)
    ids, mask, labels = batch(2, 6, seed=3)
    down = model.model.layers[1].mlp.down_proj.weight
    with gefx.trace(model, params=[down]) as tape:
        r = token_mean_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        grads = {p: torch.ones_like(p) for p in model.parameters()}
        with pytest.raises(ValueError, match=r"does not count: `model\.embed_tokens\.weight` \(a gradient for it"):
            gefx.g_effect(tape, grads, {"r": r})
