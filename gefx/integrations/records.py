"""Keep G-effects measured over a run and write them out (plain loops and trainers alike).

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


def save_records(folder, records: list[tuple[int, str, GEffect]], plots: bool = True) -> Path:
    """g_effects.csv / .json (as ``gefx profile`` writes them), per_instance.json and, with
    `plots`, g_effects.png (G-effect vs step per group, one panel per objective and risk)."""
    from ..report import plot_g_effects, write_g_effects

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for step, obj, eff in records for row in eff.rows(objective=obj, step=step)]
    write_g_effects(out, {"source": "gefx.integrations"}, rows)
    per_instance = [{"objective": obj, "step": step, **eff.to_dict()} for step, obj, eff in records]
    (out / "per_instance.json").write_text(json.dumps(per_instance))
    if plots and records:
        objectives = list(dict.fromkeys(obj for _, obj, _ in records))
        risks = list(dict.fromkeys(r for _, _, eff in records for r in eff))
        groups = list(dict.fromkeys(g for _, _, eff in records for g in eff.groups))
        plot_g_effects(out, rows, objectives, risks, groups)
    return out
