"""G-effects inside a Hugging Face Trainer, for open-unlearning-style trainers.

The contract (open-unlearning's): ``compute_loss(model, inputs, return_outputs=False,
num_items_in_batch=None)`` implements the unlearning method and returns its loss; ``inputs``
holds "forget" and "retain" sub-batches, each a dict with input_ids, attention_mask and labels
(-100 on question and padding tokens). Turn any such trainer into a measured one:

    NPO = gefx.integrations.measured(NPO, every=5)        # or: class M(GEffectMixin, NPO): ...
    trainer = NPO(model=..., args=..., ...)               # as before (gefx_* keywords accepted too)
    trainer.train()                                       # records written to <output_dir>/gefx

On a measured step (every ``gefx_every`` optimizer steps, the window's first micro-batch),
the risks (``gefx_risk`` of the forget and retain sub-batches, plus ``gefx_probes``) are measured
against the step's own gradient once the Trainer's backward has left it (online mode: no backward
of the objective is added, the step's backward is the Trainer's, and nothing of the measurement is
alive during it): each risk from one extra forward inside ``gefx.trace`` (the optimizer's
parameters counted), its backward streamed against ``.grad``, one risk at a time (under
DeepSpeed, just before the engine's step; under ZeRO-3 the risks' pieces are collected inside
compute_loss and held through the backward, ``gefx.prepare``). Where that gradient is not the
loss's plain gradient (fp16 loss scaling, DataParallel, gradients already accumulated) the mixin
measures before the step instead (compute_loss traced, ``g_effect`` of the loss it returns) and
says why (``gefx_mode``). Training is unchanged either way: the loss, its graph, ``.grad`` and the
random number state are left as they were (tested bit for bit).

What is measured. Online: the G-effect of the step's gradient from that micro-batch, i.e. of the
loss the Trainer backpropagates (compute_loss's loss divided by the number of accumulated
micro-batches k, unless the trainer scales it itself). Before the step: of compute_loss's loss
(k times the online value). Gradient clipping rescales the update by a factor c <= 1 afterwards:
the effect of the clipped step is c times the recorded value (the sign is unchanged). AdamW's
preconditioning is not part of the G-effect, as in the paper.

Where the records go: each measurement is appended to ``<output_dir>/<gefx_out>/records.jsonl``
as soon as it is made (gefx.integrations.records: a killed run keeps every measurement completed
before the kill), by the world's process zero only; the summary files are written there at the
end of ``train()``. ``train(resume_from_checkpoint=...)`` continues that log: at train begin,
once the checkpoint is loaded, the records of its global step and later ones (measured after the
checkpoint was saved) are dropped and are measured again as training continues, so every
measured step is recorded once. A run that does not resume starts at step 0, so it starts a new
log. Other processes keep their records in memory only.
"""
from __future__ import annotations

import contextlib
import os
import random
import types

import torch

from ..effects import GEffect
from ..geffect import Prepared, g_effect, prepare
from ..losses import RISKS
from ..dist import before_engine_step
from ..shards import engine_grads
from ..unlearning.objectives import forward
from ..tape import trace
from .records import Recorder

@contextlib.contextmanager
def preserved_rng():
    """Leave Python's, torch's (CPU and CUDA) random state as it was on entry."""
    py, cpu = random.getstate(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def risk_of(model, batch: dict, risk="token_mean") -> torch.Tensor:
    """The per-sample risk vector [B] of one sub-batch (input_ids, attention_mask, labels):
    "token_mean" (the paper's and open-unlearning's NLL: each sample's summed answer-token NLL over
    the batch's answer tokens, so the vector sums to the token-mean NLL), "sequence" (each
    sample's mean answer NLL) or a callable (model, batch) -> [B]."""
    if callable(risk):
        return risk(model, batch)
    if risk not in RISKS:
        raise ValueError(f"risk {risk!r}: use 'token_mean', 'sequence' or a callable (model, batch) -> [B]")
    out = forward(model, batch)
    return RISKS[risk](out.logits, out.labels)


_OPTIONS = ("every", "groups", "risk", "risks", "probes", "name", "online", "out")


class GEffectMixin:
    """Adds G-effect measurement to a Trainer subclass whose compute_loss follows the contract;
    put it first among the bases (``class M(GEffectMixin, NPO)``) or use :func:`measured`.

    Options (class attributes, or ``gefx_<option>=...`` keywords of the constructor: open-unlearning
    passes a trainer's ``method_args`` there):
        gefx_every: measure every N optimizer steps (step 0 included). Default 5.
        gefx_groups: a gefx.groups preset or callable. Default "paper" (embed, shallow, middle,
            deep, final_norm, lm_head: the paper's figures).
        gefx_risk: "token_mean" (default), "sequence" or a callable (model, batch) -> [B].
        gefx_risks: the sub-batches of ``inputs`` that are risks. Default ("forget", "retain").
        gefx_probes: optional name -> fixed batch dict, measured as extra risks each time.
        gefx_name: the objective name in the records. Default: the trainer class's name.
        gefx_online: contract with the step's own gradient where it allows (default True).
        gefx_out: folder, relative to ``args.output_dir``: records.jsonl, appended at each
            measurement, and at the end of ``train()`` g_effects.csv/.json, per_instance.json,
            g_effects.png; None: records kept in memory only.
    Results: ``self.gefx_recorder`` (a :class:`gefx.integrations.Recorder`), ``self.gefx_records``
    ((step, GEffect) pairs), ``self.gefx_rows()``, ``self.gefx_save(folder)``; each measurement is
    merged into the Trainer's next log entry as ``gefx/<risk>/<group>``; ``self.gefx_mode`` says
    how the last measurement was taken.
    """

    gefx_every: int = 5
    gefx_groups = "paper"
    gefx_risk = "token_mean"
    gefx_risks: tuple[str, ...] = ("forget", "retain")
    gefx_probes: dict | None = None
    gefx_name: str | None = None
    gefx_online: bool = True
    gefx_out: str | None = "gefx"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        first = next(c for c in mro if "compute_loss" in vars(c) or c is GEffectMixin)
        if first is not GEffectMixin:
            raise TypeError(f"{cls.__name__}: GEffectMixin must come before {first.__name__} among the bases "
                            f"(it defines compute_loss, which the mixin wraps): class {cls.__name__}(GEffectMixin, "
                            f"{first.__name__}), or gefx.integrations.measured({first.__name__})")
        missing = _no_unlearning_loss(mro[mro.index(GEffectMixin) + 1:])
        if missing:
            raise TypeError(f"{cls.__name__}: the trainer must implement the unlearning method in compute_loss(model, "
                            f"inputs, return_outputs=False, num_items_in_batch=None) (open-unlearning's contract); {missing}")
        for option in _OPTIONS:  # a function given as an option is called as it is, not as a method
            if isinstance(vars(cls).get(f"gefx_{option}"), types.FunctionType):
                setattr(cls, f"gefx_{option}", staticmethod(vars(cls)[f"gefx_{option}"]))

    def __init__(self, *args, **kwargs):
        for option in _OPTIONS:
            if f"gefx_{option}" in kwargs:
                setattr(self, f"gefx_{option}", kwargs.pop(f"gefx_{option}"))
        super().__init__(*args, **kwargs)
        self.gefx_recorder = Recorder()  # in memory until train begins (see _gefx_begin)
        self.add_callback(_train_begin_callback(self))
        self.gefx_mode = None
        self._gefx_pending = None
        self._gefx_log: dict = {}
        self._gefx_last_step = None

    # -- measuring ----------------------------------------------------------------------------
    def _gefx_due(self) -> bool:
        step = self.state.global_step
        return self.model.training and step % max(1, self.gefx_every) == 0 and step != self._gefx_last_step

    def _gefx_online_blocker(self, model) -> str | None:
        """Why the step's .grad is not the loss's plain gradient here (None: it is)."""
        if not self.gefx_online:
            return "gefx_online=False"
        accelerator = getattr(self, "accelerator", None)
        if getattr(accelerator, "scaler", None) is not None:
            return "fp16 loss scaling (.grad holds the scaled gradient)"
        if getattr(self.args, "n_gpu", 1) > 1:
            return "DataParallel averages the replicas' losses"
        if (type(model).__name__ == "DeepSpeedEngine" and model.zero_optimization_stage() < 3
                and model.gradient_accumulation_steps() > 1):
            return "DeepSpeed ZeRO-1/2 gives its reduced gradient only at the accumulation boundary"
        if any(p.grad is not None for p in model.parameters()):
            return "gradients were already accumulated in .grad"
        return None

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if not self._gefx_due():
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        self._gefx_last_step = self.state.global_step
        blocker = self._gefx_online_blocker(model)
        batches = _risk_batches(inputs, self.gefx_risks)
        device = _device_of(inputs) or self.args.device
        batches.update({name: _to(b, device) for name, b in (self.gefx_probes or {}).items()})
        if blocker is None and not _zero3(model):  # measured after the Trainer's backward: _gefx_contract
            self._gefx_pending = batches
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        with trace(model, params=_counted(self, model)) as tape:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = result[0] if isinstance(result, tuple) else result
            with preserved_rng():
                risks = {name: risk_of(model, b, self.gefx_risk) for name, b in batches.items()}
                if blocker is None:  # ZeRO-3: the risks' pieces now, contracted after the backward
                    self._gefx_pending = prepare(tape, risks, groups=self.gefx_groups)
                else:
                    self._gefx_record(g_effect(tape, loss, risks, groups=self.gefx_groups),
                                      f"before the step ({blocker})")
        return result

    def training_step(self, model, inputs, *args, **kwargs):
        # after the step's backward, with its gradient (accelerate + DeepSpeed: just before the engine
        # step that accelerate runs inside its backward)
        with before_engine_step(model, lambda: self._gefx_contract(model)):
            return super().training_step(model, inputs, *args, **kwargs)

    def _gefx_contract(self, model) -> None:
        """The online measurement, once the step's backward has left its gradient: each risk's
        forward now (one at a time, under the Trainer's autocast, the random state as it was), its
        backward streamed against that gradient. Nothing of the measurement is alive during the
        step's backward, and the risk's graph only while it is measured."""
        if self._gefx_pending is None:
            return
        pending, self._gefx_pending = self._gefx_pending, None  # the risks' batches, or (ZeRO-3) Prepared
        if isinstance(pending, Prepared):
            return self._gefx_record(pending.against(engine_grads(model)), "online")
        grads, effects = engine_grads(model), GEffect()
        with self.compute_loss_context_manager(), preserved_rng():
            for name, b in pending.items():  # every rank: the same names in the same order
                with trace(model, params=_counted(self, model)) as tape:
                    risk = {name: risk_of(model, b, self.gefx_risk)}
                    # the parameters the optimizer updates (a trainer may give others .grad too: RMU)
                    counted = {p: g for p, g in grads.items() if tape.canonical(p) is not None}
                    effects.update(g_effect(tape, counted, risk, groups=self.gefx_groups))
        self._gefx_record(effects, "online")

    def _gefx_record(self, effects: GEffect, mode: str) -> None:
        self.gefx_mode = mode
        self.gefx_recorder.add(self.state.global_step, effects, objective=self.gefx_objective_name())
        self._gefx_log = {f"gefx/{row['risk']}/{row['group']}": row["value"] for row in effects.rows()}

    def log(self, logs, *args, **kwargs):
        if self._gefx_log and "loss" in logs:  # merge the measurement into the step's own entry
            logs = {**logs, **self._gefx_log}
            self._gefx_log = {}
        return super().log(logs, *args, **kwargs)

    def _gefx_begin(self) -> None:
        """At train begin, a checkpoint's state loaded: on the world's process zero, continue the
        log in ``<output_dir>/<gefx_out>`` (else keep records in memory); drop the records of
        ``state.global_step`` and later steps, which are measured again from here."""
        if self.gefx_out and self.is_world_process_zero():
            self.gefx_recorder = Recorder(os.path.join(self.args.output_dir, self.gefx_out))
        self.gefx_recorder.rewind(self.state.global_step)

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        if self.gefx_recorder.folder is not None and self.gefx_recorder.records:
            self.gefx_save(self.gefx_recorder.folder)
        return out

    # -- results --------------------------------------------------------------------------------
    def gefx_objective_name(self) -> str:
        if self.gefx_name:
            return self.gefx_name
        mro = type(self).__mro__
        return next(c for c in mro[mro.index(GEffectMixin) + 1:] if "compute_loss" in vars(c)).__name__

    @property
    def gefx_records(self) -> list[tuple[int, GEffect]]:
        return [(r.step, r.effects) for r in self.gefx_recorder.records]

    def gefx_rows(self) -> list[dict]:
        """Long-format rows (objective, step, risk, group, value) of every measurement so far."""
        return self.gefx_recorder.rows()

    def gefx_save(self, folder):
        """Write g_effects.csv / g_effects.json, per_instance.json and g_effects.png to `folder`."""
        return self.gefx_recorder.save(folder)


def measured(trainer_cls=None, **options):
    """`trainer_cls` with G-effect measurement: a subclass ``Measured<Name>`` with GEffectMixin
    first and the given options (``every``, ``groups``, ``risk``, ``risks``, ``probes``, ``name``,
    ``online``, ``out``: see GEffectMixin; a function may be given as it is). Also a decorator:
    ``@measured(every=5)``. For a registry of trainers, :func:`measured_twins`."""
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"measured(): unknown options {sorted(unknown)}; use {', '.join(_OPTIONS)}")
    if trainer_cls is None:
        return lambda cls: measured(cls, **options)
    attrs = {f"gefx_{k}": v for k, v in options.items()}
    attrs["__module__"] = trainer_cls.__module__
    return type(f"Measured{trainer_cls.__name__}", (GEffectMixin, trainer_cls), attrs)


def measured_twins(registry: dict, **options) -> dict:
    """``{"Measured<Name>": measured(cls, **options)}`` for every trainer class in `registry`
    (name -> class, e.g. open-unlearning's TRAINER_REGISTRY) that implements an unlearning
    compute_loss; the others (transformers' own Trainer, a fine-tuning trainer with the plain LM
    loss) get none. ``TRAINER_REGISTRY.update(measured_twins(TRAINER_REGISTRY))``."""
    return {f"Measured{name}": measured(cls, **options) for name, cls in registry.items()
            if isinstance(cls, type) and not _no_unlearning_loss(cls.__mro__)}


def _train_begin_callback(trainer):
    """A TrainerCallback that calls ``trainer._gefx_begin()`` at train begin: after a checkpoint's
    trainer state is loaded (``state.global_step`` is the step training resumes from), before the
    first step (transformers 4.45 to 5.x alike)."""
    from transformers import TrainerCallback

    class GEffectLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainer._gefx_begin()
    return GEffectLog()


def _no_unlearning_loss(bases) -> str:
    """Why these bases (below the mixin) have no unlearning compute_loss ("" if they have one)."""
    below = [c for c in bases if "compute_loss" in vars(c)]
    if not below:
        return "none of its bases has a compute_loss"
    if below[0].__module__.startswith("transformers."):
        return "transformers.Trainer's own compute_loss is a plain LM loss"
    return ""


def _risk_batches(inputs: dict, risks) -> dict:
    """name -> the sub-batch each of `risks` names: a key of `inputs` ("forget"; skipped when the
    batch has none), or a dotted path into it ("forget.original"). A preference pair
    ({"original": ..., "alternate": ...}, open-unlearning's DPO data) stands for its original, the
    data being unlearned. Anything else is refused, naming the key and the option that picks a part."""
    out = {}
    for name in risks:
        path = name.split(".")
        if path[0] not in inputs:
            continue
        b, walked = inputs, []
        for key in path:
            if not isinstance(b, dict) or key not in b:
                raise ValueError(_not_a_batch(risks, name, walked, b))
            b, walked = b[key], walked + [key]
        if isinstance(b, dict) and "input_ids" not in b and isinstance(b.get("original"), dict):
            b = b["original"]
        if not isinstance(b, dict) or "input_ids" not in b:
            raise ValueError(_not_a_batch(risks, name, walked, b))
        out[name] = b
    return out


def _not_a_batch(risks, name: str, walked: list, b) -> str:
    """The refusal of a risk entry that names no batch, with the dotted path that would."""
    where = "inputs" + "".join(f"[{k!r}]" for k in walked)
    inner = [k for k, v in b.items() if isinstance(v, dict) and "input_ids" in v] if isinstance(b, dict) else []
    holds = sorted(b) if isinstance(b, dict) else type(b).__name__
    text = f"gefx_risks entry {name!r} names no batch with input_ids: {where} holds {holds}"
    if inner:
        fixed = [".".join([*walked, inner[0]]) if r == name else r for r in risks]
        text += (f"; name one of them with a dotted path, e.g. gefx_risks={fixed} "
                 f"(from Hydra: +trainer.method_args.gefx_risks=[{','.join(fixed)}])")
    return text


def _counted(trainer, model):
    """The counted parameters: the optimizer's (DeepSpeed's optimizer holds flat partitions, not the
    model's parameters: there the trainable ones)."""
    return None if type(model).__name__ == "DeepSpeedEngine" else trainer.optimizer


def _zero3(model) -> bool:
    """DeepSpeed ZeRO-3, whose partitioned weights a risk's backward cannot use after the engine's
    backward: there the risks' pieces are collected before it (``gefx.prepare``) and held."""
    return type(model).__name__ == "DeepSpeedEngine" and model.zero_optimization_stage() == 3


def _device_of(inputs: dict):
    """The device of the first tensor in a (nested) batch."""
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, dict) and (d := _device_of(v)) is not None:
            return d
    return None


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


__all__ = ["GEffectMixin", "measured", "measured_twins", "preserved_rng", "risk_of", "RISKS", "GEffect"]
