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
per objective instance (PG-effect). It measures in online mode (``backward=True``): the step's own
backward gives the objective's gradient (in the parameters' dtype), so a measured step costs one
partial backward per risk the step cannot give at most; records are kept by the Recorder the
integrations use (gefx.integrations.records), which appends each to <out>/records.jsonl as it is
made (a new log per run): a profile killed midway keeps every completed measurement. The risks
are the reference code's token-mean answer NLL (gefx.losses.token_mean_nll: each vector sums to
the batch's mean NLL). At the same steps and after the last one the forget / retain NLL, greedy
extraction and token accuracy of fixed evaluation subsets are recorded. Outputs: see gefx.report.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as gdata
from . import objectives as gobj
from ..effects import RiskEffect
from ..geffect import g_effect
from ..groups import PRESETS as GROUP_PRESETS
from ..integrations.records import Recorder
from ..losses import token_mean_nll, token_nll
from .models import default_model, frozen_copy, load_model, parse_dtype
from .objectives import forward
from .report import fidelity, instance_arrays, plot_all, plot_tokens, summary_table, write_tables
from ..tape import trace
from ..forward_ad import jvp
from ..update import update

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
    p.add_argument("--lr-sweep", default="", help="comma-separated learning rates: run every objective at each "
                   "(labels name@lr=x), e.g. 3e-5,3e-4,3e-3 to see where first-order predictions break down")
    p.add_argument("--retain-eval", type=int, default=0, help="also measure, at each measured step, the retaining "
                   "G-effect over this many retain rows (the whole-set risk; 0: off)")
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


@torch.no_grad()
def evaluate(model, rows: Rows) -> dict:
    """Token-mean answer NLL, teacher-forced token accuracy, and greedy extraction: the mean
    fraction of each gold answer (end-of-sequence token included) that greedy decoding reproduces
    as an exact prefix. Greedy decoding follows the gold answer exactly as long as every earlier
    token matched, so that prefix is the run of leading answer tokens whose teacher-forced argmax
    equals the label: one forward, no generation (ties aside)."""
    b = rows.batch(list(range(rows.n)))
    logits = forward(model, b).logits
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
@dataclass
class Plan:
    """The encoded splits and, per step, the rows each batch takes: the same for every objective
    (step k's batches do not depend on --steps: separate streams for forget and retain)."""
    forget: Rows
    retain: Rows
    idk: Rows                      # the forget questions with refusal answers (PO, DPO)
    evals: dict[str, Rows]         # fixed evaluation subsets of both splits
    forget_idx: list[list[int]]
    retain_idx: list[list[int]]
    retain_eval: Rows | None = None  # --retain-eval rows of the retain split (the whole-set risk)

    def batches(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        return {"forget": self.forget.batch(self.forget_idx[step]), "retain": self.retain.batch(self.retain_idx[step]),
                "idk": self.idk.batch(self.forget_idx[step])}


def make_plan(args, tok, data: gdata.QAData, device) -> Plan:
    fq, fa = [r["question"] for r in data.forget], [r["answer"] for r in data.forget]
    rq, ra = [r["question"] for r in data.retain], [r["answer"] for r in data.retain]
    idk_a = [gdata.refusal_for(i, args.seed) for i in range(len(fq))]
    rng = random.Random(args.seed)
    ev_f = sorted(rng.sample(range(len(fq)), min(args.eval_size, len(fq))))
    ev_r = sorted(rng.sample(range(len(rq)), min(args.eval_size, len(rq))))
    evals = {"forget": Rows(tok, [fq[i] for i in ev_f], [fa[i] for i in ev_f], args.max_length, device),
             "retain": Rows(tok, [rq[i] for i in ev_r], [ra[i] for i in ev_r], args.max_length, device)}
    f_rng, r_rng = np.random.default_rng([args.seed, 0]), np.random.default_rng([args.seed, 1])
    perm: list[int] = []
    while len(perm) < args.steps * args.batch_size:
        perm += f_rng.permutation(len(fq)).tolist()
    forget_idx = [perm[s * args.batch_size:(s + 1) * args.batch_size] for s in range(args.steps)]
    retain_idx = [r_rng.choice(len(rq), size=args.batch_size, replace=False).tolist() for _ in range(args.steps)]
    ev_whole = sorted(rng.sample(range(len(rq)), min(args.retain_eval, len(rq))))
    whole = Rows(tok, [rq[i] for i in ev_whole], [ra[i] for i in ev_whole], args.max_length, device) if ev_whole else None
    return Plan(Rows(tok, fq, fa, args.max_length, device), Rows(tok, rq, ra, args.max_length, device),
                Rows(tok, fq, idk_a, args.max_length, device), evals, forget_idx, retain_idx, whole)


@dataclass
class Session:
    """What every objective's run shares: the model, its frozen reference, the plan, the outputs."""
    args: argparse.Namespace
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    plan: Plan
    risks: list[str]
    lr_of: dict[str, float]        # run label -> learning rate
    bar: object
    tokenizer: object = None
    recorder: Recorder = field(default_factory=Recorder)
    metrics: list[dict] = field(default_factory=list)
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # run label -> per-token predicted change


def run(args) -> dict:
    """The main job: validate, load, unlearn with each objective from the same weights, report."""
    t_start = time.time()
    specs, objs, risks, lr_of = _validate(args)
    device, progress = _device(args.device), not args.no_progress
    out_dir = _check_out(args.out)
    model, tok, data, model_name = _load(args, device, progress)
    plan = make_plan(args, tok, data, device)
    # every objective starts from these weights (kept on the host: a 7B model's copy would not fit
    # beside the model, its frozen reference and the optimizer state on one GPU)
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ref_model = frozen_copy(model) if any(o.needs_ref for o in objs) else None
    from tqdm.auto import tqdm
    bar = tqdm(total=len(objs) * args.steps, desc="gefx profile", disable=not progress, unit="step", file=sys.stderr)
    session = Session(args, model, ref_model, plan, risks, lr_of, bar, tok, Recorder(out_dir, resume=False))
    for obj, label in zip(objs, specs):
        model.load_state_dict(init_state)
        unlearn(session, obj, label)
    bar.close()
    return _report(session, specs, objs, data, model_name, device, out_dir, time.time() - t_start)


def _validate(args) -> tuple[list[str], list, list[str], dict[str, float]]:
    """Everything cheap first: objectives, risks, groups, numbers, the forget split's name."""
    names = _split_list(args.objectives)
    if not names:
        raise ValueError("--objectives is empty")
    if len(set(names)) != len(names):
        raise ValueError("--objectives lists the same objective twice")
    lrs = [_positive_lr(x) for x in _split_list(args.lr_sweep)] if args.lr_sweep else [args.lr]
    specs = [f"{n}@lr={lr:g}" if args.lr_sweep else n for lr in lrs for n in names]
    objs = [gobj.make(n) for lr in lrs for n in names]
    lr_of = {label: lr for label, lr in zip(specs, [lr for lr in lrs for _ in names])}
    risks = _split_list(args.risks)
    bad = [r for r in risks if r not in RISKS]
    if bad or not risks:
        raise ValueError(f"unknown risk(s) {', '.join(map(repr, bad)) or '(none given)'}; use forget, retain")
    if args.groups not in GROUP_PRESETS:
        raise ValueError(f"unknown groups {args.groups!r}; use one of {', '.join(GROUP_PRESETS)}")
    for name, v in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--every", args.every),
                    ("--eval-size", args.eval_size), ("--max-length", args.max_length)):
        if v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
    _positive_lr(args.lr)
    if args.retain_eval < 0:
        raise ValueError(f"--retain-eval must be 0 or more, got {args.retain_eval}")
    gdata.parse_forget_split(args.forget_split)
    parse_dtype(args.dtype)
    return specs, objs, risks, lr_of


def _positive_lr(x) -> float:
    try:
        lr = float(x)
    except ValueError:
        raise ValueError(f"learning rate {x!r} is not a number") from None
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"a learning rate must be a positive number, got {x}")
    return lr


def _load(args, device, progress: bool):
    """(model, tokenizer, data, model description): the default tiny model and its synthetic set,
    or --model / --data. The model is put in eval mode (no dropout: the G-effect is a property of
    the deterministic loss) with every parameter trainable."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    dtype = parse_dtype(args.dtype)
    default_data = None
    if args.model is None:
        model, tok, default_data, info = default_model(device=device, dtype=dtype, progress=progress)
        model_name = f"default tiny Llama ({info['key']}, fine-tuned {info['epochs']} epochs, " \
                     f"forget10 answer accuracy {info['forget_answer_accuracy']:.3f})"
    else:
        model, tok = load_model(args.model, device=device, dtype=dtype)
        model_name = args.model
    data = _load_data(args, default_data)
    for split, rows in (("forget", data.forget), ("retain", data.retain)):
        if args.batch_size > len(rows):
            raise ValueError(f"--batch-size {args.batch_size} is larger than the {split} split "
                             f"({getattr(data, split + '_split')}: {len(rows)} rows)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tok, data, model_name


def _load_data(args, default_data) -> gdata.QAData:
    if args.data is None and default_data is None:  # a model by name, no data: the synthetic set
        splits = gdata.generate()
        pct = gdata.parse_forget_split(args.forget_split)
        if args.forget_split not in splits:
            raise ValueError(f"the synthetic set has forget01, forget05, forget10; got {args.forget_split!r} "
                             f"(use --data for other splits)")
        return gdata.QAData(splits[args.forget_split], splits[f"retain{100 - pct:02d}"], "synthetic",
                            args.forget_split, f"retain{100 - pct:02d}")
    return gdata.load(args.data, args.forget_split, default_folder=str(default_data) if default_data else None)


# --------------------------------------------------------------------------------------------
def unlearn(session: Session, obj, label: str) -> None:
    """One objective's run from the current weights: --steps steps, G-effects and metrics at the
    measured ones, metrics after the last."""
    args, lr = session.args, session.lr_of[label]
    torch.manual_seed(args.seed)
    params = [p for p in session.model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay) if args.optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr, weight_decay=args.weight_decay))
    session.bar.set_description(f"gefx profile [{label}]")
    for step in range(args.steps):
        measured = step_once(session, obj, label, opt, step)
        if measured is not None:  # metrics of the weights the step started from
            effects, before, extra = measured
            if args.retain_eval:
                effects.update(retain_eval(session, effects, opt))
            if step == 0:
                session.tokens[label] = token_changes(session, opt)
            session.metrics.append(_eval_row(session, label, step, extra))
        opt.step()
        if measured is not None:
            after = risk_values(session, step)
            session.recorder.add(step, effects, objective=label, actual_change={r: after[r] - before[r] for r in before},
                                 data_rows={"forget": session.plan.forget_idx[step],
                                            "retain": session.plan.retain_idx[step]})
            session.bar.set_postfix({f"e_{r[0]}": f"{effects[r].total:.3g}" for r in session.risks}, refresh=False)
        session.bar.update(1)
    session.metrics.append(_eval_row(session, label, args.steps))


def retain_eval(session: Session, effects, opt) -> dict:
    """{"retain_eval": RiskEffect}: the retaining G-effect of the step's objective over the whole
    --retain-eval set (risk: the token-mean NLL over all its rows, one instance per row), streamed
    batch by batch through the per-sample engine against the step's gradient (``.grad`` after its
    backward), with each row's predicted change along the optimizer's coming update."""
    from tqdm.auto import tqdm

    rows, model, size = session.plan.retain_eval, session.model, 4 * session.args.batch_size
    grads = {p: p.grad for p in model.parameters() if p.grad is not None}
    delta = update(opt)
    n_tokens = rows.enc["labels"][:, 1:].ne(-100).sum().clamp(min=1)
    parts = []
    for start in tqdm(range(0, rows.n, size), desc="retain eval", leave=False, file=sys.stderr,
                      disable=session.args.no_progress):
        b = rows.batch(list(range(start, min(rows.n, start + size))))
        with trace(model, params=opt.param_groups) as tape:
            nll, _ = token_nll(forward(model, b).logits, b["labels"])
            eff = g_effect(tape, grads, {"retain_eval": nll.sum(1) / n_tokens}, groups=session.args.groups,
                           direction=delta, norms=True)
        parts.append(eff["retain_eval"])
    return {"retain_eval": RiskEffect.concat(parts)}


TOKEN_ROWS = 3  # forget answers shown in tokens.png


def token_changes(session: Session, opt) -> np.ndarray:
    """[TOKEN_ROWS, T-1]: for the first forget rows of step 0's batch, each answer token's predicted
    NLL change over the coming update (gefx.jvp of the per-token NLL along it; NaN off the answer):
    positive = the objective pushes that token down."""
    b = session.plan.forget.batch(session.plan.forget_idx[0][:TOKEN_ROWS])
    (_, mask), (deriv, _) = jvp(session.model, lambda m: token_nll(forward(m, b).logits, b["labels"]), update(opt))
    return torch.where(mask, deriv, torch.nan).double().cpu().numpy()


@torch.no_grad()
def risk_values(session: Session, step: int) -> dict[str, torch.Tensor]:
    """The step's risk vectors at the current weights (eval mode, no graph)."""
    batches = session.plan.batches(step)
    return {r: token_mean_nll(forward(session.model, batches[r]).logits, batches[r]["labels"]).double().cpu()
            for r in session.risks}


def step_once(session: Session, obj, label: str, opt, step: int):
    """The step's forwards, objective and backward (``.grad`` set, the update left to the caller).
    On a measured step the forwards run inside ``gefx.trace`` and ``g_effect(..., backward=True,
    optimizer=opt)`` runs the backward itself (online mode) and gives the G-effects and each risk
    instance's predicted change over the coming update; returns (effects, the risk vectors before
    the step, extra metrics), None on other steps. The backward is of ``for_g_effect().sum()`` on
    every step, so measuring never changes the training."""
    model, batches = session.model, session.plan.batches(step)
    ref = None
    if obj.ref_batches:
        with torch.no_grad():
            ref = {b: forward(session.ref_model, batches[b], b in obj.hidden) for b in obj.ref_batches}
    opt.zero_grad(set_to_none=True)
    if step % session.args.every:
        out = obj({b: forward(model, batches[b], b in obj.hidden) for b in obj.batches}, ref)
        _check_finite(out.loss, label, step)
        out.for_g_effect().sum().backward()
        return None
    with trace(model, params=opt.param_groups) as tape:
        cur = {b: forward(model, batches[b], b in obj.hidden) for b in set(obj.batches) | set(session.risks)}
        out = obj(cur, ref)
        _check_finite(out.loss, label, step)
        risks = {r: token_mean_nll(cur[r].logits, cur[r].labels) for r in session.risks}
        objective = out.for_g_effect()
        effects = g_effect(tape, objective, risks, groups=session.args.groups, backward=True,
                           optimizer=opt, norms=True, objective_instances=objective.dim() == 1)
    extra = {f"batch_{r}_nll": float(v.detach().sum()) for r, v in risks.items()}
    extra["loss"] = float(out.loss.detach())
    extra.update({f"weight:{k}": v for k, v in out.weight_means().items()})
    return effects, {r: v.detach().double().cpu() for r, v in risks.items()}, extra


def _check_finite(loss: torch.Tensor, label: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise RuntimeError(f"{label}: the objective became {float(loss)} at step {step}; lower --lr")


def _eval_row(session: Session, label: str, step: int, extra: dict | None = None) -> dict:
    row = {"objective": label, "step": step}
    for name, rows in session.plan.evals.items():
        e = evaluate(session.model, rows)
        row.update({f"{name}_nll": e["nll"], f"{name}_extraction": e["extraction"], f"{name}_token_acc": e["token_acc"]})
    row.update(extra or {})
    return row


# --------------------------------------------------------------------------------------------
def _report(session: Session, specs, objs, data, model_name, device, out_dir: Path, elapsed: float) -> dict:
    """Write the tables and plots (gefx.report) and print the summary."""
    args, risks = session.args, session.risks
    rows = session.recorder.rows()
    arrays = instance_arrays(session.recorder.records)
    arrays.update({f"{label}__token_change": v for label, v in session.tokens.items()})
    group_names = session.recorder.records[0][2].groups if session.recorder.records else []
    meta = {"objectives": specs, "steps": args.steps, "lr": args.lr, "lr_of": session.lr_of, "optimizer": args.optimizer,
            "weight_decay": args.weight_decay, "batch_size": args.batch_size, "every": args.every,
            "forget_split": data.forget_split, "retain_split": data.retain_split, "risks": risks,
            "risk_definition": "gefx.losses.token_mean_nll (sums to the batch's token-mean answer NLL)",
            "groups": args.groups, "group_names": group_names, "seed": args.seed, "device": str(device),
            "dtype": args.dtype, "model": model_name, "data": data.source,
            "n_forget": len(data.forget), "n_retain": len(data.retain),
            "retain_eval": args.retain_eval,
            "fidelity": {label: fidelity(arrays, label, risks) for label in specs},
            "reading": "e < 0 on the forget risk = removal; e < 0 on the retain risk = damage "
                       "(one SGD step changes R by about -lr * e); predicted_change = <grad r_i, delta theta> "
                       "for the optimizer's actual update, actual_change = r_i after the step minus before"}
    write_tables(out_dir, meta, rows, session.metrics, arrays)
    paths = [] if args.no_plots else plot_all(out_dir, rows, session.metrics, arrays, specs, risks, group_names)
    if session.tokens and not args.no_plots:
        b = session.plan.forget.batch(session.plan.forget_idx[0][:TOKEN_ROWS])
        paths.append(plot_tokens(out_dir, session.tokens, b["input_ids"], b["labels"], session.tokenizer))
    main_w = {label: MAIN_WEIGHT.get((o.base if isinstance(o, gobj.Combined) else o).name)
              for o, label in zip(objs, specs)}
    table = summary_table(rows, session.metrics, specs, risks, main_w)
    print(f"gefx profile: {model_name}\n  data {data.source} ({data.forget_split}: {len(data.forget)} rows, "
          f"{data.retain_split}: {len(data.retain)} rows); {args.steps} steps, {args.optimizer} lr {args.lr:g}, "
          f"batch {args.batch_size}, G-effects every {args.every} step(s), groups {args.groups!r}, {device}/{args.dtype}")
    print("  G-effect e = <grad risk, grad objective>: e_f < 0 removes (forget risk rises), "
          "e_r < 0 damages retained knowledge")
    print(table)
    fid = {label: fidelity(arrays, label, risks) for label in specs}
    if any(fid.values()):
        print("  first-order fidelity (predicted <grad r_i, delta theta> vs actual change over each measured step): "
              + "; ".join(f"{label} r={f['corr']:.3f}, rel. error {f['rel_err']:.2g}"
                          for label, f in fid.items() if f))
    print(f"wrote {out_dir}/g_effects.csv, g_effects.json, metrics.csv, metrics.json, per_instance.npz"
          + "".join(f", {p.name}" for p in paths) + f"  ({elapsed:.0f} s)")
    return {"rows": rows, "metrics": session.metrics, "arrays": arrays, "meta": meta, "table": table, "out": out_dir}


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run(args)
    return 0
