"""`gefx profile`: unlearn a forget split with each objective and record G-effects online.

    gefx profile                                   # GA, NPO, WGA, TNPO on the built-in default
    gefx profile --objectives npo,wga:alpha=0.5,ga+kl --steps 40 --every 2 --out runs/x
    gefx profile --model locuslab/tofu_ft_llama2-7b --data locuslab/TOFU --device cuda --dtype bfloat16

Default model and data: a tiny Llama fine-tuned once (cached under $GEFX_CACHE, default
~/.cache/gefx) on a synthetic TOFU-style set of fictitious authors (see gefx.models, gefx.data).

Each objective starts from the same fine-tuned weights and sees the same batches. A step draws
--batch-size forget rows (cycling through a seeded shuffle of the split) and as many retain rows;
every --every steps (from step 0) the step runs inside gefx.trace and gefx.g_effect measures, on
that step's batches and before its update, the G-effect of the objective on the forget risk
(unlearning) and on the retain risk (retaining), per group of parameters, per risk instance and
per objective instance (PG-effect). The risks are the reference code's token-mean answer NLL
(gefx.losses.token_mean_nll: each vector sums to the batch's mean NLL). At the same steps and
after the last one the forget / retain NLL, greedy extraction and token accuracy of fixed
evaluation subsets are recorded. Outputs: see gefx.report.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data as gdata
from . import objectives as gobj

DEFAULT_OBJECTIVES = "ga,npo,wga,tnpo"
RISKS = ("forget", "retain")
MAIN_WEIGHT = {"ga": "inverse_confidence", "wga": "token_weight", "npo": "instance_weight",
               "simnpo": "instance_weight", "tnpo": "token_weight", "wtnpo": "token_weight",
               "dpo": "instance_weight"}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _epilog() -> str:
    lines = ["objective hyper-parameters (defaults; any float):"]
    for name, cls in list(gobj.OBJECTIVES.items()) + list(gobj.REGULARISERS.items()):
        hp = ", ".join(f"{k}={v}" for k, v in cls.hparams.items()) or "none"
        lines.append(f"  {name}: {hp}" + ("  (+reg: add lambda=..., default 1)" if name in gobj.REGULARISERS else ""))
    lines.append("  gd: lambda=1.0  (= ga+nll:lambda=...)")
    lines.append("rmu/rr layer: index into hidden_states (0 = embedding output, l = decoder layer l; "
                 "-1 = the middle layer).")
    lines.append("example: gefx profile --objectives 'wga:alpha=0.5,npo:beta=0.5+kl:lambda=1,rmu:layer=2:c=5' "
                 "--steps 30 --every 5 --out runs/sweep")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gefx profile",
        description="Unlearn a forget split with each objective and record G-effects (per group, "
                    "per instance, per step) with forget/retain metrics. Offline by default.",
        formatter_class=_Formatter, epilog=_epilog())
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                   help="comma-separated specs: name[:key=value...][+reg[:lambda=x]...]; names: "
                        + ", ".join(sorted(gobj.OBJECTIVES)) + ", gd; regularisers: "
                        + ", ".join(sorted(gobj.REGULARISERS)))
    p.add_argument("--steps", type=int, default=20, help="unlearning steps per objective")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="AdamW as in the paper, or SGD")
    p.add_argument("--weight-decay", type=float, default=0.01, help="optimizer weight decay")
    p.add_argument("--batch-size", type=int, default=4, help="forget rows per step (and as many retain rows)")
    p.add_argument("--forget-split", default="forget10", help="forget01, forget05, forget10, ...")
    p.add_argument("--risks", default="forget,retain", help="risks to measure: forget (unlearning), retain")
    p.add_argument("--groups", default="paper", help="parameter groups: param, module, block, paper, reference")
    p.add_argument("--every", type=int, default=1, help="measure G-effects every N steps (from step 0)")
    p.add_argument("--eval-size", type=int, default=20, help="rows of each split for NLL / extraction")
    p.add_argument("--max-length", type=int, default=512, help="token limit per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/profile", help="output folder")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, float64")
    p.add_argument("--model", default=None, help="Hugging Face causal LM name or path (default: the built-in tiny model)")
    p.add_argument("--data", default=None,
                   help="folder of TOFU-format JSON/JSONL files, or a hub name (locuslab/TOFU; needs "
                        "`datasets` and network). Default: the built-in synthetic set")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------------------------
def _check_out(path: str) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gefx-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write to --out {path!r} ({exc.strerror or exc})") from None
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return dev


def _split_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


class Rows:
    """Pre-encoded rows of one split; ``batch(idx)`` trims padding to the batch's longest row."""

    def __init__(self, tokenizer, questions, answers, max_length, device):
        self.enc = gdata.encode(tokenizer, questions, answers, max_length=max_length)
        self.lengths = self.enc["attention_mask"].sum(1)
        self.device = device
        self.n = len(questions)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        T = int(self.lengths[idx].max())
        return {k: v[idx, :T].to(self.device) for k, v in self.enc.items()}


def _forward(model, batch, hidden: bool) -> gobj.Forward:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=hidden)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"the model's forward returns no logits ({type(out).__name__}); gefx profile needs "
                         f"a causal LM")
    return gobj.Forward(logits, batch["labels"], out.hidden_states if hidden else None)


@torch.no_grad()
def evaluate(model, rows: Rows) -> dict:
    """Token-mean answer NLL, teacher-forced token accuracy, and greedy extraction: the mean
    fraction of each gold answer (end-of-sequence token included) that greedy decoding reproduces
    as an exact prefix. Greedy decoding follows the gold answer exactly as long as every earlier
    token matched, so that prefix is the run of leading answer tokens whose teacher-forced argmax
    equals the label: one forward, no generation (ties aside)."""
    from .losses import token_nll

    b = rows.batch(list(range(rows.n)))
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    nll, mask = token_nll(logits, b["labels"])
    hit = (logits[:, :-1].argmax(-1) == b["labels"][:, 1:]) & mask
    miss = mask & ~hit
    first_answer = mask.float().argmax(1)
    # leading hits: answer tokens before the first miss (positions are contiguous per row)
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    first_miss = torch.where(miss, pos, torch.full_like(pos, mask.shape[1])).min(1).values
    n_ans = mask.sum(1).clamp(min=1)
    prefix = (first_miss - first_answer).clamp(min=0).minimum(n_ans)
    return {"nll": float(nll.sum() / mask.sum().clamp(min=1)),
            "token_acc": float(hit.sum() / mask.sum().clamp(min=1)),
            "extraction": float((prefix.float() / n_ans).mean())}


# --------------------------------------------------------------------------------------------
def run(args) -> dict:
    import gefx
    from .losses import token_mean_nll
    from .report import plot_all, summary_table, write_tables

    t_start = time.time()
    # validate everything cheap first -----------------------------------------------------------
    specs = _split_list(args.objectives)
    if not specs:
        raise ValueError("--objectives is empty")
    objs = [gobj.make(s) for s in specs]
    if len(set(specs)) != len(specs):
        raise ValueError("--objectives lists the same objective twice")
    risks = _split_list(args.risks)
    bad = [r for r in risks if r not in RISKS]
    if bad or not risks:
        raise ValueError(f"unknown risk(s) {', '.join(map(repr, bad)) or '(none given)'}; use forget, retain")
    if args.groups not in gefx.GROUP_PRESETS:
        raise ValueError(f"unknown groups {args.groups!r}; use one of {', '.join(gefx.GROUP_PRESETS)}")
    for name, v in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--every", args.every),
                    ("--eval-size", args.eval_size), ("--max-length", args.max_length)):
        if v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    gdata.parse_forget_split(args.forget_split)
    from .models import default_model, frozen_copy, load_model, parse_dtype
    dtype = parse_dtype(args.dtype)
    device = _device(args.device)
    out_dir = _check_out(args.out)
    progress = not args.no_progress

    # model and data ----------------------------------------------------------------------------
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    default_data = None
    if args.model is None:
        model, tok, default_data, info = default_model(device=device, dtype=dtype, progress=progress)
        model_name = f"default tiny Llama ({info['key']}, fine-tuned {info['epochs']} epochs, " \
                     f"forget10 answer accuracy {info['forget_answer_accuracy']:.3f})"
    else:
        model, tok = load_model(args.model, device=device, dtype=dtype)
        model_name = args.model
    if args.data is None and default_data is None:
        splits = gdata.generate()
        pct = gdata.parse_forget_split(args.forget_split)
        if args.forget_split not in splits:
            raise ValueError(f"the synthetic set has forget01, forget05, forget10; got {args.forget_split!r} "
                             f"(use --data for other splits)")
        data = gdata.QAData(splits[args.forget_split], splits[f"retain{100 - pct:02d}"], "synthetic",
                            args.forget_split, f"retain{100 - pct:02d}")
    else:
        data = gdata.load(args.data, args.forget_split, default_folder=str(default_data) if default_data else None)
    if args.batch_size > len(data.forget):
        raise ValueError(f"--batch-size {args.batch_size} is larger than the forget split "
                         f"({data.forget_split}: {len(data.forget)} rows)")
    if args.batch_size > len(data.retain):
        raise ValueError(f"--batch-size {args.batch_size} is larger than the retain split "
                         f"({data.retain_split}: {len(data.retain)} rows)")
    model.eval()  # no dropout: the G-effect is a property of the deterministic loss
    for p in model.parameters():
        p.requires_grad_(True)

    fq, fa = [r["question"] for r in data.forget], [r["answer"] for r in data.forget]
    rq, ra = [r["question"] for r in data.retain], [r["answer"] for r in data.retain]
    idk_a = [gdata.refusal_for(i, args.seed) for i in range(len(fq))]
    forget_rows = Rows(tok, fq, fa, args.max_length, device)
    retain_rows = Rows(tok, rq, ra, args.max_length, device)
    idk_rows = Rows(tok, fq, idk_a, args.max_length, device)
    rng = random.Random(args.seed)
    ev_f = sorted(rng.sample(range(len(fq)), min(args.eval_size, len(fq))))
    ev_r = sorted(rng.sample(range(len(rq)), min(args.eval_size, len(rq))))
    eval_sets = {"forget": Rows(tok, [fq[i] for i in ev_f], [fa[i] for i in ev_f], args.max_length, device),
                 "retain": Rows(tok, [rq[i] for i in ev_r], [ra[i] for i in ev_r], args.max_length, device)}
    # the same batches for every objective
    # (step k's batches do not depend on --steps: separate streams for forget and retain)
    f_rng, r_rng = np.random.default_rng([args.seed, 0]), np.random.default_rng([args.seed, 1])
    perm = []
    while len(perm) < args.steps * args.batch_size:
        perm += f_rng.permutation(len(fq)).tolist()
    f_idx = [perm[s * args.batch_size:(s + 1) * args.batch_size] for s in range(args.steps)]
    r_idx = [r_rng.choice(len(rq), size=args.batch_size, replace=False).tolist() for _ in range(args.steps)]

    # every objective starts from these weights (kept on the host: a 7B model's copy would not fit
    # beside the model, its frozen reference and the optimizer state on one GPU)
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ref_model = frozen_copy(model) if any(o.needs_ref for o in objs) else None

    rows: list[dict] = []
    metrics: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    group_names: list[str] = []
    measured = [s for s in range(args.steps) if s % args.every == 0]
    total_steps = len(objs) * args.steps
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, desc="gefx profile", disable=not progress, unit="step", file=sys.stderr)

    def eval_row(obj_label, step, extra=None):
        m = {"objective": obj_label, "step": step}
        for name, rws in eval_sets.items():
            e = evaluate(model, rws)
            m.update({f"{name}_nll": e["nll"], f"{name}_extraction": e["extraction"],
                      f"{name}_token_acc": e["token_acc"]})
        if extra:
            m.update(extra)
        return m

    for obj, label in zip(objs, specs):
        model.load_state_dict(init_state)
        torch.manual_seed(args.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay) if args.optimizer == "adamw"
               else torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay))
        per: dict[str, list] = {}
        need = set(obj.batches) | set(risks)
        bar.set_description(f"gefx profile [{label}]")
        for step in range(args.steps):
            batches = {"forget": forget_rows.batch(f_idx[step]), "retain": retain_rows.batch(r_idx[step]),
                       "idk": idk_rows.batch(f_idx[step])}
            ref = None
            if obj.ref_batches:
                with torch.no_grad():
                    ref = {b: _forward(ref_model, batches[b], b in obj.hidden) for b in obj.ref_batches}
            measure = step in measured
            extra = {}
            if measure:
                model.eval()
                with gefx.trace(model, params=opt.param_groups) as tape:
                    cur = {b: _forward(model, batches[b], b in obj.hidden) for b in need}
                    out = obj(cur, ref)
                    risk_vecs = {r: token_mean_nll(cur[r].logits, cur[r].labels) for r in risks}
                    res = gefx.g_effect(tape, out.for_g_effect(), risk_vecs, groups=args.groups)
                    loss = out.loss
                group_names = group_names or list(res.groups)
                for r in risks:
                    eff = res[r]
                    for g, v in eff.per_group.items():
                        rows.append({"objective": label, "step": step, "risk": r, "group": g, "value": v})
                    rows.append({"objective": label, "step": step, "risk": r, "group": "total", "value": eff.total})
                    per.setdefault(f"{r}__per_instance", []).append(eff.per_instance.detach().double().cpu().numpy())
                    per.setdefault(f"{r}__per_instance_group", []).append(
                        eff.per_instance_group.detach().double().cpu().numpy())
                    poi = eff.per_objective_instance
                    if poi is not None:
                        per.setdefault(f"{r}__per_objective_instance", []).append(poi.detach().double().cpu().numpy())
                    extra[f"batch_{r}_nll"] = float(risk_vecs[r].detach().sum())
                per.setdefault("steps", []).append(step)
                per.setdefault("forget_rows", []).append(np.array(f_idx[step]))
                per.setdefault("retain_rows", []).append(np.array(r_idx[step]))
                postfix = {f"e_{r[0]}": f"{res[r].total:.3g}" for r in risks}
            else:
                cur = {b: _forward(model, batches[b], b in obj.hidden) for b in obj.batches}
                out = obj(cur, ref)
                loss = out.loss
            weights = out.weight_means()
            if measure:
                extra["loss"] = float(loss.detach())
                extra.update({f"weight:{k}": v for k, v in weights.items()})
                metrics.append(eval_row(label, step, extra))
            if not torch.isfinite(loss):
                raise RuntimeError(f"{label}: the objective became {float(loss)} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            if measure:
                bar.set_postfix(postfix, refresh=False)
        metrics.append(eval_row(label, args.steps))
        for k, v in per.items():
            arrays[f"{label}__{k}"] = np.stack([np.asarray(x) for x in v])
    bar.close()

    meta = {"objectives": specs, "steps": args.steps, "lr": args.lr, "optimizer": args.optimizer,
            "weight_decay": args.weight_decay, "batch_size": args.batch_size, "every": args.every,
            "forget_split": data.forget_split, "retain_split": data.retain_split, "risks": risks,
            "risk_definition": "gefx.losses.token_mean_nll (sums to the batch's token-mean answer NLL)",
            "groups": args.groups, "group_names": group_names, "seed": args.seed, "device": str(device),
            "dtype": args.dtype, "model": model_name, "data": data.source,
            "n_forget": len(data.forget), "n_retain": len(data.retain),
            "reading": "e < 0 on the forget risk = removal; e < 0 on the retain risk = damage "
                       "(one SGD step changes R by about -lr * e)"}
    write_tables(out_dir, meta, rows, metrics, arrays)
    paths = []
    if not args.no_plots:
        paths = plot_all(out_dir, rows, metrics, arrays, specs, risks, group_names, MAIN_WEIGHT)
    main_w = {}
    for o, label in zip(objs, specs):
        b = o.base if isinstance(o, gobj.Combined) else o
        main_w[label] = MAIN_WEIGHT.get(b.name)
    table = summary_table(rows, metrics, specs, risks, main_w)
    elapsed = time.time() - t_start
    print(f"gefx profile: {model_name}\n  data {data.source} ({data.forget_split}: {len(data.forget)} rows, "
          f"{data.retain_split}: {len(data.retain)} rows); {args.steps} steps, {args.optimizer} lr {args.lr:g}, "
          f"batch {args.batch_size}, G-effects every {args.every} step(s), groups {args.groups!r}, {device}/{args.dtype}")
    print("  G-effect e = <grad risk, grad objective>: e_f < 0 removes (forget risk rises), "
          "e_r < 0 damages retained knowledge")
    print(table)
    print(f"wrote {out_dir}/g_effects.csv, g_effects.json, metrics.csv, metrics.json, per_instance.npz"
          + ("".join(f", {p.name}" for p in paths)) + f"  ({elapsed:.0f} s)")
    return {"rows": rows, "metrics": metrics, "arrays": arrays, "meta": meta, "table": table, "out": out_dir}


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run(args)
    return 0
