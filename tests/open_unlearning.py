"""A stand-in of open-unlearning's trainer package (locuslab/open-unlearning, src/trainer), in its
real shape: its registry holds transformers' own ``Trainer`` and ``FinetuneTrainer`` (the plain LM
loss) beside the unlearning trainers; ``UnlearnTrainer`` subclasses ``FinetuneTrainer``;
``GradDiff`` carries the retain loss and the reference model; NPO and DPO go through
``compute_dpo_loss``; DPO's forget sub-batch is a preference pair ``{"original": {...},
"alternate": {...}}``; RMU trains a regex-chosen subset of parameters by building its optimizer
over them and then setting ``requires_grad`` back on for every parameter. open-unlearning is not on
the package index: these are written after its source (read with the project's ``fetch``), trimmed
to what the contract needs. One difference: ``compute_loss`` accepts ``num_items_in_batch``, which
transformers 5.x passes (open-unlearning pins 4.45, whose Trainer does not).
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
import transformers

TRAINER_REGISTRY: dict = {}


def _register_trainer(trainer_class):
    TRAINER_REGISTRY[trainer_class.__name__] = trainer_class


class FinetuneTrainer(transformers.Trainer):
    def __init__(self, evaluators=None, template_args=None, *args, **kwargs):
        self.evaluators, self.template_args = evaluators, template_args
        super().__init__(*args, **kwargs)


class UnlearnTrainer(FinetuneTrainer):
    pass


def compute_batch_nll(model, inputs):
    outputs = model(**inputs)
    labels = inputs["labels"][..., 1:].contiguous()
    logits = outputs.logits[..., :-1, :].contiguous()
    return F.cross_entropy(logits.transpose(-1, -2), labels, ignore_index=-100, reduction="none").sum(-1), outputs


def compute_dpo_loss(model, ref_model, win_inputs=None, lose_inputs=None, beta=1.0):
    win_log_ratio, lose_log_ratio, win_outputs, lose_outputs = 0.0, 0.0, None, None
    if win_inputs is not None:
        win_loss, win_outputs = compute_batch_nll(model, win_inputs)
        with torch.no_grad():
            win_ref_loss, _ = compute_batch_nll(ref_model, win_inputs)
        win_log_ratio = -(win_loss - win_ref_loss)
    if lose_inputs is not None:
        lose_loss, lose_outputs = compute_batch_nll(model, lose_inputs)
        with torch.no_grad():
            lose_ref_loss, _ = compute_batch_nll(ref_model, lose_inputs)
        lose_log_ratio = -(lose_loss - lose_ref_loss)
    loss = -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()
    return loss, (win_outputs, lose_outputs)


def _plain(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


class GradAscent(UnlearnTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**_plain(inputs["forget"]))
        loss = -outputs.loss
        return (loss, outputs) if return_outputs else loss


class GradDiff(UnlearnTrainer):
    def __init__(self, gamma=1.0, alpha=1.0, retain_loss_type="NLL", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.alpha, self.retain_loss_type = gamma, alpha, retain_loss_type
        self.ref_model = None

    def _prepare_ref_model(self, model):
        return copy.deepcopy(model).eval()

    def _with_reference(self, beta):  # NPO's and DPO's __init__ (written out in each there)
        self.beta = beta
        if self.ref_model is None:
            self.ref_model = self._prepare_ref_model(self.model)

    def compute_retain_loss(self, model, retain_inputs):
        return model(**retain_inputs).loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget_outputs = model(**_plain(inputs["forget"]))
        loss = self.gamma * -forget_outputs.loss + self.alpha * self.compute_retain_loss(model, _plain(inputs["retain"]))
        return (loss, forget_outputs) if return_outputs else loss


class NPO(GradDiff):
    def __init__(self, beta=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._with_reference(beta)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget_loss, forget_outputs = compute_dpo_loss(model, self.ref_model, None, inputs["forget"], self.beta)
        loss = self.gamma * forget_loss + self.alpha * self.compute_retain_loss(model, _plain(inputs["retain"]))
        return (loss, forget_outputs) if return_outputs else loss


class DPO(GradDiff):
    def __init__(self, beta=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._with_reference(beta)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget_loss, forget_outputs = compute_dpo_loss(model, self.ref_model, win_inputs=inputs["forget"]["alternate"],
                                                       lose_inputs=inputs["forget"]["original"], beta=self.beta)
        loss = self.gamma * forget_loss + self.alpha * self.compute_retain_loss(model, _plain(inputs["retain"]))
        return (loss, forget_outputs) if return_outputs else loss


class RMU(GradDiff):
    """Trains the parameters matching `trainable_params_regex` only: its optimizer holds those, and
    every parameter has requires_grad again afterwards (so .grad exists for all of them)."""

    def __init__(self, module_regex=r"model\.layers\.1", trainable_params_regex=(r"model\.layers\.1\.mlp\.down_proj\.weight",),
                 steering_coeff=20, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.ref_model is None:
            self.ref_model = self._prepare_ref_model(self.model)
        self.trainable_params_regex = list(trainable_params_regex)
        self.module_regex, self.steering_coeff, self.control_vec = module_regex, steering_coeff, None
        self.model_module = next(m for n, m in self.model.named_modules() if re.fullmatch(module_regex, n))

    def create_optimizer(self):
        for p in self.model.parameters():
            p.requires_grad = False
        for name, p in self.model.named_parameters():
            if any(re.fullmatch(pattern, name) for pattern in self.trainable_params_regex):
                p.requires_grad = True
        super().create_optimizer()
        for p in self.model.parameters():
            p.requires_grad = True

    def forward_with_cache(self, model, inputs, module):
        cache = []
        handle = module.register_forward_hook(lambda m, i, o: cache.append(o[0] if isinstance(o, tuple) else o))
        outputs = model(**inputs)
        handle.remove()
        return cache[0], outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = _plain(inputs["forget"])
        acts, forget_outputs = self.forward_with_cache(model, forget, self.model_module)
        if self.control_vec is None:
            v = torch.rand(1, 1, acts.shape[-1], generator=torch.Generator().manual_seed(0))  # float32, as there
            self.control_vec = v / v.norm() * self.steering_coeff
        control = self.control_vec.to(dtype=acts.dtype, device=acts.device).expand_as(acts)
        mask = (forget["labels"] != -100).unsqueeze(-1)
        sq = F.mse_loss(acts, control, reduction="none") * mask
        forget_loss = (sq.mean(2).sum(1) / mask.squeeze(-1).sum(-1)).mean()
        loss = self.gamma * forget_loss + self.alpha * self.compute_retain_loss(model, _plain(inputs["retain"]))
        return (loss, forget_outputs) if return_outputs else loss


_register_trainer(transformers.Trainer)
_register_trainer(FinetuneTrainer)
for _cls in (GradAscent, GradDiff, NPO, DPO, RMU):
    _register_trainer(_cls)
