"""Reference-compatible mode: the numbers the reference G-effect code prints (docs/METHOD.md §4).

The reference code runs, per micro-batch, one forward+backward for each of NLL(forget), the
objective and NLL(retain), copies each full gradient to host memory, keeps a moving average
``g <- 0.6 g_old + 0.4 g_new`` of each (the first micro-batch initialises it), and on every 4th
micro-batch (the 3rd, 7th, ...) prints ``<EMA grad objective, EMA grad NLL(forget)>`` ("ge u")
and ``<EMA grad objective, EMA grad NLL(retain)>`` ("ge r"), summed per parameter group.

:class:`ReferenceCompat` computes the same from one traced forward per batch: the three gradients
come from ``torch.autograd.grad`` on the recorded layer outputs and are formed per parameter
directly on the device (one weight-gradient GEMM each); nothing is copied to host memory and no
separate backward pass runs. The moving averages are state by nature: three dense tensors per
counted parameter, kept on the parameter's device in `dtype` (float32 by default, float64 for
float64 models; bfloat16 reproduces the reference's rounding: bf16 gradients and bf16 products).

Use the reference's risks for a faithful reproduction: ``gefx.losses.token_mean_nll`` (the HF
``loss``, a token mean over the micro-batch) on the forget and the retain sub-batches.
"""
from __future__ import annotations

import torch

from ..collect import collect
from ..products import aggregated
from ..groups import resolve
from ..precision import acc_dtype
from ..tape import Tape


class ReferenceCompat:
    """Moving-average G-effects as the reference code prints them.

    Args:
        decay: weight of the old average (0.6 in the reference).
        every, phase: report when the micro-batch counter (from 1) modulo `every` equals `phase`
            (4 and 3: the 3rd, 7th, 11th, ... micro-batch).
        groups: a gefx.groups preset or callable ("reference": embed / layers.0-9 / 10-19 / 20+ /
            lm_head, with the final norm in its own group).
        dtype: dtype of the averages and of the products. Default: float32 (float64 for float64
            parameters); bfloat16 reproduces the reference's rounding.
    """

    def __init__(self, decay: float = 0.6, every: int = 4, phase: int = 3, groups="reference",
                 dtype: torch.dtype | None = None):
        self.decay, self.every, self.phase, self.groups, self.dtype = decay, every, phase, groups, dtype
        self.ema: dict[str, dict[str, torch.Tensor]] = {"objective": {}, "forget": {}, "retain": {}}
        self.count = 0
        self.reports: list[dict] = []

    def update(self, tape: Tape, objective: torch.Tensor, forget: torch.Tensor, retain: torch.Tensor) -> dict | None:
        """Fold one micro-batch in; returns the report on reporting micro-batches, else None.
        Each loss is a scalar or a per-sample vector (summed), from forwards traced by `tape`."""
        for key, loss in (("objective", objective), ("forget", forget), ("retain", retain)):
            grads = collect(tape, loss, per_sample=False, what=key)
            state = self.ema[key]
            for name, g in aggregated(tape, grads, every=True).items():
                g = g.to(self.dtype or acc_dtype(tape.params[name]))
                state[name] = g if name not in state else self.decay * state[name] + (1 - self.decay) * g
        self.count += 1
        if self.count % self.every != self.phase:
            return None
        mapping, order = resolve(tape, self.groups)
        report = {"micro_batch": self.count}
        for key, risk in (("ge_u", "forget"), ("ge_r", "retain")):
            per_group = dict.fromkeys(order, 0.0)
            for name in tape.params:
                per_group[mapping[name]] += float((self.ema["objective"][name] * self.ema[risk][name]).sum())
            report[key] = sum(per_group.values())
            report[key + "_groups"] = per_group
        self.reports.append(report)
        return report

    @staticmethod
    def format(report: dict) -> str:
        """The reference's two printed lines."""
        return "\n".join(f"ge {k[-1]} | {report[k]} {report[k + '_groups']}" for k in ("ge_u", "ge_r"))
