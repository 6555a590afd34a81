"""Unlearning objectives as per-sample vectors (docs/METHOD.md §2), with the weights the paper discusses.

Every objective returns an :class:`ObjectiveOutput` whose ``parts`` are per-sample vectors; their
sums add up to the batch objective (the loss that is minimised), with the normalisation of the
reference code (tmlr-group/G-effect) except for KL's default:

- token-mean objectives (GA, WGA, TNPO, WTNPO, PO, the GD/NLL regulariser, KL, RMU, RR) divide each
  sample's sum over its answer tokens by the number of valid answer tokens of the WHOLE batch, so
  the vector sums to the batch's token mean (what a Hugging Face model returns as ``loss``);
- KL: by default over the answer positions as above; the reference code averages it over all
  B x T positions of the retain batch instead, question and padding included
  (``kl_div(..., reduction="batchmean")`` of the flattened, unshifted log-probabilities): that is
  ``kl:positions=all``, which gives the reference's KL values (other values than the default);
- sequence-level objectives (NPO, SimNPO, DPO) are a mean over the batch's sequences: entry s is
  the sequence's loss divided by the batch size.

Answer tokens are the positions whose label is not -100 (question and padding are masked); token
log-probabilities use the usual causal shift (logits[:, t] predicts labels[:, t+1]).
Hidden-state objectives (RMU, RR) average over the positions t whose own label is an answer token,
i.e. ``labels[:, t] != -100`` (no shift), and index ``hidden_states`` as Hugging Face returns it
with ``output_hidden_states=True``: ``hidden_states[0]`` is the embedding output,
``hidden_states[l]`` the output of decoder layer l (1-based), and the last entry is the final
layer's output (after the final norm in HF Llama).

Unified view: the gradient of every GA-family objective is ``sum_s sum_i c_si grad log p_si`` (in
the minimised loss: ``-`` sign folded in, loss gradient = ``sum c grad log p``), with
c = 1/N (GA), p^alpha/N (WGA), w_s/(B) on each token of s (NPO), TNPO/WTNPO token weights / N.
The ``weights`` of each output expose these: ``inverse_confidence`` (GA: 1/p_i, the weight on
grad p_i), ``instance_weight`` (NPO, SimNPO, DPO: w_s in (0, 2), 1 at the start), ``token_weight``
(WGA, TNPO, WTNPO).

A combined objective (an unlearning term plus weighted regularisers on the retain batch, e.g.
GD = GA + lambda * NLL(retain)) spans two batches: ``parts`` then holds one vector per term
(``rows`` says which batch each indexes) and :meth:`ObjectiveOutput.for_g_effect` returns the
scalar sum, always a valid objective for :func:`gefx.g_effect`. A single-batch objective's
``for_g_effect()`` is its per-sample vector over the forget rows (PO and DPO index forget
instance s by row s of the refusal batch too), so g_effect also gives per-objective-instance
(PG-) effects.

Specs for :func:`make` / ``gefx profile --objectives``: ``name[:key=value...][+reg[:key=value...]]``,
e.g. ``npo:beta=0.5``, ``wga:alpha=0.5+kl:lambda=1``, ``ga+nll`` (= ``gd``), ``rmu:layer=2:c=5``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..losses import IGNORE_INDEX, token_nll
from ..precision import acc_dtype

TNPO_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------------
@dataclass
class Forward:
    """One forward pass on one batch: logits [B, T, V], labels [B, T], optional hidden states."""
    logits: torch.Tensor
    labels: torch.Tensor
    hidden_states: tuple | None = None


def forward(model, batch: dict, hidden: bool = False) -> Forward:
    """The model's forward on one batch (input_ids, attention_mask, labels): what every objective
    and risk is computed from (``gefx profile``, the Trainer mixin's risks)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                **({"output_hidden_states": True} if hidden else {}))
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"the model's forward returns no logits ({type(out).__name__}); a causal LM is needed")
    return Forward(logits, batch["labels"], out.hidden_states if hidden else None)


@dataclass
class ObjectiveOutput:
    parts: dict[str, torch.Tensor]                       # term name -> per-sample vector
    rows: dict[str, str]                                 # term name -> "forget" | "retain"
    weights: dict[str, torch.Tensor] = field(default_factory=dict)   # detached
    weight_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # valid entries of token weights
    coefs: dict[str, float] = field(default_factory=dict)  # term name -> lambda (1 for the main term)

    @property
    def loss(self) -> torch.Tensor:
        """The batch objective (scalar): sum of every part's vector."""
        return sum(v.sum() for v in self.parts.values())

    @property
    def vector(self) -> torch.Tensor | None:
        """The per-sample vector over the forget rows when every term lives there, else None."""
        if any(r != "forget" for r in self.rows.values()):
            return None
        vs = list(self.parts.values())
        out = vs[0]
        for v in vs[1:]:
            out = out + v
        return out

    def for_g_effect(self) -> torch.Tensor:
        v = self.vector
        return v if v is not None else self.loss

    def weight_means(self) -> dict[str, float]:
        """Mean of each weight over its valid entries (answer tokens / instances)."""
        out = {}
        for k, w in self.weights.items():
            m = self.weight_masks.get(k)
            vals = w[m] if m is not None else w.reshape(-1)
            out[k] = float(vals.double().mean()) if vals.numel() else float("nan")
        return out


# --------------------------------------------------------------------------------------------
# formulas on tensors (each returns (per-sample vector, weights))
# --------------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label_t+1 | <= t) for every position [B, T-1] (0 where masked) and the answer mask:
    minus ``gefx.losses.token_nll`` (the same kernel, so GA's gradient is exactly minus the NLL
    risk's)."""
    nll, mask = token_nll(logits, labels)
    return -nll, mask


def _ntok(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().clamp(min=1)


def nll(logits, labels):
    """Token-mean NLL as a per-sample vector (PO on refusal answers; the GD regulariser)."""
    lp, m = token_logprobs(logits, labels)
    return -lp.sum(1) / _ntok(m), {}


def ga(logits, labels):
    """GA: minimise -NLL. Weight 1 on grad log p_i (inverse confidence 1/p_i on grad p_i)."""
    lp, m = token_logprobs(logits, labels)
    inv = torch.exp(-lp.detach().double()) * m
    return lp.sum(1) / _ntok(m), {"inverse_confidence": inv}


def wga(logits, labels, alpha: float = 5.0):
    """WGA: -mean_i w_i CE_i with w_i = p_i^alpha (detached)."""
    lp, m = token_logprobs(logits, labels)
    w = torch.exp(float(alpha) * lp.detach()) * m
    return (w * lp).sum(1) / _ntok(m), {"token_weight": w}


def tnpo(logits, labels, ref_logits, beta: float = 4.0, alpha: float = 0.0):
    """TNPO (alpha = 0) / WTNPO: -mean_i w_i CE_i,
    w_i = 2 p_i^(beta+alpha) / (p_i^beta + p_o,i^beta + 1e-5) (detached)."""
    lp, m = token_logprobs(logits, labels)
    with torch.no_grad():
        lpo, _ = token_logprobs(ref_logits, labels)
        lpd = lp.detach()
        w = 2 * torch.exp((beta + alpha) * lpd) / (torch.exp(beta * lpd) + torch.exp(beta * lpo) + TNPO_EPS)
        w = w * m
    return (w * lp).sum(1) / _ntok(m), {"token_weight": w}


def wtnpo(logits, labels, ref_logits, alpha: float = 5.0, beta: float = 4.0):
    return tnpo(logits, labels, ref_logits, beta=beta, alpha=alpha)


def seq_logprob(logits, labels):
    """log p(answer | question) summed over answer tokens [B]."""
    lp, m = token_logprobs(logits, labels)
    return lp.sum(1), m


def npo(logits, labels, ref_logits, beta: float = 0.5):
    """NPO: mean_s -(2/beta) log sigmoid(beta (NLLsum_s - NLLsum_ref,s)).
    Instance weight w_s = 2 p^beta / (p^beta + p_o^beta) = 2 sigmoid(-beta (NLLsum - NLLsum_ref))."""
    lps, _ = seq_logprob(logits, labels)
    with torch.no_grad():
        lpo, _ = seq_logprob(ref_logits, labels)
    delta = lpo.to(lps.dtype) - lps               # NLLsum_cur - NLLsum_ref
    vec = -(2.0 / beta) * F.logsigmoid(beta * delta) / lps.shape[0]
    w = (2 * torch.sigmoid(-beta * delta)).detach()
    return vec, {"instance_weight": w}


def simnpo(logits, labels, beta: float = 2.5, gamma: float = 0.0):
    """SimNPO (reference-free): mean_s -(2/beta) log sigmoid(-(beta/|y_s|) log p(y_s) - gamma).
    Instance weight 2 sigmoid((beta/|y|) log p + gamma) (the factor on (1/|y|) grad log p)."""
    lps, m = seq_logprob(logits, labels)
    n = m.sum(1).clamp(min=1).to(lps.dtype)
    z = -(beta / n) * lps - gamma
    vec = -(2.0 / beta) * F.logsigmoid(z) / lps.shape[0]
    return vec, {"instance_weight": (2 * torch.sigmoid(-z)).detach()}


def dpo(logits_w, labels_w, logits_l, labels_l, ref_logits_w, ref_logits_l, beta: float = 0.1):
    """DPO with a refusal as the preferred answer y_w and the forget answer as y_l:
    mean_s -(2/beta) log sigmoid(beta [(log p(y_w) - log p_o(y_w)) - (log p(y_l) - log p_o(y_l))]).
    (2/beta scaling as for NPO.) Instance weight 2 sigmoid(-beta * margin), 1 at the start."""
    lw, _ = seq_logprob(logits_w, labels_w)
    ll, _ = seq_logprob(logits_l, labels_l)
    with torch.no_grad():
        low, _ = seq_logprob(ref_logits_w, labels_w)
        lol, _ = seq_logprob(ref_logits_l, labels_l)
    margin = (lw - low.to(lw.dtype)) - (ll - lol.to(ll.dtype))
    vec = -(2.0 / beta) * F.logsigmoid(beta * margin) / lw.shape[0]
    return vec, {"instance_weight": (2 * torch.sigmoid(-beta * margin)).detach()}


def _pos_mask(labels: torch.Tensor) -> torch.Tensor:
    return labels != IGNORE_INDEX


def control_vector(dim: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """RMU's fixed random direction: r ~ U[0,1)^dim from a seeded generator, normalised to unit
    L2 norm (as in the RMU/WMDP paper); the target is c * u."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.rand(dim, generator=g, dtype=torch.float64)
    return (r / r.norm()).to(device=device, dtype=dtype)


def rmu(hidden: torch.Tensor, labels: torch.Tensor, u: torch.Tensor, c: float = 2.0):
    """RMU: mean over answer positions of mean_d (h - c u)^2 (token mean over the batch)."""
    m = _pos_mask(labels).to(hidden.device)
    sq = ((hidden.to(acc_dtype(hidden)) - c * u.to(acc_dtype(hidden))) ** 2).mean(-1) * m
    return sq.sum(1) / _ntok(m), {}


def kl(logits, ref_logits, labels, positions: str = "answer"):
    """KL(p_o(.|x) || p(.|x)) summed over the vocabulary: token mean over the answer positions of
    the batch ("answer"), or over all its B x T positions, question and padding included, unshifted
    ("all": the reference code's ``kl_div(log p, log p_o, reduction="batchmean", log_target=True)``
    of the flattened log-probabilities)."""
    if positions == "all":
        lp = torch.log_softmax(logits.to(acc_dtype(logits)), -1)
        with torch.no_grad():
            lpo = torch.log_softmax(ref_logits.to(lp.dtype), -1)
        k = (lpo.exp() * (lpo - lp)).sum(-1)
        return k.sum(1) / k.numel(), {}
    lab = labels[:, 1:].to(logits.device)
    m = lab != IGNORE_INDEX
    lp = torch.log_softmax(logits[:, :-1].to(acc_dtype(logits)), -1)
    with torch.no_grad():
        lpo = torch.log_softmax(ref_logits[:, :-1].to(lp.dtype), -1)
    k = (lpo.exp() * (lpo - lp)).sum(-1) * m
    return k.sum(1) / _ntok(m), {}


def rr(hidden, ref_hidden, labels):
    """RR: ||h_l(x; theta) - h_l(x; theta_o)||_2^2 per answer position, token mean over the batch."""
    m = _pos_mask(labels).to(hidden.device)
    d = ((hidden.to(acc_dtype(hidden)) - ref_hidden.detach().to(acc_dtype(hidden))) ** 2).sum(-1) * m
    return d.sum(1) / _ntok(m), {}


# --------------------------------------------------------------------------------------------
# objective objects: what a training step calls
# --------------------------------------------------------------------------------------------
class Objective:
    """Base class. ``batches``: the forwards of the current model it reads ("forget", "retain",
    "idk" = forget questions with refusal answers); ``ref_batches``: forwards of the frozen
    reference model; ``hidden``: batches whose forwards need ``output_hidden_states=True``."""
    name = "objective"
    batches: tuple[str, ...] = ("forget",)
    ref_batches: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    hparams: dict[str, float | str] = {}

    def __init__(self, **hp):
        unknown = set(hp) - set(self.hparams)
        if unknown:
            raise ValueError(f"objective {self.name!r} has no hyper-parameter(s) {', '.join(sorted(unknown))}"
                             f" (it takes: {', '.join(self.hparams) or 'none'})")
        self.hp = {}
        for k, v in self.hparams.items():
            try:
                self.hp[k] = type(v)(hp.get(k, v))
            except ValueError:
                raise ValueError(f"objective {self.name!r}: {k}={hp[k]!r} must be a {type(v).__name__}") from None

    @property
    def needs_ref(self) -> bool:
        return bool(self.ref_batches)

    def __call__(self, cur: dict[str, Forward], ref: dict[str, Forward] | None = None) -> ObjectiveOutput:
        raise NotImplementedError

    def spec(self) -> str:
        return self.name + "".join(f":{k}={_text(v)}" for k, v in self.hp.items() if self.hparams[k] != v)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.hp.items())})"


def _out(name, vec, weights, fwd: Forward | None = None, rows="forget") -> ObjectiveOutput:
    masks = {}
    if fwd is not None:
        m = fwd.labels[:, 1:] != IGNORE_INDEX
        masks = {k: m.to(w.device) for k, w in weights.items() if w.dim() == 2}
    return ObjectiveOutput({name: vec}, {name: rows}, weights, masks, {name: 1.0})


class GA(Objective):
    name = "ga"

    def __call__(self, cur, ref=None):
        f = cur["forget"]
        return _out(self.name, *ga(f.logits, f.labels), f)


class WGA(Objective):
    name, hparams = "wga", {"alpha": 5.0}

    def __call__(self, cur, ref=None):
        f = cur["forget"]
        return _out(self.name, *wga(f.logits, f.labels, self.hp["alpha"]), f)


class NPO(Objective):
    name, hparams, ref_batches = "npo", {"beta": 0.5}, ("forget",)

    def __call__(self, cur, ref=None):
        f = cur["forget"]
        return _out(self.name, *npo(f.logits, f.labels, ref["forget"].logits, self.hp["beta"]), f)


class SimNPO(Objective):
    name, hparams = "simnpo", {"beta": 2.5, "gamma": 0.0}

    def __call__(self, cur, ref=None):
        f = cur["forget"]
        return _out(self.name, *simnpo(f.logits, f.labels, self.hp["beta"], self.hp["gamma"]), f)


class TNPO(Objective):
    name, hparams, ref_batches = "tnpo", {"beta": 4.0}, ("forget",)

    def __call__(self, cur, ref=None):
        f = cur["forget"]
        return _out(self.name, *tnpo(f.logits, f.labels, ref["forget"].logits, beta=self.hp["beta"]), f)


class WTNPO(Objective):
    name, hparams, ref_batches = "wtnpo", {"alpha": 5.0, "beta": 4.0}, ("forget",)

    def __call__(self, cur, ref=None):
        f = cur["forget"]
        return _out(self.name, *wtnpo(f.logits, f.labels, ref["forget"].logits, self.hp["alpha"],
                                      self.hp["beta"]), f)


class PO(Objective):
    """Preference optimisation towards refusals: token-mean NLL of a refusal answer to each forget
    question (row s of the "idk" batch answers forget question s)."""
    name, batches = "po", ("idk",)

    def __call__(self, cur, ref=None):
        f = cur["idk"]
        return _out(self.name, *nll(f.logits, f.labels), f)


class DPO(Objective):
    name, hparams = "dpo", {"beta": 0.1}
    batches = ref_batches = ("idk", "forget")

    def __call__(self, cur, ref=None):
        w, l = cur["idk"], cur["forget"]
        vec, wts = dpo(w.logits, w.labels, l.logits, l.labels, ref["idk"].logits, ref["forget"].logits,
                       self.hp["beta"])
        return _out(self.name, vec, wts)


class RMU(Objective):
    """RMU on hidden_states[layer] (0 = embedding output; default: the middle decoder layer,
    num_hidden_layers // 2, chosen at the first call if layer < 0)."""
    name, hparams, hidden = "rmu", {"layer": -1, "c": 2.0, "seed": 0}, ("forget",)

    def __init__(self, **hp):
        super().__init__(**hp)
        self.hp["layer"], self.hp["seed"] = int(self.hp["layer"]), int(self.hp["seed"])
        self._u = None

    def __call__(self, cur, ref=None):
        f = cur["forget"]
        hs = f.hidden_states
        if hs is None:
            raise ValueError("RMU needs hidden states: run the forget forward with output_hidden_states=True")
        layer = self.hp["layer"] if self.hp["layer"] >= 0 else (len(hs) - 1) // 2
        if not 0 <= layer < len(hs):
            raise ValueError(f"RMU layer {layer} is out of range: the model has hidden_states[0..{len(hs) - 1}]")
        h = hs[layer]
        if self._u is None or self._u.shape[0] != h.shape[-1]:
            self._u = control_vector(h.shape[-1], self.hp["seed"], device=h.device)
        return _out(self.name, *rmu(h, f.labels, self._u.to(h.device), self.hp["c"]), f)


# regularisers (per-sample over the RETAIN batch) -----------------------------------------------
class NLLReg(Objective):
    name, batches = "nll", ("retain",)

    def __call__(self, cur, ref=None):
        r = cur["retain"]
        return _out(self.name, *nll(r.logits, r.labels), rows="retain")


class KLReg(Objective):
    """KL(p_o || p) on the retain batch; ``positions``: "answer" (default, the answer-token mean) or
    "all" (the reference code's mean over every position)."""
    name, batches, ref_batches, hparams = "kl", ("retain",), ("retain",), {"positions": "answer"}

    def __call__(self, cur, ref=None):
        if self.hp["positions"] not in ("answer", "all"):
            raise ValueError(f"kl:positions={self.hp['positions']!r}: use 'answer' or 'all'")
        r = cur["retain"]
        return _out(self.name, *kl(r.logits, ref["retain"].logits, r.labels, self.hp["positions"]), rows="retain")


class RRReg(Objective):
    """RR on hidden_states[layer] of the retain batch (default: the middle decoder layer)."""
    name, hparams = "rr", {"layer": -1}
    batches = ref_batches = hidden = ("retain",)

    def __call__(self, cur, ref=None):
        h, ho = cur["retain"].hidden_states, ref["retain"].hidden_states
        if h is None or ho is None:
            raise ValueError("RR needs hidden states of the current and the reference model on the retain batch")
        layer = int(self.hp["layer"]) if self.hp["layer"] >= 0 else (len(h) - 1) // 2
        if not 0 <= layer < len(h):
            raise ValueError(f"RR layer {layer} is out of range: the model has hidden_states[0..{len(h) - 1}]")
        return _out(self.name, *rr(h[layer], ho[layer], cur["retain"].labels), rows="retain")


class Combined(Objective):
    """base + sum_k lambda_k * reg_k. parts: the base's parts, then f"{lambda}*{reg}" vectors."""

    def __init__(self, base: Objective, regs: list[tuple[float, Objective]]):
        self.base, self.regs = base, [(float(lam), r) for lam, r in regs]
        self.name = base.name + "".join(f"+{r.name}" for _, r in self.regs)
        self.hp = dict(base.hp)
        self.hparams = dict(base.hparams)

        def union(attr):
            out = list(getattr(base, attr))
            for _, r in self.regs:
                out += [b for b in getattr(r, attr) if b not in out]
            return tuple(out)
        self.batches, self.ref_batches, self.hidden = union("batches"), union("ref_batches"), union("hidden")

    def __call__(self, cur, ref=None):
        out = self.base(cur, ref)
        parts, rows, coefs = dict(out.parts), dict(out.rows), dict(out.coefs)
        weights, masks = dict(out.weights), dict(out.weight_masks)
        for lam, reg in self.regs:
            o = reg(cur, ref)
            for k, v in o.parts.items():
                key = k if k not in parts else f"{k}{len(parts)}"
                parts[key], rows[key], coefs[key] = lam * v, o.rows[k], lam
        return ObjectiveOutput(parts, rows, weights, masks, coefs)

    def spec(self) -> str:
        return self.base.spec() + "".join(f"+{r.spec()}:lambda={lam:g}" for lam, r in self.regs)

    def __repr__(self):
        return f"Combined({self.base!r}, {self.regs!r})"


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "ga": GA, "wga": WGA, "npo": NPO, "simnpo": SimNPO, "tnpo": TNPO, "wtnpo": WTNPO,
    "po": PO, "idk": PO, "dpo": DPO, "rmu": RMU,
}
REGULARISERS: dict[str, Callable[..., Objective]] = {"nll": NLLReg, "kl": KLReg, "rr": RRReg}


def _parse_term(term: str) -> tuple[str, dict[str, float]]:
    bits = [b.strip() for b in term.strip().split(":")]
    name, hp = bits[0].lower(), {}
    if not name:
        raise ValueError(f"empty objective name in {term!r}")
    for b in bits[1:]:
        if "=" not in b:
            raise ValueError(f"objective option {b!r} in {term!r} must look like key=value")
        k, v = b.split("=", 1)
        try:
            hp[k.strip()] = float(v)
        except ValueError:  # a word (kl:positions=all): the objective checks its options
            hp[k.strip()] = v.strip()
    return name, hp


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def make(spec: str) -> Objective:
    """An objective from a spec: ``name[:k=v...]`` plus any ``+reg[:lambda=x][:k=v...]`` terms;
    ``gd`` is ``ga+nll``."""
    terms = spec.split("+")
    name, hp = _parse_term(terms[0])
    regs = []
    if name == "gd":
        lam = hp.pop("lambda", 1.0)
        base = GA(**hp)
        regs.append((lam, NLLReg()))
    elif name in OBJECTIVES:
        base = OBJECTIVES[name](**hp)
    else:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(sorted(OBJECTIVES))}, gd "
                         f"(regularisers after '+': {', '.join(sorted(REGULARISERS))})")
    for t in terms[1:]:
        rname, rhp = _parse_term(t)
        if rname not in REGULARISERS:
            raise ValueError(f"unknown regulariser {rname!r} in {spec!r}; choose from "
                             f"{', '.join(sorted(REGULARISERS))}")
        lam = rhp.pop("lambda", 1.0)
        regs.append((lam, REGULARISERS[rname](**rhp)))
    return Combined(base, regs) if regs else base
