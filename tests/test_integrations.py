"""The Trainer mixin with transformers' real Trainer, and the plain-loop recipe."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import gefx
from gefx.integrations import GEffectMixin, Recorder, measured
from gefx.losses import sequence_nll, token_mean_nll
from helpers import batch, full_grad, rel_err, tiny_model

transformers = pytest.importorskip("transformers")


# -- stand-in trainers following open-unlearning's compute_loss contract ------------------------
class GradAscent(transformers.Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        f = inputs["forget"]
        out = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"], labels=f["labels"])
        return (-out.loss, out) if return_outputs else -out.loss


class GradDiff(transformers.Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        f, r = inputs["forget"], inputs["retain"]
        out_f = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"], labels=f["labels"])
        out_r = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"])
        loss = -out_f.loss + 1.0 * out_r.loss
        return (loss, out_f) if return_outputs else loss


class NPO(transformers.Trainer):
    def __init__(self, *args, ref_model=None, beta=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model, self.beta = ref_model, beta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        f = inputs["forget"]
        out = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"])
        cur = sequence_nll(out.logits, f["labels"])
        with torch.no_grad():
            ref = sequence_nll(self.ref_model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits, f["labels"])
        loss = -F.logsigmoid(self.beta * (cur - ref)).mean() * 2 / self.beta
        return (loss, out) if return_outputs else loss


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=2):
        fi, fm, fl = batch(n, 8, seed=11)
        ri, rm, rl = batch(n, 7, seed=12)
        self.items = [{"forget": {"input_ids": fi[k], "attention_mask": fm[k], "labels": fl[k]},
                       "retain": {"input_ids": ri[k], "attention_mask": rm[k], "labels": rl[k]}} for k in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.items[k]


def collate(items):
    return {side: {key: torch.stack([it[side][key] for it in items]) for key in items[0][side]}
            for side in ("forget", "retain")}


def run(trainer_cls, base, tmp_path, measured: bool, accumulation=1, bf16=False, **extra):
    model = copy.deepcopy(base).train()
    cls = type("Measured" + trainer_cls.__name__, (GEffectMixin, trainer_cls), {"gefx_every": 1}) if measured else trainer_cls
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("m" if measured else "p")), per_device_train_batch_size=2, max_steps=3,
        learning_rate=1e-2, gradient_accumulation_steps=accumulation, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
        max_grad_norm=1.0, bf16=bf16)
    trainer = cls(model=model, args=args, train_dataset=Pairs(2 * accumulation), data_collator=collate, **extra)
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("trainer_cls", [GradAscent, GradDiff, NPO])
def test_trainer_training_unchanged_and_measured(trainer_cls, tmp_path):
    base = tiny_model("llama", torch.float32)
    extra = {"ref_model": copy.deepcopy(base).eval()} if trainer_cls is NPO else {}
    plain, m_plain = run(trainer_cls, base, tmp_path, measured=False, **extra)
    measured, m_meas = run(trainer_cls, base, tmp_path, measured=True, **extra)
    for (n, p), q in zip(m_plain.named_parameters(), m_meas.parameters()):
        assert torch.equal(p, q), n
    steps = [s for s, _ in measured.gefx_records]
    assert steps == [0, 1, 2]
    first = measured.gefx_records[0][1]
    assert set(first) == {"forget", "retain"} and first.groups[0] == "embed"
    logged = [k for entry in measured.state.log_history for k in entry if k.startswith("gefx/")]
    assert "gefx/forget/total" in logged and "gefx/retain/shallow" in logged
    assert all("loss" in entry for entry in measured.state.log_history if "gefx/forget/total" in entry)
    measured.gefx_save(tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "g_effects.json").read_text())["g_effects"]
    assert len(rows) == 3 * 2 * (len(first.groups) + 1)
    assert (tmp_path / "out" / "g_effects.png").stat().st_size > 10_000

    assert measured.gefx_mode == "online"
    # step 0 against brute force on the initial weights (the only batch is the whole data set)
    expected = brute_force(trainer_cls, base, collate(Pairs(2).items), extra)
    for name in ("forget", "retain"):
        assert rel_err(torch.tensor(first[name].total, dtype=torch.float64), expected[name]) < 1e-4


def brute_force(trainer_cls, base, b, extra, risk=token_mean_nll):
    """<grad risk, grad loss> in float64 for compute_loss's loss on batch b, per risk."""
    model = copy.deepcopy(base).double().train()
    params = list(model.parameters())
    inner = trainer_cls.compute_loss(
        type("T", (), {"ref_model": extra.get("ref_model") and extra["ref_model"].double(), "beta": 0.5})(),
        model, b) if trainer_cls is NPO else trainer_cls.compute_loss(None, model, b)
    g_obj = full_grad(inner, params)
    out = {}
    for name in ("forget", "retain"):
        s = b[name]
        r = risk(model(input_ids=s["input_ids"], attention_mask=s["attention_mask"]).logits, s["labels"])
        out[name] = full_grad(r.sum(), params) @ g_obj
    return out


def test_wrong_order_and_missing_compute_loss_fail_at_class_creation():
    with pytest.raises(TypeError, match=r"GEffectMixin must come before NPO.*class Bad\(GEffectMixin, NPO\)"):
        type("Bad", (NPO, GEffectMixin), {})
    with pytest.raises(TypeError, match="must implement the unlearning method in compute_loss"):
        type("Plain", (GEffectMixin, transformers.Trainer), {})
    with pytest.raises(TypeError, match="unknown options"):
        measured(NPO, evry=3)
    assert measured(every=2)(NPO).gefx_every == 2 and measured(NPO).__name__ == "MeasuredNPO"


def test_online_with_accumulation_is_the_backpropagated_share(tmp_path):
    """With k accumulated micro-batches the Trainer backpropagates loss / k: the online value is
    that share, the before-the-step value (gefx_online=False) the loss's; the risk may be a callable."""
    base = tiny_model("llama", torch.float32)
    risk = lambda model, b: token_mean_nll(model(input_ids=b["input_ids"]).logits, b["labels"])  # noqa: E731
    on, m_on = run(GradDiff, base, tmp_path, measured=True, accumulation=2, gefx_risk=risk)
    off, m_off = run(GradDiff, base, tmp_path, measured=True, accumulation=2, gefx_risk=risk, gefx_online=False)
    assert on.gefx_mode == "online" and off.gefx_mode == "before the step (gefx_online=False)"
    for name in ("forget", "retain"):
        a, b = on.gefx_records[0][1][name].total, off.gefx_records[0][1][name].total
        assert abs(2 * a - b) <= 1e-4 * abs(b)
    assert all(torch.equal(p, q) for p, q in zip(m_on.parameters(), m_off.parameters()))


def test_trainer_with_gradient_accumulation_and_probes(tmp_path):
    base = tiny_model("llama", torch.float32)
    ids, mask, labels = batch(3, 6, seed=21)
    cls = type("Probed", (GEffectMixin, GradAscent), {"gefx_every": 2, "gefx_probes": {
        "holdout": {"input_ids": ids, "attention_mask": mask, "labels": labels}}})
    model = copy.deepcopy(base).train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True,
        remove_unused_columns=False, seed=0)
    trainer = cls(model=model, args=args, train_dataset=Pairs(4), data_collator=collate)
    trainer.train()
    assert [s for s, _ in trainer.gefx_records] == [0, 2]  # once per measured optimizer step
    assert trainer.gefx_records[0][1]["holdout"].per_instance.shape == (3,)


def test_plain_loop_recipe(tmp_path):
    """The README's plain-loop recipe: measure every other step, training unaffected."""
    base = tiny_model("qwen2", torch.float32)
    fi, fm, fl = batch(3, 8, seed=31)
    ri, rm, rl = batch(2, 8, seed=32)
    finals = []
    for measure in (False, True):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        rec = Recorder()
        for step in range(4):
            with gefx.trace(model, params=opt) as tape:
                nll_f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
                nll_r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
                objective = -nll_f / len(nll_f)                 # GA on the mean forget risk
                if measure and step % 2 == 0:
                    rec.add(step, gefx.g_effect(tape, objective, {"forget": nll_f, "retain": nll_r}), objective="ga")
                objective.sum().backward()
            opt.step()
            opt.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    assert [r.step for r in rec.records] == [0, 2]
    assert rec.records[0].effects["forget"].total < 0  # gradient ascent raises the forget risk
    rec.save(tmp_path)
    header = (tmp_path / "g_effects.csv").read_text().splitlines()[0]
    assert header == "objective,step,risk,group,value"
    assert (tmp_path / "g_effects.png").exists()


def test_token_mean_risk_matches_reference_scaling():
    """token_mean_nll is the HF loss split per sample: its G-effect is the model.loss one."""
    model = tiny_model("llama", torch.float64)
    ids, mask, labels = batch(3, 7, seed=41)
    params = list(model.parameters())
    with gefx.trace(model) as tape:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        risk = token_mean_nll(out.logits, labels)
        eff = gefx.g_effect(tape, -out.loss, {"forget": risk})
        g_loss, g_risk = full_grad(out.loss, params), full_grad(risk.sum(), params)
    assert rel_err(torch.tensor(eff["forget"].total, dtype=torch.float64), -(g_risk @ g_loss)) < 1e-9
    assert rel_err(g_risk, g_loss) < 1e-6  # the same gradient (HF computes its loss in float32)


def test_bf16_mixed_precision_stays_online_and_training_unchanged(tmp_path):
    """bf16 autocast (accelerate's mixed precision, no loss scaler): .grad is the float32 master
    gradient of the loss, so the mixin stays online; the value is the before-the-step one (both
    under the same autocast) to bf16 precision, and training is bit-identical with and without it."""
    base = tiny_model("llama", torch.float32)
    plain, m_plain = run(GradDiff, base, tmp_path, measured=False, bf16=True)
    on, m_on = run(GradDiff, base, tmp_path, measured=True, bf16=True)
    off, _ = run(GradDiff, base, tmp_path, measured=True, bf16=True, gefx_online=False)
    assert on.accelerator.mixed_precision == "bf16" and on.gefx_mode == "online"
    assert all(torch.equal(p, q) for p, q in zip(m_plain.parameters(), m_on.parameters()))
    for name in ("forget", "retain"):
        a, b = on.gefx_records[0][1][name].total, off.gefx_records[0][1][name].total
        assert abs(a - b) <= 2e-2 * abs(b), (name, a, b)
