"""End-to-end workloads and baselines for bench/bench_e2e.py (bench-only code, not part of gefx).

A *workload* is a Llama-architecture model (random init from a config) plus a forget batch and a
retain batch of B sequences of T tokens (the first quarter of each sequence is the "question",
labels -100; no padding) and an unlearning objective (GA, NPO or TNPO as gefx.objectives defines
them: a per-sample vector whose sum is the objective L). Models use Hugging Face's default attention
implementation, "sdpa" (what users run), unless told otherwise; ``attention(model, "eager")`` switches
a model to eager attention for a block (torch.func needs it; bench_e2e.py's "_eager" rows use it).

Every G-effect provider returns the same quantities, computed at the same parameters:

    forget [B]   per-instance G-effects <grad nll_f[i], grad L>   (None where not available)
    retain [B]   per-instance G-effects <grad nll_r[j], grad L>
    groups_f / groups_r   {group: <grad_g sum_i nll_f[i], grad_g L>} with the "block" preset

with nll = gefx.losses.sequence_nll, so baselines can be checked against gefx number for number.
Providers that include the training step's backward leave the objective's gradient in .grad.

Engine-op providers compute, from the same batches, one of
    pairwise  [B, B]  <grad nll_f[i], grad nll_r[j]>
    norms     [B]     ||grad nll_f[i]||^2
    aggregate [B]     <grad nll_f[i], grad sum_j nll_r[j]>

Agreement (``compare``; bench_e2e.py checks every provider against gefx online before timing it).
In float32 / float64 each key (forget, retain, groups_f, groups_r; or the op's tensor) is compared
relative to its own size: max |x - ref| / max |ref| (--tol, default 1e-3). In reduced precision
(bf16 / fp16 weights) that rule cannot hold: the rounding error of an inner product <a, b> of two
gradients computed in bf16 scales with ||a|| ||b||, not with |<a, b>|, and at random init the retain
gradients are nearly orthogonal to grad L (cosines 1e-4 to 3e-2 measured, the forget ones about
-1/sqrt(B)), so the retain G-effects are a tiny fraction of their norm product and no bf16 provider
gets them to better than ~1-3% of their own size. Measured on the CPU in bf16 (Llama shapes of 6-32
layers, B = 4, T = 64-256, GA): gefx, gefx with eager attention and torch.func differ from each
other by 0.7-3% of the retain values and 0.04-0.2% of the forget values, and gefx differs from a
float64 evaluation of the same bf16 weights by 1.2-3% (retain) and 0.5% (forget); all of these are
below 3e-3 of the norm products. On the GPU (H200, 2026-12-04; 22 and 32 layers, flash attention)
the plain rule failed: gefx with eager attention differed by 8.5% (llama-1b, B = 8, T = 512) and
torch.func by 82% (llama-7b, B = 4, T = 256) of some key's largest value (the key was not printed).
So in reduced precision each key's max |x - ref| is divided by the largest Cauchy-Schwarz bound of
its entries instead (``norm_scales``, from gefx's own per-instance gradient norms,
``g_effect(..., norms=True)``: ||grad r_i|| ||grad L|| per instance, sum_i ||grad_g r_i|| ||grad_g L||
per group total): the providers must agree to --tol-scaled (default 1e-2) in units of the cosine.
That still catches a provider whose forget values or group totals are 10% off (|cosine| ~0.3-0.5 at
B = 4-16: measured 0.025-0.054), but not one whose retain values alone are wrong (even their sign):
bf16 does not resolve them; the float32 runs (``make bench``) check those to 1e-3 of their own size.
Providers whose forward runs eager attention (the ``*_eager`` rows, and torch_func / torch_func_op,
whose vmap runs eager) round differently in bf16 from the sdpa / flash forward of gefx online (the
softmax and its products in another order and precision); they are checked by the same scale-aware
rule (in float32 eager and sdpa agree to ~1e-5 and keep the strict one). If the extra norms call
fails (e.g. out of memory; bench_e2e.py logs it and goes on), the reference's largest forget values
stand in for the scale (``forget_scales``; under GA about the norm product times the forget cosine,
i.e. stricter).
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import NamedTuple

import torch

import gefx
from gefx import objectives as O
from gefx.groups import resolve
from gefx.losses import sequence_nll

# -- models ------------------------------------------------------------------------------------
# ~10M and ~100M parameters on the CPU; 1B and 7B shapes for the GPU script.
MODELS = {
    "llama-10m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=8192),
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=16000),
    # TinyLlama-1.1B shape (22 layers, GQA 32/4) and Llama-2-7B shape
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    # narrow and shallow (issue 23): the step's fixed costs weigh more, the contractions less
    "llama-narrow": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=8192),
    # the 1.1B shape's width with 4 layers (~0.4B): the memory benchmark's quick look
    "llama-1b-4l": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}


def build_model(name: str, device="cpu", dtype=torch.float32, seed: int = 0, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=4096, tie_word_embeddings=False,
                      attn_implementation=attn, rms_norm_eps=1e-6)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    model.config.use_cache = False
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _set_attn(model, impl: str | None):
    setter = getattr(model, "set_attn_implementation", None)  # PreTrainedModel method in transformers 5.x
    if setter is not None and impl is not None:
        setter(impl)
    # missing setter, or a model class that cannot switch dynamically (set_attn_implementation then
    # only warns): set the config's value, which the attention layers read at every forward
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.config._attn_implementation = impl


@contextmanager
def attention(model, impl: str):
    """Run a block with ``model`` (a Hugging Face model; None: do nothing) on attention ``impl``,
    then restore the implementation it had (``model.config._attn_implementation``).

    Why: the models run Hugging Face's default "sdpa" attention (what users run), but
    torch.func.vmap needs eager attention: scaled_dot_product_attention's fused kernels have no vmap
    batching rule (torch 2.13 on the CPU falls back to running them sample by sample, forward and
    backward, with a "performance drop" warning, so the baseline would time a loop), while eager
    attention is plain matmul + softmax, which vmap batches. The torch.func providers switch to
    eager for their vmap only; bench_e2e.py's "<provider>_eager" rows run a whole provider inside
    this block. Switching costs ~60 us
    (transformers 5.25: ``set_attn_implementation``, which checks the value and sets the config of
    the model and its sub-models; the forward reads ``config._attn_implementation`` at every call,
    for the attention function and the mask)."""
    prev = getattr(model.config, "_attn_implementation", None) if model is not None else impl
    if prev == impl:
        yield
        return
    _set_attn(model, impl)
    try:
        yield
    finally:
        _set_attn(model, prev)


class Workload:
    """A model, its frozen reference copy (NPO/TNPO), a forget and a retain batch, an objective."""

    def __init__(self, model_name: str, batch: int, seq: int, objective: str = "ga", device="cpu",
                 dtype=torch.float32, seed: int = 0, model=None, need_ref: bool | None = None, attn: str = "sdpa"):
        self.model_name, self.B, self.T, self.objective = model_name, batch, seq, objective
        self.model = model if model is not None else build_model(model_name, device, dtype, seed, attn)
        self.model.train()
        need_ref = objective in ("npo", "tnpo") if need_ref is None else need_ref
        self.ref = None
        if need_ref:
            # the reference model is the starting point; the current model has moved a little from it
            # (otherwise NPO's weights are exactly 1 and TNPO's degenerate)
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            g = torch.Generator(device="cpu").manual_seed(seed + 7)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p) * 0.02 * p.detach().float().std().clamp(min=1e-3).to(p.dtype))
        vocab = self.model.config.vocab_size
        g = torch.Generator().manual_seed(seed + 1)
        dev = next(self.model.parameters()).device
        self.f_ids = torch.randint(3, vocab, (batch, seq), generator=g).to(dev)
        self.r_ids = torch.randint(3, vocab, (batch, seq), generator=g).to(dev)
        q = max(1, seq // 4)
        self.f_lab, self.r_lab = self.f_ids.clone(), self.r_ids.clone()
        self.f_lab[:, :q] = -100
        self.r_lab[:, :q] = -100
        self._groups = None

    @property
    def label(self) -> str:
        return f"{self.model_name} B={self.B} T={self.T} {self.objective}"

    # -- pieces every provider shares
    def logits(self, ids, model=None):
        return (model or self.model)(input_ids=ids).logits

    def ref_logits(self, ids):
        if self.ref is None:
            return None
        with torch.no_grad():
            return self.ref(input_ids=ids).logits

    def objective_vec(self, logits_f, ref_f):
        if self.objective == "ga":
            return O.ga(logits_f, self.f_lab)[0]
        if self.objective == "npo":
            return O.npo(logits_f, self.f_lab, ref_f)[0]
        if self.objective == "tnpo":
            return O.tnpo(logits_f, self.f_lab, ref_f)[0]
        raise ValueError(self.objective)

    def groups(self) -> tuple[dict[str, str], list[str]]:
        """name -> group ("block" preset, as gefx resolves it) for the baselines."""
        if self._groups is None:
            self._groups = resolve(gefx.trace(self.model), "block")
        return self._groups

    def zero(self):
        self.model.zero_grad(set_to_none=True)


def _grouped(w: Workload, per_param: dict[str, torch.Tensor]) -> dict[str, float]:
    mapping, order = w.groups()
    out = dict.fromkeys(order, 0.0)
    for n, v in per_param.items():
        out[mapping[n]] += float(v)
    return out


def _grads(w: Workload) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in w.model.named_parameters() if p.grad is not None}


@contextmanager
def backend(name: str | None):
    old = os.environ.get("GEFX_BACKEND")
    if name:
        os.environ["GEFX_BACKEND"] = name
    try:
        yield
    finally:
        if name:
            if old is None:
                os.environ.pop("GEFX_BACKEND", None)
            else:
                os.environ["GEFX_BACKEND"] = old


def _per_instance_result(df, dr):
    return {"forget": df.total.detach(), "retain": dr.total.detach(),
            "groups_f": {g: float(v.sum()) for g, v in df.per_group.items()},
            "groups_r": {g: float(v.sum()) for g, v in dr.per_group.items()}}


# -- G-effect providers --------------------------------------------------------------------------
def plain_step(w: Workload, retain_forward: bool = True):
    """The unlearning step alone: forward of the forget (+ retain) batch, backward of L."""
    w.zero()
    lf = w.logits(w.f_ids)
    if retain_forward:
        w.logits(w.r_ids)
    loss = w.objective_vec(lf, w.ref_logits(w.f_ids)).sum()
    loss.backward()
    return None


def _traced_forwards(w: Workload):
    """Both batches' forwards (inside a trace): the forget and retain risks and the objective L."""
    lf = w.logits(w.f_ids)
    lr = w.logits(w.r_ids)
    return sequence_nll(lf, w.f_lab), sequence_nll(lr, w.r_lab), w.objective_vec(lf, w.ref_logits(w.f_ids)).sum()


def gefx_online(w: Workload, backend_name: str | None = None):
    """gefx's online mode: ``g_effect(..., backward=True)`` runs the step's own backward (grad L
    lands in .grad, the G-effects are contracted against it) and reuses the step's layer-output
    gradients for risks that are a per-sample multiple of L there (the forget NLL under GA and
    NPO), so only the other risks (retain; forget under TNPO) get a partial backward."""
    w.zero()
    with backend(backend_name), gefx.trace(w.model) as tape:
        nll_f, nll_r, loss = _traced_forwards(w)
        eff = gefx.g_effect(tape, loss, {"forget": nll_f, "retain": nll_r}, groups="block", backward=True)
    return _effect_result(eff)


def gefx_online_grads(w: Workload, backend_name: str | None = None):
    """The online mode by hand: ``loss.backward(retain_graph=True)``, then
    ``gefx.grad_dots(tape, nll, {n: p.grad})`` per risk (one partial backward each)."""
    w.zero()
    with backend(backend_name), gefx.trace(w.model) as tape:
        nll_f, nll_r, loss = _traced_forwards(w)
        loss.backward(retain_graph=True)
        g = _grads(w)
        df = gefx.grad_dots(tape, nll_f, g, groups="block")
        dr = gefx.grad_dots(tape, nll_r, g, groups="block")
    return _per_instance_result(df, dr)


def gefx_geffect(w: Workload, backend_name: str | None = None):
    """gefx.g_effect before the step's backward (it forms grad L itself from output gradients)."""
    w.zero()
    with backend(backend_name), gefx.trace(w.model) as tape:
        nll_f, nll_r, loss = _traced_forwards(w)
        eff = gefx.g_effect(tape, loss, {"forget": nll_f, "retain": nll_r}, groups="block")
        loss.backward()
    return _effect_result(eff)


def _effect_result(eff):
    return {"forget": eff["forget"].per_instance.detach(), "retain": eff["retain"].per_instance.detach(),
            "groups_f": eff["forget"].per_group, "groups_r": eff["retain"].per_group}


class ReferenceProcedure:
    """The reference G-effect code (docs/METHOD.md §4), one micro-batch: separate forward+backward for
    NLL(forget), the objective and NLL(retain), each full gradient copied to host memory, a
    0.6/0.4 moving average per gradient kept on the host (the first call initialises it), a fourth
    forward+backward on a zero loss, then per-parameter dot products summed per group.
    Only batch totals per group come out (no per-instance values). Generous to the baseline: the
    training step's own backward is not added (the objective pass could serve as the step)."""

    def __init__(self, decay: float = 0.6):
        self.decay = decay
        self.ema: dict[str, dict[str, torch.Tensor]] = {}

    def _pass(self, w: Workload, key: str, make_loss):
        w.zero()
        make_loss().backward()
        host = {n: p.grad.detach().to("cpu", copy=True) for n, p in w.model.named_parameters() if p.grad is not None}
        state = self.ema.get(key)
        if state is None:
            self.ema[key] = host
        else:
            for n, g in host.items():
                state[n].mul_(self.decay).add_(g, alpha=1 - self.decay)

    def __call__(self, w: Workload):
        self._pass(w, "forget", lambda: sequence_nll(w.logits(w.f_ids), w.f_lab).sum())
        self._pass(w, "objective", lambda: w.objective_vec(w.logits(w.f_ids), w.ref_logits(w.f_ids)).sum())
        self._pass(w, "retain", lambda: sequence_nll(w.logits(w.r_ids), w.r_lab).sum())
        w.zero()
        (w.logits(w.f_ids).sum() * 0.0).backward()  # the reference's fourth pass on a zero loss
        obj = self.ema["objective"]
        gf = _grouped(w, {n: (obj[n] * self.ema["forget"][n]).sum() for n in obj})
        gr = _grouped(w, {n: (obj[n] * self.ema["retain"][n]).sum() for n in obj})
        return {"forget": None, "retain": None, "groups_f": gf, "groups_r": gr}


def per_sample_loop(w: Workload):
    """The step (forward + backward of L, grad L kept), then one forward+backward per risk sample
    (batch of 1) and per-parameter dot products with grad L."""
    plain_step(w, retain_forward=False)
    gl = {n: g.detach().clone() for n, g in _grads(w).items()}
    mapping, order = w.groups()
    out = {}
    for key, ids, lab in (("f", w.f_ids, w.f_lab), ("r", w.r_ids, w.r_lab)):
        vals = torch.zeros(len(order), ids.shape[0], dtype=torch.float32)
        for i in range(ids.shape[0]):
            w.zero()
            sequence_nll(w.logits(ids[i:i + 1]), lab[i:i + 1]).sum().backward()
            for n, p in w.model.named_parameters():
                if p.grad is not None and n in gl:
                    vals[order.index(mapping[n]), i] += (p.grad.float() * gl[n].float()).sum().cpu()
        out[key] = vals
    # leave grad L in .grad like the other providers
    for n, p in w.model.named_parameters():
        p.grad = gl.get(n)
    return {"forget": out["f"].sum(0), "retain": out["r"].sum(0),
            "groups_f": dict(zip(order, out["f"].sum(1).tolist())),
            "groups_r": dict(zip(order, out["r"].sum(1).tolist()))}


def _vmap_per_sample_grads(w: Workload, ids, lab, chunk: int | None = None):
    """{name: [B, *shape]} per-sample gradients of sequence_nll by torch.func vmap(grad), with
    eager attention (see attention())."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in w.model.named_parameters()}

    def one(ps, x, y):
        logits = functional_call(w.model, ps, (x.unsqueeze(0),))
        if not isinstance(logits, torch.Tensor):
            logits = logits.logits
        return sequence_nll(logits, y.unsqueeze(0))[0]

    with attention(w.model, "eager"):
        return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk)(params, ids, lab)


def torch_func(w: Workload, chunk: int | None = None):
    """The step (on the model's attention), then torch.func vmap(grad) per-sample gradients of each
    risk batch (eager attention, which vmap needs: see attention()) and their dot products with grad L."""
    plain_step(w, retain_forward=False)
    gl = {n: g.detach() for n, g in _grads(w).items()}
    mapping, order = w.groups()
    res = {}
    for key, ids, lab in (("f", w.f_ids, w.f_lab), ("r", w.r_ids, w.r_lab)):
        psg = _vmap_per_sample_grads(w, ids, lab, chunk)
        vals = torch.zeros(len(order), ids.shape[0], dtype=torch.float32, device=ids.device)
        for n, g in psg.items():
            if n in gl:
                vals[order.index(mapping[n])] += g.flatten(1).float() @ gl[n].flatten().float()
        del psg
        res[key] = vals.cpu()
    return {"forget": res["f"].sum(0), "retain": res["r"].sum(0),
            "groups_f": dict(zip(order, res["f"].sum(1).tolist())),
            "groups_r": dict(zip(order, res["r"].sum(1).tolist()))}


class OpacusProvider:
    """The step (hooks off), then Opacus GradSampleModule per-sample gradients (p.grad_sample) of
    each risk batch (sum reduction) and their dot products with grad L. Its copy of the model runs
    the attention implementation the workload's model has at call time."""

    def __init__(self, w: Workload):
        from opacus.grad_sample import GradSampleModule

        # a copy of the model (same values): Opacus' hooks then never touch the model the others use
        self.model = copy.deepcopy(w.model)
        self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=False)

    def _per_sample(self, w: Workload, ids, lab):
        self.model.zero_grad(set_to_none=True)
        for p in self.model.parameters():
            p.grad_sample = None
        sequence_nll(self.gsm(input_ids=ids).logits, lab).sum().backward()
        return {n: p.grad_sample for n, p in self.model.named_parameters() if getattr(p, "grad_sample", None) is not None}

    def __call__(self, w: Workload, op: str | None = None):
        with attention(self.model, w.model.config._attn_implementation):
            return self._call(w, op)

    def _call(self, w: Workload, op: str | None):
        mapping, order = w.groups()
        if op is None:
            plain_step(w, retain_forward=False)
            gl = {n: g.detach().clone() for n, g in _grads(w).items()}
            res = {}
            for key, ids, lab in (("f", w.f_ids, w.f_lab), ("r", w.r_ids, w.r_lab)):
                psg = self._per_sample(w, ids, lab)
                vals = torch.zeros(len(order), ids.shape[0], dtype=torch.float32, device=ids.device)
                for n, g in psg.items():
                    vals[order.index(mapping[n])] += g.flatten(1).float() @ gl[n].flatten().float()
                res[key] = vals.cpu()
            for p in self.model.parameters():
                p.grad_sample = None
            self.model.zero_grad(set_to_none=True)
            return {"forget": res["f"].sum(0), "retain": res["r"].sum(0),
                    "groups_f": dict(zip(order, res["f"].sum(1).tolist())),
                    "groups_r": dict(zip(order, res["r"].sum(1).tolist()))}
        a = {n: g.clone() for n, g in self._per_sample(w, w.f_ids, w.f_lab).items()}
        b = self._per_sample(w, w.r_ids, w.r_lab) if op != "norms" else None
        out = _ps_op(op, a, b)
        for p in self.model.parameters():
            p.grad_sample = None
        self.model.zero_grad(set_to_none=True)
        return out


# -- engine-op providers --------------------------------------------------------------------------
def _ps_op(op: str, a: dict, b: dict | None) -> torch.Tensor:
    """An engine op from explicit per-sample gradients {name: [B, *shape]}."""
    out = 0
    for n, ga in a.items():
        fa = ga.flatten(1).float()
        if op == "norms":
            out = out + (fa * fa).sum(1)
        elif op == "pairwise":
            out = out + fa @ b[n].flatten(1).float().T
        else:
            out = out + fa @ b[n].flatten(1).float().sum(0)
    return out.cpu()


def gefx_op(w: Workload, op: str, backend_name: str | None = None) -> torch.Tensor:
    with backend(backend_name), gefx.trace(w.model) as tape:
        nll_f = sequence_nll(w.logits(w.f_ids), w.f_lab)
        if op == "norms":
            return gefx.grad_dots(tape, nll_f).total.detach().cpu()
        nll_r = sequence_nll(w.logits(w.r_ids), w.r_lab)
        b = nll_r if op == "pairwise" else nll_r.sum()
        return gefx.grad_dots(tape, nll_f, b).total.detach().cpu()


def torch_func_op(w: Workload, op: str, chunk: int | None = None) -> torch.Tensor:
    """An engine op from torch.func per-sample gradients (eager attention: see attention())."""
    a = _vmap_per_sample_grads(w, w.f_ids, w.f_lab, chunk)
    b = None if op == "norms" else _vmap_per_sample_grads(w, w.r_ids, w.r_lab, chunk)
    return _ps_op(op, a, b)


def per_sample_loop_op(w: Workload, op: str) -> torch.Tensor:
    def grads_of(ids, lab):
        out = {}
        for i in range(ids.shape[0]):
            w.zero()
            sequence_nll(w.logits(ids[i:i + 1]), lab[i:i + 1]).sum().backward()
            for n, p in w.model.named_parameters():
                out.setdefault(n, []).append(p.grad.detach().clone())
        w.zero()
        return {n: torch.stack(v) for n, v in out.items()}

    a = grads_of(w.f_ids, w.f_lab)
    b = None if op == "norms" else grads_of(w.r_ids, w.r_lab)
    return _ps_op(op, a, b)


# -- agreement ----------------------------------------------------------------------------------
# float32 / float64: every key is compared relative to its own size (`compare(res, ref)`). Reduced
# precision (bf16 / fp16): relative to the Cauchy-Schwarz scale of its entries (`norm_scales`,
# `compare(res, ref, scales)`): see the module docstring, "Agreement".
KEYS = ("forget", "retain", "groups_f", "groups_r")
REDUCED = (torch.bfloat16, torch.float16)


class Agreement(NamedTuple):
    """What `compare` found: the largest per-key difference, the key that gave it, every key's."""

    diff: float
    key: str
    per_key: dict[str, float]

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2e}" for k, v in self.per_key.items())


def _vectors(x, ref) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(x, dict):
        x = torch.tensor([x[k] for k in ref])
        ref = torch.tensor(list(ref.values()))
    return x.double().cpu(), ref.double().cpu()


def rel_diff(x, ref, scale: float | None = None) -> float:
    """max |x - ref| / max |ref| over the entries; with `scale`, max |x - ref| / scale."""
    x, ref = _vectors(x, ref)
    den = ref.abs().max() if scale is None else torch.tensor(float(scale), dtype=torch.float64)
    return float((x - ref).abs().max() / den.clamp(min=1e-30))


def compare(res, ref, scales: dict[str, float] | None = None) -> Agreement:
    """Largest difference between two provider results over what both report (the keys of
    `KEYS`, or one engine op's tensor, given as {op: tensor} by the caller). Without `scales`,
    each key's max |x - ref| / max |ref| (plain relative); with `scales` (from `norm_scales`),
    each key's max |x - ref| / scales[key] (scale-aware)."""
    per_key = {}
    for k in ref:
        if res.get(k) is not None and ref.get(k) is not None:
            per_key[k] = rel_diff(res[k], ref[k], None if scales is None else scales[k])
    key = max(per_key, key=per_key.get)
    return Agreement(per_key[key], key, per_key)


def norm_scales(w: Workload) -> dict[str, float]:
    """Per key, the largest Cauchy-Schwarz bound of its entries, from gefx's norms
    (``g_effect(..., norms=True)``: ||grad_g r_i|| per group g and instance i, ||grad_g L||):

        forget / retain        max_i ||grad r_i|| ||grad L||
        groups_f / groups_r    max_g sum_i ||grad_g r_i|| ||grad_g L||   (a group total sums B instances)
        pairwise               max_i ||grad nll_f[i]|| max_j ||grad nll_r[j]||
        norms                  max_i ||grad nll_f[i]||^2
        aggregate              max_i ||grad nll_f[i]|| sum_j ||grad nll_r[j]||

    Every |entry| is at most its bound, so the scale-aware difference is never larger than the
    plain relative one. One extra gefx online call (the step's backward included), not timed."""
    w.zero()
    with gefx.trace(w.model) as tape:
        nll_f, nll_r, loss = _traced_forwards(w)
        eff = gefx.g_effect(tape, loss, {"forget": nll_f, "retain": nll_r}, groups="block", backward=True, norms=True)
    w.zero()
    out = {}
    for risk, gkey in (("forget", "groups_f"), ("retain", "groups_r")):
        e = eff[risk]
        obj = e.objective_norm_group.detach().double().cpu()        # [G]
        rn = e.risk_norm_group.detach().double().cpu()              # [G, B]
        out[risk] = float(rn.pow(2).sum(0).sqrt().max() * obj.pow(2).sum().sqrt())
        out[gkey] = float((rn.sum(1) * obj).max())
    nf = eff["forget"].risk_norm.detach().double().cpu()
    nr = eff["retain"].risk_norm.detach().double().cpu()
    out.update(pairwise=float(nf.max() * nr.max()), norms=float(nf.max() ** 2), aggregate=float(nf.max() * nr.sum()))
    return out


def forget_scales(ref: dict) -> dict[str, float]:
    """Fallback of `norm_scales` (when its call runs out of memory): the reference's own largest
    forget values as the scale of both sides (per-instance keys by max |forget|, group totals by
    max |groups_f|). Under GA the forget G-effect is about -||grad nll_f[i]||^2 / B, the
    norm-product scale up to the cosine."""
    f = float(ref["forget"].double().abs().max()) if ref.get("forget") is not None else None
    g = max(abs(v) for v in ref["groups_f"].values())
    f = g if f is None else f
    return dict(forget=f, retain=f, groups_f=g, groups_r=g)
