"""Outputs of ``gefx profile``: CSV / JSON tables, per-instance arrays, PNG plots, console table.

Files written to the output folder:

    records.jsonl     every measurement, appended as it is made (gefx.integrations.records):
                      what survives a profile killed midway; the files below are written at the end
    g_effects.csv     objective, step, risk, group, value   (group "total" = sum over groups)
    g_effects.json    {"meta": ..., "g_effects": [same rows as the CSV]}
    metrics.csv       objective, step, forget/retain NLL (token mean), extraction (greedy
                      answer-prefix match), teacher-forced token accuracy, loss, weight means
    metrics.json      the same rows, with meta
    per_instance.npz  per measured step: per_instance [S, B] for each risk, per_objective_instance
                      [S, B_forget] (PG-effects), per_instance_group [S, G, B], row indices
    g_effects.png     G-effect vs step per group, unlearning (forget risk) and retaining (retain risk)
    per_instance.png  per forget instance: PG-effect on the forget risk vs on the retain risk
    weights.png       the objectives' weights over steps (GA inverse confidence, NPO instance
                      weight, WGA/TNPO/WTNPO token weights: means over valid entries)
    metrics.png       forget/retain NLL and extraction over steps
    fidelity.png      first-order fidelity: each risk instance's predicted change over the step
                      (<grad r_i, delta_theta>, the optimizer's actual update) against its actual
                      change (r_i re-evaluated after the step), per objective run
    tokens.png        per-token G-effects: for a few forget answers, how much each objective's first
                      update is predicted to raise each answer token's NLL (gefx.jvp)

g_effects.csv also has predicted_change (per group and total) and actual_change (on the total
rows) where they were measured; per_instance.npz the per-instance predicted_change, actual_change,
risk_norm and cosine.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np

RISK_TITLES = {"forget": "unlearning G-effect (forget risk)", "retain": "retaining G-effect (retain risk)"}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def write_g_effects(out: Path, meta: dict, rows: list[dict]) -> None:
    """g_effects.csv and g_effects.json from long-format rows (see ``GEffect.rows``); the columns
    predicted_change / actual_change appear when some row has them."""
    fields = ["objective", "step", "risk", "group", "value"]
    fields += [k for k in ("predicted_change", "actual_change") if any(k in row for row in rows)]
    with open(out / "g_effects.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    (out / "g_effects.json").write_text(json.dumps({"meta": meta, "g_effects": rows}, indent=1))


def write_tables(out: Path, meta: dict, rows: list[dict], metrics: list[dict], arrays: dict[str, np.ndarray]):
    write_g_effects(out, meta, rows)
    keys: list[str] = []
    for m in metrics:
        keys += [k for k in m if k not in keys]
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(metrics)
    (out / "metrics.json").write_text(json.dumps({"meta": meta, "metrics": metrics}, indent=1))
    np.savez_compressed(out / "per_instance.npz", **{_safe(k): v for k, v in arrays.items()})


def instance_arrays(records) -> dict[str, np.ndarray]:
    """per_instance.npz's arrays from ``gefx.integrations.Record`` s, stacked over each objective's
    measured steps: ``<objective>__steps``, ``__<risk>__per_instance`` [S, B],
    ``__<risk>__per_instance_group`` [S, G, B], ``__<risk>__per_objective_instance`` [S, B_obj]
    (where the objective is a per-sample vector) and ``__<split>_rows`` (the data rows of each batch)."""
    per: dict[str, list] = {}
    for r in records:
        put = lambda key, value: per.setdefault(f"{r.objective}__{key}", []).append(value)  # noqa: E731
        put("steps", r.step)
        for name, eff in r.effects.items():
            put(f"{name}__per_instance", eff.per_instance.detach().double().cpu().numpy())
            put(f"{name}__per_instance_group", eff.per_instance_group.detach().double().cpu().numpy())
            for key in ("per_objective_instance", "predicted_change", "risk_norm", "cosine"):
                value = getattr(eff, key)
                if value is not None:
                    put(f"{name}__{key}", value.detach().double().cpu().numpy())
        for name, value in (r.actual_change or {}).items():
            put(f"{name}__actual_change", value.detach().double().cpu().numpy())
        for split, idx in (r.data_rows or {}).items():
            put(f"{split}_rows", np.asarray(idx))
    return {k: np.stack([np.asarray(x) for x in v]) for k, v in per.items()}


def _series(rows, objective, risk, group):
    pts = sorted((r["step"], r["value"]) for r in rows
                 if r["objective"] == objective and r["risk"] == risk and r["group"] == group)
    return [p[0] for p in pts], [p[1] for p in pts]


def _symlog(ax, values, axis: str = "y", decades: int = 3):
    """Symmetric log scale: `decades` decades of log range above a linear band around zero, with
    a few decade ticks (no crowded labels at the band's edges)."""
    v = np.abs(np.asarray([x for x in np.ravel(values) if np.isfinite(x)], dtype=float))
    v = v[v > 0]
    if not v.size:
        return
    hi = int(np.ceil(np.log10(v.max())))
    lin = 10.0 ** (hi - decades)
    (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=lin, linscale=0.4)
    every = max(1, decades // 3)
    decs = [10.0 ** k for k in range(hi, hi - decades, -every)]
    lim = ax.get_xlim() if axis == "x" else ax.get_ylim()
    (ax.set_xticks if axis == "x" else ax.set_yticks)(sorted([-d for d in decs] + [0.0] + decs))
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lim)  # ticks must not widen the view


def plot_g_effects(out: Path, rows: list[dict], objectives: list[str], risks: list[str], groups: list[str]) -> Path:
    """g_effects.png: G-effect vs step per group (and the total), one panel per objective and risk."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = plt.get_cmap("tab10")
    n = len(objectives)
    fig, axes = plt.subplots(n, len(risks), figsize=(5.2 * len(risks), 2.9 * n), squeeze=False)
    for i, obj in enumerate(objectives):
        for j, risk in enumerate(risks):
            ax = axes[i][j]
            vals = []
            for k, g in enumerate(groups):
                x, y = _series(rows, obj, risk, g)
                vals += y
                ax.plot(x, y, marker="o", ms=3, lw=1.3, color=colors(k % 10), label=g)
            x, y = _series(rows, obj, risk, "total")
            ax.plot(x, y, ls="--", color="black", lw=1.2, label="total")
            ax.axhline(0, color="grey", lw=0.6)
            _symlog(ax, vals + y)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{obj}: {RISK_TITLES.get(risk, risk)}", fontsize=9)
            ax.set_xlabel("unlearning step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = out / "g_effects.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def plot_all(out: Path, rows: list[dict], metrics: list[dict], arrays: dict[str, np.ndarray],
             objectives: list[str], risks: list[str], groups: list[str]) -> list[Path]:
    """Every PNG of the module docstring; returns their paths."""
    paths = [plot_g_effects(out, rows, objectives, risks, groups)]
    if "forget" in risks and "retain" in risks:
        paths.append(plot_per_instance(out, arrays, objectives))
    paths += [plot_weights(out, metrics, objectives), plot_metrics(out, metrics, objectives),
              plot_fidelity(out, arrays, objectives, risks)]
    return [p for p in paths if p is not None]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_per_instance(out: Path, arrays: dict[str, np.ndarray], objectives: list[str]) -> Path:
    """per_instance.png: per forget instance, its PG-effect on the forget risk vs the retain risk."""
    plt = _pyplot()
    n = len(objectives)
    cols = min(n, 2 if n <= 4 else 3)
    nrow = math.ceil(n / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.6 * nrow), squeeze=False)
    for i, obj in enumerate(objectives):
        ax = axes[i // cols][i % cols]
        xf = arrays.get(f"{obj}__forget__per_objective_instance")
        yr = arrays.get(f"{obj}__retain__per_objective_instance")
        steps = arrays.get(f"{obj}__steps")
        if xf is None or yr is None:
            ax.text(0.5, 0.5, "combined objective:\nno per-instance split", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        else:
            c = np.repeat(steps[:, None], xf.shape[1], axis=1)
            sc = ax.scatter(xf.ravel(), yr.ravel(), c=c.ravel(), cmap="viridis", s=12, alpha=0.85)
            fig.colorbar(sc, ax=ax, label="step")
            ax.axhline(0, color="grey", lw=0.6)
            ax.axvline(0, color="grey", lw=0.6)
            _symlog(ax, xf, "x")
            _symlog(ax, yr, "y")
        ax.set_title(f"{obj}: PG-effect per forget instance", fontsize=9)
        ax.set_xlabel("on forget risk (unlearning)", fontsize=8)
        ax.set_ylabel("on retain risk (retaining)", fontsize=8)
        ax.tick_params(labelsize=7)
    for k in range(n, nrow * cols):
        axes[k // cols][k % cols].axis("off")
    return _save(fig, out / "per_instance.png")


def plot_weights(out: Path, metrics: list[dict], objectives: list[str]) -> Path:
    """weights.png: each objective's weight means over the steps."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    plotted = False
    for i, obj in enumerate(objectives):
        for key in sorted({k for m in metrics if m["objective"] == obj for k in m if k.startswith("weight:")}):
            pts = sorted((m["step"], m[key]) for m in metrics if m["objective"] == obj and m.get(key) not in (None, ""))
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, color=colors(i % 10),
                        label=f"{obj}: {key[7:]}")
                plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("unlearning step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean weight")
    ax.set_title("objective weights (GA: 1/p on grad p; NPO: instance; WGA/TNPO: token)", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, out / "weights.png")


def plot_metrics(out: Path, metrics: list[dict], objectives: list[str]) -> Path:
    """metrics.png: forget / retain NLL and extraction over the steps."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    colors = plt.get_cmap("tab10")
    keys = [("forget_nll", "forget NLL"), ("retain_nll", "retain NLL"),
            ("forget_extraction", "forget extraction"), ("retain_extraction", "retain extraction")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for (key, title), ax in zip(keys, axes.ravel()):
        for i, obj in enumerate(objectives):
            pts = sorted((m["step"], m[key]) for m in metrics if m["objective"] == obj and key in m)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, color=colors(i % 10), label=obj)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("unlearning step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out / "metrics.png")


def fidelity(arrays: dict[str, np.ndarray], objective: str, risks: list[str]) -> dict | None:
    """How well first-order predictions held over one objective's run: the Pearson correlation of
    predicted and actual per-instance changes (all measured steps and risks) and the relative
    error sum |predicted - actual| / sum |actual| (weighted by the size of the change, so steps where
    nothing moves do not dilute it); None where nothing was recorded."""
    pred = [arrays[f"{objective}__{r}__predicted_change"].ravel() for r in risks
            if f"{objective}__{r}__actual_change" in arrays]
    act = [arrays[f"{objective}__{r}__actual_change"].ravel() for r in risks
           if f"{objective}__{r}__actual_change" in arrays]
    if not pred:
        return None
    p, a = np.concatenate(pred), np.concatenate(act)
    corr = float(np.corrcoef(p, a)[0, 1]) if p.size > 1 and p.std() > 0 and a.std() > 0 else float("nan")
    return {"corr": corr, "rel_err": float(np.abs(p - a).sum() / max(np.abs(a).sum(), 1e-300))}


def plot_fidelity(out: Path, arrays: dict[str, np.ndarray], objectives: list[str], risks: list[str]) -> Path | None:
    """fidelity.png: predicted vs actual change of each risk instance, one panel per objective run."""
    runs = [o for o in objectives if fidelity(arrays, o, risks) is not None]
    if not runs:
        return None
    plt = _pyplot()
    cols = min(len(runs), 4)
    nrow = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.6 * cols, 3.4 * nrow), squeeze=False)
    for k, obj in enumerate(runs):
        ax = axes[k // cols][k % cols]
        lo, hi = np.inf, -np.inf
        for j, risk in enumerate(risks):
            p, a = arrays.get(f"{obj}__{risk}__predicted_change"), arrays.get(f"{obj}__{risk}__actual_change")
            if p is None or a is None:
                continue
            ax.scatter(p.ravel(), a.ravel(), s=10, alpha=0.7, marker="os^"[j % 3], label=risk)
            lo, hi = min(lo, p.min(), a.min()), max(hi, p.max(), a.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        f = fidelity(arrays, obj, risks)
        ax.set_title(f"{obj}: r = {f['corr']:.3f}, rel. error {f['rel_err']:.2g}", fontsize=8)
        ax.set_xlabel("predicted change <grad r_i, delta theta>", fontsize=7)
        ax.set_ylabel("actual change of r_i", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for k in range(len(runs), nrow * cols):
        axes[k // cols][k % cols].axis("off")
    return _save(fig, out / "fidelity.png")


def plot_tokens(out: Path, changes: dict[str, np.ndarray], input_ids, labels, tokenizer) -> Path:
    """tokens.png: one heat-map row per forget answer and objective run, one cell per answer token
    (labelled with the token), coloured by the predicted change of its NLL over the run's first
    update (red: pushed down, i.e. NLL rises; blue: pulled up); each row scaled to its own maximum,
    the maximum printed at the row's end."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm
    runs = list(changes)
    n_rows, width = next(iter(changes.values())).shape
    answer = [np.flatnonzero(np.isfinite(changes[runs[0]][i])) for i in range(n_rows)]
    cols = max((len(a) for a in answer), default=1)
    fig, axes = plt.subplots(n_rows, 1, figsize=(min(24, 1.0 + 0.55 * cols), 0.5 + 0.42 * len(runs) * n_rows + 0.4 * n_rows),
                             squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        idx = answer[i]
        grid = np.stack([changes[r][i, idx] / max(np.nanmax(np.abs(changes[r][i, idx])), 1e-30) for r in runs])
        ax.imshow(grid, cmap="RdBu_r", norm=TwoSlopeNorm(0, -1, 1), aspect="auto")
        words = [tokenizer.decode([int(t)]) if tokenizer is not None else str(int(t)) for t in labels[i, idx + 1]]
        ax.set_xticks(range(len(idx)), words, fontsize=7, rotation=60, ha="right")
        ax.set_yticks(range(len(runs)), runs, fontsize=7)
        for k, r in enumerate(runs):
            ax.text(len(idx) - 0.4, k, f" max {np.nanmax(np.abs(changes[r][i, idx])):.2g}", va="center", fontsize=6)
        ax.set_title(f"forget answer {i + 1}: predicted NLL change per token over the first update "
                     "(red = pushed down)", fontsize=8)
    return _save(fig, out / "tokens.png")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e5 or a == 0 else f"{v:.2e}"


def summary_table(rows: list[dict], metrics: list[dict], objectives: list[str], risks: list[str],
                  main_weight: dict[str, str | None]) -> str:
    """One line per objective: G-effects at the first and last measured step, NLL and extraction
    before -> after, the main weight first -> last."""
    head = ["objective"]
    for r in risks:
        head += [f"e_{r[0]} first", f"e_{r[0]} last"]
    head += ["forget NLL", "retain NLL", "forget extr.", "retain extr.", "weight"]
    lines = []
    for obj in objectives:
        cells = [obj]
        for r in risks:
            _, y = _series(rows, obj, r, "total")
            cells += [_fmt(y[0]) if y else "-", _fmt(y[-1]) if y else "-"]
        ms = sorted((m for m in metrics if m["objective"] == obj and "forget_nll" in m), key=lambda m: m["step"])

        def span(key):
            return f"{_fmt(ms[0][key])} -> {_fmt(ms[-1][key])}" if ms else "-"
        cells += [span("forget_nll"), span("retain_nll"), span("forget_extraction"), span("retain_extraction")]
        wk = main_weight.get(obj)
        wm = sorted((m for m in metrics if m["objective"] == obj and m.get(f"weight:{wk}") not in (None, "")),
                    key=lambda m: m["step"]) if wk else []
        cells.append(f"{wk} {_fmt(wm[0][f'weight:{wk}'])} -> {_fmt(wm[-1][f'weight:{wk}'])}" if wm else "-")
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]
    return "\n".join(out)
