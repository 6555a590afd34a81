"""G-effects inside a Hugging Face Trainer, for open-unlearning-style trainers.

The contract (open-unlearning's): ``compute_loss(model, inputs, ...)`` implements the unlearning
method and returns its loss; ``inputs`` holds "forget" and "retain" sub-batches, each a dict with
input_ids, attention_mask and labels (-100 on question and padding tokens). Add measurement with
the mixin, placed before the trainer class:

    class MeasuredNPO(gefx.integrations.GEffectMixin, NPO):
        gefx_every = 5                      # measure every 5 optimizer steps
    trainer = MeasuredNPO(model=..., args=..., ...)   # as before
    trainer.train(); trainer.gefx_save("runs/npo")   # CSV, JSON and plots

On a measured step, the first micro-batch's compute_loss runs inside ``gefx.trace`` with the
optimizer's parameters as the counted ones; the risks (``sequence_nll`` of the forget and retain
sub-batches, plus any ``gefx_probes``) come from one extra forward each; and ``gefx.g_effect`` of
the returned loss is recorded and logged (``gefx/<risk>/<group>`` scalars through
``Trainer.log``). Training is unchanged: the loss, its graph, ``.grad`` and the random number
state are left as they were, so parameters after each step are identical with and without gefx.

What is measured: the G-effect of *the micro-batch's loss as compute_loss returns it*. With
gradient accumulation over k micro-batches the optimizer step follows the mean of k such
gradients; the recorded value is that of the first micro-batch (an unbiased one-micro-batch
estimate of the step's G-effect times k / the loss scale the Trainer applies). Gradient clipping
rescales the update by a factor c <= 1 after the fact: the effect of the clipped step is c times
the recorded value (the direction, hence the sign, is unchanged). AdamW's preconditioning is not
part of the G-effect, as in the paper.
"""
from __future__ import annotations

import contextlib
import random

import torch

from ..geffect import GEffect, g_effect
from ..losses import sequence_nll
from ..tape import trace
from .records import save_records


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


def risk_of(model, batch: dict) -> torch.Tensor:
    """Per-sample answer NLL of one sub-batch (input_ids, attention_mask, labels)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return sequence_nll(out.logits, batch["labels"])


class GEffectMixin:
    """Adds G-effect measurement to a Trainer subclass whose compute_loss follows the contract.

    Class attributes (override in the subclass or set on the instance):
        gefx_every: measure every N optimizer steps (step 0 included).
        gefx_groups: a gefx.groups preset or callable.
        gefx_risks: which sub-batches of ``inputs`` are risks ("forget", "retain").
        gefx_probes: optional name -> fixed batch dict measured as extra risks each time.
    Results: ``self.gefx_records`` (list of (step, GEffect)), ``self.gefx_rows()``,
    ``self.gefx_save(folder)``.
    """

    gefx_every: int = 5
    gefx_groups = "paper"
    gefx_risks: tuple[str, ...] = ("forget", "retain")
    gefx_probes: dict | None = None

    def _gefx_due(self) -> bool:
        step = self.state.global_step
        last = getattr(self, "_gefx_last_step", None)
        return self.model.training and step % max(1, self.gefx_every) == 0 and step != last

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if not self._gefx_due():
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        self._gefx_last_step = self.state.global_step
        params = self.optimizer if self.optimizer is not None else None
        with trace(model, params=params) as tape:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = result[0] if isinstance(result, tuple) else result
            with preserved_rng():
                batches = {name: inputs[name] for name in self.gefx_risks if name in inputs}
                batches.update({name: self._gefx_to_device(b, loss.device) for name, b in (self.gefx_probes or {}).items()})
                risks = {name: risk_of(model, b) for name, b in batches.items()}
                effects = g_effect(tape, loss, risks, groups=self.gefx_groups)
        self.gefx_records = getattr(self, "gefx_records", [])
        self.gefx_records.append((self.state.global_step, effects))
        self.log({f"gefx/{r}/{g}": v for r in effects for g, v in [*effects[r].per_group.items(), ("total", effects[r].total)]})
        return result

    @staticmethod
    def _gefx_to_device(batch: dict, device) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def gefx_rows(self) -> list[dict]:
        """Long-format rows (step, risk, group, value) of every measurement so far."""
        return [row for step, eff in getattr(self, "gefx_records", []) for row in eff.rows(step=step)]

    def gefx_save(self, folder) -> None:
        """Write g_effects.csv / g_effects.json (and plots) of the measurements to `folder`."""
        save_records(folder, [(step, "trainer", eff) for step, eff in getattr(self, "gefx_records", [])])


__all__ = ["GEffectMixin", "preserved_rng", "risk_of", "GEffect"]
