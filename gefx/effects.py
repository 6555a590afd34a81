"""What :func:`gefx.g_effect` returns: :class:`RiskEffect` per risk, gathered in a :class:`GEffect`.

For an objective L, a risk vector r (R = sum_i r_i), groups g of the counted parameters and,
optionally, a direction d in parameter space (the optimizer's next update, or any given one):

    per_instance_group[g, i]       <grad_g r_i, grad_g L>      the G-effect
    per_objective_instance_group   <grad_g R, grad_g l_s>      the PG-effect (L given as a vector l)
    risk_norm_group[g, i]          ||grad_g r_i||              (with norms=True)
    objective_norm_group[g]        ||grad_g L||                (with norms=True)
    cosine_group[g, i]             per_instance_group / (risk_norm_group * objective_norm_group)
    predicted_change_group[g, i]   <grad_g r_i, d_g>           (with a direction)

Totals over groups: ``per_instance`` sums, norms combine as the root of the summed squares, and the
cosine is recomputed from the totals. The cosine is the G-effect without its scale: GA's gradient
norm explodes as the forget NLL grows, so its raw G-effects grow by orders of magnitude while the
cosine stays in [-1, 1] and shows whether the direction itself changes. With d = the optimizer's
update, ``predicted_change`` is the first-order change of each risk instance over the step
(r_i(theta + d) - r_i(theta) ~ <grad r_i, d>); for plain SGD d = -lr grad L, i.e. -lr times the
G-effect.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from . import dist
from .groups import group_sums, resolve


def _cos(dot: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dot / (a * b), 0 where a norm is 0 (a gradient that is zero has no direction)."""
    den = a * b
    return torch.where(den > 0, dot / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(dot))


def pack(t: torch.Tensor | None) -> dict | None:
    """A tensor as plain data (dtype, shape, flat values) that JSON keeps bit for bit: every
    float16 / bfloat16 / float32 / float64 value is a float64, whose JSON repr reads back exactly."""
    if t is None:
        return None
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": t.flatten().tolist()}


def unpack(d: dict | None) -> torch.Tensor | None:
    """The CPU tensor :func:`pack` describes."""
    if d is None:
        return None
    return torch.tensor(d["values"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])


@dataclass
class RiskEffect:
    """G-effects of one objective on one risk (see the module docstring for each field)."""

    risk: str
    groups: list[str]
    per_instance_group: torch.Tensor                     # [n_groups, B_risk]
    per_objective_instance_group: torch.Tensor | None    # [n_groups, B_objective] or None
    risk_norm_group: torch.Tensor | None = None          # [n_groups, B_risk]
    objective_norm_group: torch.Tensor | None = None     # [n_groups]
    predicted_change_group: torch.Tensor | None = None   # [n_groups, B_risk]

    @property
    def per_instance(self) -> torch.Tensor:
        return self.per_instance_group.sum(0)

    @property
    def per_objective_instance(self) -> torch.Tensor | None:
        g = self.per_objective_instance_group
        return None if g is None else g.sum(0)

    @property
    def per_group(self) -> dict[str, float]:
        return {g: float(v) for g, v in zip(self.groups, self.per_instance_group.sum(1))}

    @property
    def total(self) -> float:
        return float(self.per_instance_group.sum())

    # -- norms and cosines -------------------------------------------------------------------
    @property
    def risk_norm(self) -> torch.Tensor | None:
        """[B_risk]: ||grad r_i|| over all counted parameters."""
        g = self.risk_norm_group
        return None if g is None else g.pow(2).sum(0).sqrt()

    @property
    def objective_norm(self) -> float | None:
        """||grad L|| over all counted parameters."""
        g = self.objective_norm_group
        return None if g is None else float(g.pow(2).sum().sqrt())

    @property
    def cosine_group(self) -> torch.Tensor | None:
        """[n_groups, B_risk]: cos(grad_g r_i, grad_g L)."""
        if self.risk_norm_group is None or self.objective_norm_group is None:
            return None
        return _cos(self.per_instance_group, self.risk_norm_group, self.objective_norm_group[:, None])

    @property
    def cosine(self) -> torch.Tensor | None:
        """[B_risk]: cos(grad r_i, grad L)."""
        if self.risk_norm_group is None or self.objective_norm_group is None:
            return None
        return _cos(self.per_instance, self.risk_norm, self.objective_norm_group.pow(2).sum().sqrt())

    # -- the step's direction ----------------------------------------------------------------
    @property
    def predicted_change(self) -> torch.Tensor | None:
        """[B_risk]: <grad r_i, d>, the first-order change of each risk instance along d."""
        g = self.predicted_change_group
        return None if g is None else g.sum(0)

    @property
    def predicted_change_per_group(self) -> dict[str, float] | None:
        g = self.predicted_change_group
        return None if g is None else {name: float(v) for name, v in zip(self.groups, g.sum(1))}

    @classmethod
    def concat(cls, parts: list["RiskEffect"]) -> "RiskEffect":
        """One risk streamed over several batches against the same objective (and direction): the
        parts' instances side by side (the risk is the sum over all of them)."""
        first = parts[0]
        if any(p.groups != first.groups for p in parts):
            raise ValueError("RiskEffect.concat: the parts have different groups")

        def cat(key):
            values = [getattr(p, key) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values, dim=1)
        return cls(first.risk, first.groups, cat("per_instance_group"), None, cat("risk_norm_group"),
                   first.objective_norm_group, cat("predicted_change_group"))

    @classmethod
    def tensor_fields(cls) -> list[str]:
        """The names of the fields that hold a tensor or None: all but risk and groups."""
        return [f.name for f in fields(cls)][2:]

    def cpu(self) -> "RiskEffect":
        """The same values, every tensor detached and on the CPU (what a record keeps)."""
        return replace(self, **{n: None if (t := getattr(self, n)) is None else t.detach().cpu()
                                for n in self.tensor_fields()})

    def state(self) -> dict:
        """Every field as plain data (tensors through :func:`pack`): :meth:`from_state` rebuilds
        this RiskEffect exactly, also after a JSON round trip."""
        tensors = {n: pack(getattr(self, n)) for n in self.tensor_fields()}
        return {"risk": self.risk, "groups": list(self.groups), **tensors}

    @classmethod
    def from_state(cls, state: dict) -> "RiskEffect":
        """The RiskEffect :meth:`state` describes, its tensors on the CPU."""
        return cls(state["risk"], list(state["groups"]), **{n: unpack(state[n]) for n in cls.tensor_fields()})

    def to_dict(self) -> dict:
        def rows(t):
            return None if t is None else {g: row.tolist() for g, row in zip(self.groups, t)}

        def vec(t):
            return None if t is None else t.tolist()
        return {"risk": self.risk, "total": self.total, "per_group": self.per_group,
                "per_instance": self.per_instance.tolist(), "per_instance_group": rows(self.per_instance_group),
                "per_objective_instance": vec(self.per_objective_instance),
                "risk_norm": vec(self.risk_norm), "risk_norm_group": rows(self.risk_norm_group),
                "objective_norm": self.objective_norm,
                "objective_norm_group": vec(self.objective_norm_group),
                "cosine": vec(self.cosine),
                "predicted_change": vec(self.predicted_change),
                "predicted_change_group": rows(self.predicted_change_group)}


class GEffect(dict):
    """risk name -> :class:`RiskEffect`, in the order the risks were given."""

    @property
    def groups(self) -> list[str]:
        return next(iter(self.values())).groups

    def to_dict(self) -> dict:
        return {name: eff.to_dict() for name, eff in self.items()}

    def cpu(self) -> "GEffect":
        """The same G-effects with every tensor detached and on the CPU."""
        return GEffect({name: eff.cpu() for name, eff in self.items()})

    def state(self) -> dict:
        """risk name -> :meth:`RiskEffect.state`; :meth:`from_state` rebuilds the GEffect exactly."""
        return {name: eff.state() for name, eff in self.items()}

    @classmethod
    def from_state(cls, state: dict) -> "GEffect":
        """The GEffect :meth:`state` describes, its tensors on the CPU."""
        return cls({name: RiskEffect.from_state(s) for name, s in state.items()})

    def rows(self, **keys) -> list[dict]:
        """Long-format rows {**keys, risk, group, value[, predicted_change]}, one per risk and group
        plus group "total" (e.g. ``effects.rows(objective="ga", step=10)``), for CSV files and
        plots; ``predicted_change`` (summed over the risk's instances) where a direction was given."""
        out = []
        for name, eff in self.items():
            pred = eff.predicted_change_per_group
            for group, value in [*eff.per_group.items(), ("total", eff.total)]:
                row = {**keys, "risk": name, "group": group, "value": value}
                if pred is not None:
                    row["predicted_change"] = sum(pred.values()) if group == "total" else pred[group]
                out.append(row)
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{n}: total={e.total:.6g}" for n, e in self.items())
        return f"GEffect({body})"


def report(tape, name: str, batch: int, values, groups, process_group, obj_sq=None, obj_batch=None) -> RiskEffect:
    """Stage 5 of a measurement, *report*: one risk's RiskEffect from its per-parameter products
    (`values`: rows, cols, norms, pred as {name: [B]}, each None when not asked), summed into groups
    in tape order however they came; the objective's squared norm per group `obj_sq` (a dict);
    per-instance values gathered across the ranks under torch.distributed."""
    def per_group(per_param, b):
        ordered = {n: per_param[n] for n in tape.params if n in per_param}
        sums = group_sums(tape, ordered, groups, (b,))
        return torch.stack([sums[g] for g in names])

    names = resolve(tape, groups)[1]
    out = {"per_instance_group": per_group(values.rows, batch),
           "per_objective_instance_group": None if values.cols is None else per_group(values.cols, obj_batch)}
    if values.norms is not None:
        out["risk_norm_group"] = per_group(values.norms, batch)
    if values.pred is not None:
        out["predicted_change_group"] = per_group(values.pred, batch)
    if dist.group_size(process_group) > 1:
        out = {k: None if x is None else dist.gather_columns(x, process_group) for k, x in out.items()}
    if "risk_norm_group" in out:
        out["risk_norm_group"] = out["risk_norm_group"].clamp(min=0).sqrt()
    obj_norm = None if obj_sq is None else torch.stack([obj_sq[g] for g in names]).clamp(min=0).sqrt()
    return RiskEffect(name, names, objective_norm_group=obj_norm, **out)


def reported(tape, measured: dict, groups, process_group, obj_batch: int | None = None) -> "GEffect":
    """Stage 5 for every risk, in order: name -> (batch, products, the objective's squared norm
    per parameter or None), as stage 4 gives them (``gefx.products.against``), made into a
    :class:`GEffect` (under torch.distributed every rank reports the same risks in the same order)."""
    result = GEffect()
    for name, (batch, values, obj_sq) in measured.items():
        grouped = None if obj_sq is None else group_sums(tape, obj_sq, groups, ())
        result[name] = report(tape, name, batch, values, groups, process_group, grouped, obj_batch)
    return result
