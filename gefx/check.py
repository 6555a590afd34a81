"""`gefx.check`: a self-test of gefx on a user's own model, against brute-force per-sample autograd.

    report = gefx.check(model)          # or gefx.check(model, batch={"input_ids": ..., ...})
    print(report)                       # per module kind: rule, exact / refused, worst error
    assert report.ok

On a few samples it computes, per counted parameter, every sample's squared gradient norm and its
inner product with the gradient of an objective (a second batch's summed NLL minus the first
batch's per-sample NLLs weighted by powers of two, as GA weights the forget NLL), once with gefx
(``grad_dots``, ``g_effect`` and ``g_effect(..., backward=True)``, where the step's own backward
serves the first batch's risk: see ``gefx.step``) and once by autograd one sample at a time
(streaming: two gradient-sized buffers), in eval and train mode. It runs on a float64 copy of the model when that
fits in memory, else on the model itself. A refusal names parameters; check measures the rest
without them and lists the refused ones with gefx's reason.

Tolerance (:func:`tolerance`): a per-entry bound relative to S = sum_k |x_k y_k|, the sum of the
magnitudes of the products forming the entry (x, y: the two gradients over one parameter). gefx
forms each entry from the very activations and output gradients autograd uses, accumulating in
float32 (float64 for float64 models) in another order: at most ~64 roundoffs u_acc of S for these
sizes. The oracle rounds each gradient entry to the model's dtype once (relative error u_model,
autograd accumulating in float32 inside), so a product of two entries is off by up to 2 u_model
and the sum by 2 u_model S; twice that is the budget: tol = 4 u_model + 64 u_acc, i.e. 4.1e-6
(float32), 1.6e-2 (bfloat16), 2.0e-3 (float16). In a float64 model or copy, HF modules still compute some
parts in float32 (RMSNorm upcasts its input): there both sides carry float32 sums over a sample's
tokens (gamma_T ~ T 2^-24), so the float64 budget is 1e-6 for T <= 16 (the default batch has 12
tokens per row); everywhere else the
errors are float64 roundoff (~1e-15), which the report shows. A dropped parameter contribution or
a wrong factor moves an entry by a fraction of S far above any of these. A gradient that vanishes
in exact arithmetic (a key projection's bias under softmax) is roundoff noise on both sides, so
each entry is also allowed u_model times the largest S of its sample (``relative_error``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpointing
from .geffect import g_effect
from .dots import grad_dots
from .losses import sequence_nll
from .memory import footprint
from .rules import CHECKED, Refused
from .tape import trace


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance (of S = sum |x_k y_k|) for models of `dtype` (module docstring)."""
    if dtype == torch.float64:
        return 1e-6
    u_model = torch.finfo(dtype).eps / 2
    return 4 * u_model + 64 * torch.finfo(torch.float32).eps / 2


def relative_error(got, ref: torch.Tensor, mag: torch.Tensor, top: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - ref| / (mag + u top) per entry: the error in units of S = mag = sum_k |x_k y_k|, with
    a floor of u_model times the largest S of the same sample over all parameters (`top`): a
    gradient that vanishes in exact arithmetic (a key bias under softmax) is roundoff noise on
    both sides, of that order."""
    u = torch.finfo(dtype).eps / 2
    got = torch.as_tensor(got, dtype=torch.float64)
    return (got - ref).abs() / (mag + u * top).clamp(min=torch.finfo(torch.float64).tiny)


@dataclass
class Row:
    mode: str
    kind: str                     # module class name (a refused parameter: its name)
    rule: str                     # the rule gefx used ("generic" after a failed verification: "generic (fallback)")
    params: int
    status: str                   # "exact", "refused" or "WRONG"
    error: float = 0.0            # worst |gefx - oracle| / S over its parameters, samples and quantities
    reason: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    dtype: torch.dtype = torch.float64
    tol: float = 0.0
    notes: list[str] = field(default_factory=list)
    memory: dict | None = None    # gefx.memory.footprint on the model itself (bytes)

    @property
    def ok(self) -> bool:
        """No wrong number: every parameter exact or refused."""
        return all(r.status != "WRONG" for r in self.rows)

    def __str__(self) -> str:
        head = f"gefx check: {str(self.dtype).replace('torch.', '')}, tolerance {self.tol:.2g} of sum |x y| per entry"
        lines = [head, *self.notes,
                 f"{'mode':10}  {'module kind':32}  {'rule':20}  {'params':>6}  {'status':7}  worst error"]
        for r in self.rows:
            lines.append(f"{r.mode:10}  {r.kind[:32]:32}  {r.rule[:20]:20}  {r.params:6d}  {r.status:7}  "
                         + (f"{r.error:.2e}" if r.status != "refused" else r.reason[:200]))
        if self.memory:
            m, mib = self.memory, 2 ** 20
            lines.append(f"memory (tensors, the model's dtype, this batch): a plain step peaks at {m['plain'] / mib:.1f} MiB; "
                         f"measured online +{(m['steady'] - m['plain']) / mib:.1f} MiB "
                         f"(first measurement: +{(m['first'] - m['plain']) / mib:.1f} MiB, with the one-time checks); "
                         f"largest parameter {m['largest_param'] / mib:.1f} MiB, all counted {m['params'] / mib:.1f} MiB")
        lines.append("ok: every counted parameter exact or refused" if self.ok else
                     "NOT OK: gefx gave a wrong number for the rows marked WRONG (please report it)")
        return "\n".join(lines)


def example_batch(model: nn.Module, samples: int = 3, length: int = 12, seed: int = 0) -> dict:
    """input_ids / attention_mask / labels of random tokens (right padding, a 3-token question),
    for any model with an input embedding."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else \
        next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError("gefx.check needs a batch for a model without an input embedding: "
                         "gefx.check(model, batch={'input_ids': ..., 'attention_mask': ..., 'labels': ...})")
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (samples, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100
    for i in range(1, samples):
        pad = 1 + (i % 3)
        mask[i, length - pad:] = 0
        labels[i, length - pad:] = -100
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}


def _fits_float64(model: nn.Module) -> bool:
    need = 4 * 8 * sum(p.numel() for p in model.parameters())  # copy, .grad, two oracle buffers
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return need < 0.5 * torch.cuda.mem_get_info(dev)[0]
    try:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return need < 0.5 * free


def _losses(model, a: dict, b: dict):
    def nll(batch):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return sequence_nll(out if isinstance(out, torch.Tensor) else out.logits, batch["labels"])
    return nll(a), nll(b)


def _objective(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """sum(b) - sum_i 2^i a_i: powers of two (>= 1, as float16 needs) make the step's per-sample
    gradients exactly the risk's times them, so that the online mode's served risk is held to the
    same bound as the rest (other factors round differently: gefx/step.py)."""
    return lb.sum() - (2.0 ** torch.arange(la.shape[0], dtype=la.dtype, device=la.device) * la).sum()


def _oracle(model, params: dict, a: dict, b: dict):
    """Per parameter: [samples] squared norms and inner products with the objective's gradient,
    each with its magnitude sum S, by autograd one sample at a time."""
    with checkpointing.rerouted():  # reentrant checkpoints as in a trace (torch.autograd.grad refuses them)
        la, lb = _losses(model, a, b)
    names, tensors = list(params), list(params.values())
    gb = torch.autograd.grad(_objective(la, lb), tensors, retain_graph=True, allow_unused=True)
    out = {n: torch.zeros(4, la.shape[0], dtype=torch.float64) for n in names}
    for i in range(la.shape[0]):
        gi = torch.autograd.grad(la[i], tensors, retain_graph=True, allow_unused=True)
        for n, x, y in zip(names, gi, gb):
            if x is None:
                continue
            x = x.detach().double().flatten()
            y = torch.zeros_like(x) if y is None else y.detach().double().flatten()
            out[n][:, i] = torch.stack([(x * x).sum(), (x * x).sum(), (x * y).sum(), (x.abs() * y.abs()).sum()])
    return out


def _gefx(model, params: dict, a: dict, b: dict, online: bool):
    """Per parameter: [samples] squared norms and inner products with the objective's gradient, by gefx."""
    with trace(model, params=list(params.values())) as tape:
        la, lb = _losses(model, a, b)
        norms = grad_dots(tape, la, groups="param").per_param
        if online:
            saved = {n: p.grad for n, p in params.items()}
            for p in params.values():
                p.grad = None
            try:
                eff = g_effect(tape, _objective(la, lb), {"a": la}, groups="param", backward=True)["a"]
            finally:
                for n, p in params.items():
                    p.grad = saved[n]
        else:
            eff = g_effect(tape, _objective(la, lb), {"a": la}, groups="param")["a"]
        dots = dict(zip(eff.groups, eff.per_instance_group))
        rules = {c: tape.rules[m] for m, names in tape.owned.items() for _, c in names}
        kinds: dict[str, list[str]] = {}
        for m, names in tape.owned.items():
            for _, c in names:  # a tied parameter: every kind of module that uses it
                kinds.setdefault(c, []).append(type(m).__name__)
        kinds = {c: "+".join(dict.fromkeys(k)) for c, k in kinds.items()}
        modules = {c: m for m, names in tape.owned.items() for _, c in names}
    return norms, dots, rules, kinds, modules


def _rule_name(rule, module) -> str:
    if rule.exact:
        return rule.name
    verdicts = [v for (name, _), v in CHECKED.get(module, {}).items() if name == rule.name]
    return rule.name if all(v.exact for v in verdicts) else f"generic (not {rule.name})"


def _mode(model, params, a, b, mode: str, tol: float, rows: list, online: bool) -> None:
    todo, refused = dict(params), {}
    while todo:
        try:
            torch.manual_seed(0)  # the same dropout masks for gefx's forward and the oracle's
            norms, dots, rules, kinds, modules = _gefx(model, todo, a, b, online)
            break
        except Refused as exc:
            names = [n for n in exc.names if n in todo] or list(todo)
            for n in names:
                refused[n] = str(exc)
                del todo[n]
    else:
        norms = dots = {}
    torch.manual_seed(0)
    ref = _oracle(model, todo, a, b) if todo else {}
    groups: dict[tuple, Row] = {}
    dtype = next(iter(params.values())).dtype
    top = [torch.stack([ref[n][k] for n in todo]).amax(0) if todo else None for k in (1, 3)]
    for n in todo:
        o = ref[n]
        err = max(float(relative_error(norms.get(n, 0), o[0], o[1], top[0], dtype).max()),
                  float(relative_error(dots.get(n, 0), o[2], o[3], top[1], dtype).max()))
        key = (kinds[n], _rule_name(rules[n], modules[n]))
        row = groups.setdefault(key, Row(mode, *key, 0, "exact"))
        row.params += 1
        row.error = max(row.error, err)
        row.status = "exact" if row.error <= tol else "WRONG"
    for n, why in refused.items():
        line = next((x.strip(" -") for x in why.splitlines() if f"`{n}`" in x), why.splitlines()[0])
        rows_key = (n, line)
        groups[rows_key] = Row(mode, n, "-", 1, "refused", reason=line)
    rows.extend(groups.values())


def check(model: nn.Module, batch: dict | None = None, *, modes=("eval", "train"), samples: int = 3,
          float64: bool | None = None, params=None) -> Report:
    """Compare gefx with brute-force per-sample autograd on `model` (see the module docstring).

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...).logits``), left unchanged.
        batch: {"input_ids", "attention_mask", "labels"} with at least 2 rows (default: random
            tokens, ``example_batch``); its first half and second half are the two batches.
        modes: "eval" and/or "train" (dropout active; the same masks for gefx and the oracle).
        float64: measure a float64 copy (default: when it fits in memory).
        params: the parameters to count (default: those with requires_grad).
    """
    if batch is None:
        a, b = example_batch(model, samples, seed=0), example_batch(model, samples, seed=1)
    else:
        k = batch["input_ids"].shape[0] // 2
        if k < 1:
            raise ValueError("gefx.check needs a batch of at least 2 rows")
        a = {n: v[:k] for n, v in batch.items()}
        b = {n: v[k:] for n, v in batch.items()}
    was_training = model.training
    use64 = _fits_float64(model) if float64 is None else float64
    target = model
    notes = []
    dtype = next(model.parameters()).dtype
    if use64 and dtype != torch.float64:
        target = copy.deepcopy(model).to(torch.float64)
        try:
            with torch.no_grad():
                _losses(target, a, b)
            dtype = torch.float64
        except Exception as exc:  # noqa: BLE001 - e.g. kernels without float64: measure the model itself
            notes.append(f"(float64 copy not runnable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}; "
                         "measured in the model's dtype)")
            target, use64 = model, False
    chosen = [n for n, p in model.named_parameters()
              if (p.requires_grad if params is None else any(p is q for q in params))]
    counted = {n: dict(target.named_parameters())[n] for n in chosen}
    tol = tolerance(dtype)
    report = Report(dtype=dtype, tol=tol, notes=notes)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):  # the caller's random state is left as it was
            for mode in modes:
                target.train(mode == "train")
                for online in (False, True):
                    _mode(target, counted, a, b, mode + ("+step" if online else ""), tol, report.rows, online)
            report.memory = _footprint(model, a, b, report.notes)
    finally:
        model.train(was_training)
    return report


def _footprint(model, a: dict, b: dict, notes: list) -> dict | None:
    """gefx.memory.footprint on the model itself in train mode, or a note saying why not."""
    model.train(True)
    try:
        return footprint(model, a, b)
    except Exception as exc:  # noqa: BLE001 - a refused model: the rows above say why
        notes.append(f"(memory not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
        return None
