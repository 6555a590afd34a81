"""Keep G-effects measured over a run and write them out (plain loops, trainers and ``gefx profile``).

    rec = gefx.integrations.Recorder()
    for step, (forget, retain) in enumerate(loader):
        with gefx.trace(model, params=opt) as tape:
            ...                                   # forwards, objective, risks
            if step % 5 == 0:
                rec.add(step, gefx.g_effect(tape, objective, risks), objective="ga")
            objective.sum().backward()
        opt.step(); opt.zero_grad()
    rec.save("runs/ga")        # g_effects.csv, g_effects.json, per_instance.json, g_effects.png
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ..geffect import GEffect


class Record(NamedTuple):
    """One measurement: the step, the objective's name, its G-effects and, optionally, which rows
    of each data split the risks' instances were (risk name -> row indices) and each risk
    instance's actual change over the step (risk name -> [B]: r_i after minus before)."""
    step: int
    objective: str
    effects: GEffect
    data_rows: dict[str, list[int]] | None = None
    actual_change: dict | None = None


class Recorder:
    """An ordered list of :class:`Record`."""

    def __init__(self):
        self.records: list[Record] = []

    def add(self, step: int, effects: GEffect, objective: str = "objective",
            data_rows: dict[str, list[int]] | None = None, actual_change: dict | None = None) -> None:
        self.records.append(Record(int(step), objective, effects, data_rows, actual_change))

    def rows(self) -> list[dict]:
        """Long format: objective, step, risk, group, value (group "total" for the sum)."""
        return long_rows(self.records)

    def save(self, folder, plots: bool = True) -> Path:
        return save_records(folder, self.records, plots)


def long_rows(records: list[Record]) -> list[dict]:
    """Every record's ``GEffect.rows`` keyed by objective and step (with ``actual_change``, summed
    over the risk's instances, on the "total" rows where recorded): what g_effects.csv holds."""
    out = []
    for r in records:
        for row in r.effects.rows(objective=r.objective, step=r.step):
            if r.actual_change and row["group"] == "total" and row["risk"] in r.actual_change:
                row["actual_change"] = float(r.actual_change[row["risk"]].sum())
            out.append(row)
    return out


def save_records(folder, records: list[Record], plots: bool = True) -> Path:
    """g_effects.csv / .json (as ``gefx profile`` writes them), per_instance.json and, with
    `plots`, g_effects.png (G-effect vs step per group, one panel per objective and risk)."""
    from ..report import plot_g_effects, write_g_effects

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = long_rows(records)
    write_g_effects(out, {"source": "gefx.integrations"}, rows)
    per_instance = [{"objective": r.objective, "step": r.step, **r.effects.to_dict()} for r in records]
    (out / "per_instance.json").write_text(json.dumps(per_instance))
    if plots and records:
        objectives = list(dict.fromkeys(r.objective for r in records))
        risks = list(dict.fromkeys(name for r in records for name in r.effects))
        groups = list(dict.fromkeys(g for r in records for g in r.effects.groups))
        plot_g_effects(out, rows, objectives, risks, groups)
    return out
