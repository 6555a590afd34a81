"""Keep G-effects measured over a run and write them out (plain loops and trainers alike).

    rec = gefx.integrations.Recorder()
    for step, (forget, retain) in enumerate(loader):
        with gefx.trace(model, params=opt) as tape:
            ...                                   # forwards, objective, risks
            if step % 5 == 0:
                rec.add(step, gefx.g_effect(tape, objective, risks), objective="ga")
            objective.sum().backward()
        opt.step(); opt.zero_grad()
    rec.save("runs/ga")                           # g_effects.csv, g_effects.json, per_instance.json
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..geffect import GEffect


class Recorder:
    """An ordered list of (step, objective name, GEffect)."""

    def __init__(self):
        self.records: list[tuple[int, str, GEffect]] = []

    def add(self, step: int, effects: GEffect, objective: str = "objective") -> None:
        self.records.append((int(step), objective, effects))

    def rows(self) -> list[dict]:
        """Long format: objective, step, risk, group, value (group "total" for the sum)."""
        return [row for step, obj, eff in self.records for row in eff.rows(objective=obj, step=step)]

    def save(self, folder) -> Path:
        return save_records(folder, self.records)


def save_records(folder, records: list[tuple[int, str, GEffect]]) -> Path:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for step, obj, eff in records for row in eff.rows(objective=obj, step=step)]
    with open(out / "g_effects.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["objective", "step", "risk", "group", "value"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "g_effects.json").write_text(json.dumps(rows, indent=1))
    per_instance = [{"objective": obj, "step": step, **eff.to_dict()} for step, obj, eff in records]
    (out / "per_instance.json").write_text(json.dumps(per_instance))
    return out
