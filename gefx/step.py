"""The training step's own backward, reused: ``g_effect(tape, loss, risks, backward=True)``.

On its way to the parameters, the step's ``loss.backward()`` computes the loss's gradient at every
recorded layer output. :class:`StepBackward` runs that backward with the hooks of
:class:`Serving` on the recorded outputs, so that

* ``.grad`` ends up exactly as ``loss.backward()`` leaves it (accumulated onto earlier gradients),
  and the objective's aggregated gradient is ``.grad`` itself: no gradient GEMM is added;
* the captured output gradients are the objective's per-sample pieces (per-objective-instance
  effects come without another backward);
* a risk gets its output gradients without a backward of its own when the step already holds them
  up to one factor per sample (:meth:`Serving.risk_grads`).

Row-scaled reuse (the math). Let H be the one recorded output (the logits) through which the risk
r reaches the traced forward (where it reaches several first, e.g. only adapters recorded and the
lm_head frozen under PEFT: the tensor into the last autograd node of the chain that leads from r
to all of them, one row per sample), and suppose the loss L reaches the recorded outputs upstream
of H only through H. Backpropagation is linear, and row i of an upstream output affects only row i of H
(the per-sample contract), so

    dL/dH[i] = c_i dr_i/dH[i] for every row i   ==>   dr_i/dy[i] = dL/dy[i] / c_i   for every upstream y.

The condition holds for objectives that weight each sample's NLL by one factor (GA: c_i = -n_i/N;
NPO: the instance weight; GradDiff's terms; DPO), not for token-weighted ones (TNPO, WGA): then the
risk's own backward runs from H (the failed attempt costs one fit, a few percent of a step).
The graph conditions are checked before the backward by walking the autograd graph (no
arithmetic); dr/dH comes from the risk's backward through the loss head alone, and the factors are
fitted in the hook that receives dL/dH during the step's backward (before any gradient upstream of H
exists, so those are kept only when the fit succeeds). A fit is accepted only when the residual
||dL/dH[i] - c_i dr/dH[i]|| is within 32 float32 roundoffs of ||dL/dH[i]|| (float64 roundoffs for a
float64 H): the reused gradients are then the step's own per-sample gradients over c_i, exactly,
and agree with the risk's own backward to the rounding of the model's arithmetic (float32 where
the model computes in float32, e.g. HF RMSNorm even for float64 inputs). Not to one rounding of
the result, though: the two backwards round differently (inputs scaled by c_i, unless c_i is a
power of two), and where the model's backward cancels (a router's normalised top-k in float32, a
key bias under softmax) that difference is amplified as the model's own rounding is (measured:
up to 1e-5 of sum |x_k y_k| per parameter on LongCat's float32 router, 8e-4 on Qwen3.5's linear
attention's float32 dt_bias in a float64 model; with power-of-two c_i, as in
tests/test_families.py, the served numbers equal the risk's own to one rounding). In 16-bit heads the two gradients are rounded separately, so this test fails unless they
are exactly proportional, and the risk is differentiated as usual. Nor is a fit accepted with a
factor so small that the step's gradients would underflow where the risk's do not (|c_i| under
float32's epsilon; under 1 with float16 outputs: :func:`_floor`), and rows whose norms are too
small to trust (squares lost to underflow) are fitted on copies scaled by powers of two.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch.autograd.graph import GradientEdge

from .collect import follow
from .precision import acc_dtype
from .soundness import per_row, sample_dim
from .tape import Tape

_ROUNDOFFS = 32  # accepted residual of the row-factor fit, in units of the head dtype's epsilon


def _walk(root, stop: set) -> set:
    """Autograd nodes reachable from `root`, not expanding past the nodes in `stop` (which are
    included when reached)."""
    seen, todo = set(), [root] if root is not None else []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            continue
        todo.extend(n for n, _ in node.next_functions if n is not None and n not in seen)
    return seen


def _spine(root, recorded: set):
    """The edge into the last autograd node of the chain that leaves `root` through one input at a
    time (every path from `root` to a recorded node runs through each node of it), stopping before
    a recorded node; None when `root` itself branches."""
    node, edge = root, None
    while True:
        nxt = [(n, nr) for n, nr in node.next_functions if n is not None]
        if len(nxt) != 1 or nxt[0][0] in recorded:
            return edge
        edge = GradientEdge(*nxt[0])
        node = nxt[0][0]


@dataclass
class _Plan:
    """How one risk reaches the traced forward: its single recorded head, the recorded outputs
    upstream of it, and whether the step's gradients there may be reused (graph conditions)."""

    head: int                            # the recorded output H, or -1: an unrecorded node's (`edge`)
    upstream: list[int]
    reusable: bool                       # the graph conditions hold (decided before the backward)
    edge: object = None                  # where dL/dH is taken: H's autograd edge
    g_head: torch.Tensor | None = None   # dr/dH (for reusable plans: computed before the backward)
    scale: torch.Tensor | None = None    # 1 / c_i, set by the head's hook when the fit succeeds
    streamed: bool = False               # served as the gradients come (Serving.serve), not captured
    visit: object = None                 # ... by this callback, during the step's backward only

    @property
    def key(self):
        """The head's identity: its output index, or its edge when it is not a recorded output."""
        return self.head if self.head >= 0 else (self.edge.node, self.edge.output_nr)


class Serving:
    """Which risks the step's output gradients serve, and serving them: planned from the risks'
    graphs before the backward (:meth:`may_serve`), the row factors fitted and the gradients
    captured by :meth:`hooks` during it (:meth:`reused`), handed over after it
    (:meth:`risk_grads`).

    What is captured: every recorded output's gradient for a vector objective (`keep_all`: its
    per-sample pieces), otherwise only those upstream of a head some risk may reuse and that is not
    served as they come (:meth:`serve`: its gradients are handed on rescaled, layer by layer, and
    nothing is kept for it; the online mode streams every risk it may serve in one process, and
    captures under torch.distributed, with sharded parameters, with an optimizer that has no closed
    form, and for PG-effects). A captured gradient is released as soon as no remaining risk needs
    it, and rescaled in place for the last risk using it when nothing else shares its storage.

    One concept in three phases (plan, serve, hand over) sharing the plans: about 155 code lines,
    kept whole because split by phase the plans would pass between three objects.
    """

    def __init__(self, tape: Tape, loss: torch.Tensor, risks: Mapping[str, torch.Tensor], keep_all: bool = False):
        tape.check_open()
        self.tape, self.loss, self.keep_all = tape, loss, keep_all
        self.outs = [o for c in tape.calls for o in c.outputs]
        self.slots = [(c, j) for c in tape.calls for j in range(len(c.outputs))]
        # where each output's gradient is taken (the value as recorded; see Call.targets)
        self.edges = [e for c in tape.calls for e in c.targets()]
        if not self.outs:
            raise ValueError("nothing was recorded: run the model's forward inside the gefx.trace block")
        self._nodes: dict = {}
        for k, e in enumerate(self.edges):
            self._nodes.setdefault(e.node, []).append(k)
        self._bypass: dict = {}  # head node -> L does not reach it, or reaches its upstream around it
        self.plans = {name: self._plan(risk) for name, risk in risks.items()}
        self._heads: dict = {}  # head key (Plan.key) -> its reusable plans
        for name, plan in self.plans.items():
            if plan is not None and plan.reusable:
                plan.g_head = self._head_gradient(name, risks[name], plan)
                plan.reusable = plan.g_head.shape[0] == risks[name].shape[0]  # one row per sample
            if plan is not None and plan.reusable:
                self._heads.setdefault(plan.key, []).append(plan)
            elif plan is not None:
                plan.g_head = None
        self._users = Counter(p.key for p in self.plans.values() if p is not None and p.reusable)
        self.captured: list[torch.Tensor | None] = [None] * len(self.outs)

    def _head_gradient(self, name: str, risk: torch.Tensor, plan: _Plan) -> torch.Tensor:
        try:
            (g,) = torch.autograd.grad(risk.sum(), [plan.edge], retain_graph=True)
        except RuntimeError as exc:
            raise RuntimeError(f"could not differentiate risk {name!r} through the traced forward: {exc}") from exc
        return self._as_output(plan.head, g) if plan.head >= 0 else g

    # -- planning (graph only, before the backward) -------------------------------------------------
    def _plan(self, risk: torch.Tensor) -> _Plan | None:
        nodes = self._nodes
        heads = _walk(risk.grad_fn, set(nodes)) & set(nodes)
        if len(heads) == 1 and len(nodes[next(iter(heads))]) == 1:
            (node,) = heads
            h = nodes[node][0]
            edge = self.edges[h]
        else:  # several recorded outputs first (adapters under PEFT, the lm_head frozen): a node before them all
            edge, h = _spine(risk.grad_fn, set(nodes)), -1
            if edge is None:
                return None
            node = edge.node
        upstream = sorted(k for n in _walk(node, set()) & set(nodes) for k in nodes[n])
        if node not in self._bypass:
            # L must reach H, and no output upstream of H other than through H
            reached = _walk(self.loss.grad_fn, {node})
            self._bypass[node] = (node not in reached
                                  or bool((reached - {node}) & {self.edges[k].node for k in upstream}))
        # and every output upstream must have the samples as its rows: only then does one factor per
        # sample relate the step's gradient there to the risk's (a tensor shared by the samples, or an
        # expert's share of the tokens, has no per-sample split; the risk's own backward lifts such a
        # call to its host)
        ok = (not self._bypass[node] and risk.dim() == 1
              and all(sample_dim(self.tape, self.slots[k][0], self.outs[k], risk.shape[0]) is not None
                      for k in upstream))
        return _Plan(h, upstream, ok, edge)

    # -- during the backward ------------------------------------------------------------------------
    def hooks(self) -> list:
        """[(autograd node, pre-hook)] for the step's backward. Backward reaches a head before
        anything upstream of it: the head's hook fits the row factors at once, and the upstream
        hooks keep a gradient only while someone can use it."""
        viable = {}  # output index -> the reusable plans whose upstream holds it
        for plan in self.plans.values():
            if plan is not None and plan.reusable:
                for k in plan.upstream:
                    viable.setdefault(k, []).append(plan)

        def store(k):
            nr = self.edges[k].output_nr

            def hook(grad_outputs):
                g = self._as_output(k, grad_outputs[nr])
                if g is None:
                    return
                self._fit(k, g)
                for pl in viable.get(k, ()):
                    if pl.streamed and pl.scale is not None:
                        pl.visit(*self.slots[k], pl.g_head if k == pl.head else g * self._factor(k, pl, g))
                        if k == pl.head:
                            pl.g_head = None
                if self.keep_all or any(pl.scale is not None and not pl.streamed and k != pl.head
                                        for pl in viable.get(k, ())):
                    self.captured[k] = g
            return hook

        def fit_at(key):
            def hook(grad_outputs):
                g = grad_outputs[key[1]]
                if g is not None and all(x is None for j, x in enumerate(grad_outputs) if j != key[1]):
                    self._fit(key, g)
                for plan in self._heads[key]:
                    if plan.streamed:
                        plan.g_head = None  # its upstream gradients are visited rescaled
            return hook

        wanted = range(len(self.outs)) if self.keep_all else sorted(viable)
        return ([(self.edges[k].node, store(k)) for k in wanted]
                + [(key[0], fit_at(key)) for key in self._heads if not isinstance(key, int)])

    def _fit(self, key, g) -> None:
        for plan in self._heads.get(key, ()):
            plan.scale = self._row_factors(g, plan.g_head, plan)

    def _row_factors(self, g_loss, g_head, plan: _Plan):
        return _row_factors(g_loss, g_head, _floor(self.outs[k].dtype for k in plan.upstream))

    # -- risks ------------------------------------------------------------------------------------
    def may_serve(self, name: str) -> bool:
        """Whether the step's gradients may serve this risk (the graph conditions hold; decided
        before the backward)."""
        plan = self.plans.get(name)
        return plan is not None and plan.reusable

    def reused(self, name: str) -> bool:
        """Whether the step's gradients serve this risk (its row factors were fitted)."""
        plan = self.plans.get(name)
        return plan is not None and plan.scale is not None

    def serve(self, step: "StepBackward", proofs: dict, products_for) -> dict:
        """Serve during the backward each proved risk the step may serve (name ->
        :class:`gefx.soundness.Reach`; one process, no sharded parameter: the caller's to decide,
        ``gefx.geffect._live_products``): fresh products (``products_for()``) and
        a feed (``gefx.collect.follow``) to which the risk's gradient at each recorded output it
        reaches is handed as the step's arrives (rescaled: a temporary of that output's size; at
        the head its own dr/dH), each parameter's pieces contracted with ``.grad`` as soon as the
        backward has finished it (``step.when_final``), then dropped: nothing is captured or held
        for it. Only once the head's fit succeeds (:meth:`reused`); otherwise nothing is visited
        and the caller differentiates the risk. Returns name -> (products, feed): the feed is
        closed, and the products reported, after the backward and the risk's per-sample probe."""
        live = {}
        for name, reach in proofs.items():
            if not self.may_serve(name):
                continue
            products = products_for()

            def take(n, P, rows=None, products=products):
                step.when_final(n, partial(products.take, n, P, rows))
            feed = follow(self.tape, reach, take)
            plan = self.plans[name]
            plan.streamed, plan.visit = True, feed.arrived_at
            self._users[plan.key] -= 1  # it takes nothing captured
            live[name] = (products, feed)
        return live

    def backward_done(self) -> None:
        """The step's backward is over: the streamed risks' callbacks are let go (they hold the
        caller's state, which holds this object: no reference cycle may keep the graph alive)."""
        for plan in self.plans.values():
            if plan is not None:
                plan.visit = None

    def forgo(self, name: str) -> None:
        """The caller differentiates this risk itself: its claim on the captured gradients ends
        (released when no other risk needs them)."""
        plan = self.plans.get(name)
        if plan is None or not plan.reusable or plan.g_head is None:
            return
        plan.g_head = None
        if plan.streamed:
            return
        self._users[plan.key] -= 1
        if self._users[plan.key] == 0 and not self.keep_all:
            self._release(plan.upstream)

    def risk_grads(self, name: str) -> list[torch.Tensor | None]:
        """The gradient of a risk the step serves (:meth:`reused`) at every recorded output (None
        where it does not reach): the step's, rescaled per sample. Call once per risk."""
        plan = self.plans[name]
        if plan is None or plan.scale is None:
            raise ValueError(f"the step's gradients do not serve risk {name!r}")
        g_head, plan.g_head = plan.g_head, None
        self._users[plan.key] -= 1
        last = self._users[plan.key] == 0 and not self.keep_all
        out: list = [None] * len(self.outs)
        shared = _shared_storages([self.captured[k] for k in plan.upstream], self.tape) if last else None
        for k in plan.upstream:
            g = self.captured[k]
            if g is None or k == plan.head:
                continue
            factor = self._factor(k, plan, g)
            in_place = last and g.untyped_storage().data_ptr() not in shared
            out[k] = g.mul_(factor) if in_place else g * factor
        if plan.head >= 0:
            out[plan.head] = g_head
        if last:
            self._release(plan.upstream)
        return out

    def _factor(self, k: int, plan: _Plan, g: torch.Tensor) -> torch.Tensor:
        """The plan's 1 / c_i laid out along output k's batch dimension."""
        return per_row(self.tape, self.slots[k][0], plan.scale, g).to(g.dtype)

    def _as_output(self, k: int, g):
        call, j = self.slots[k]
        return call.as_output(j, g)

    def _release(self, ks) -> None:
        for k in ks:
            self.captured[k] = None


class StepBackward:
    """``loss.backward(retain_graph=True)`` with the recorded outputs' gradients captured for
    `serving` (:class:`Serving`: its hooks run on the way).

    Use as a context manager: on a normal exit the gradients held in ``.grad`` before the step
    are added back (``.grad = earlier + step``, as ``loss.backward()`` accumulates); on an
    exception ``.grad`` is restored to what it was before. Only nonzero earlier gradients are
    moved aside (a second set of gradients while the step's is read: ``g_effect`` comes here with
    them only under torch.distributed or with sharded parameters, measuring before the step
    otherwise); when every earlier gradient is None or zero the backward accumulates into them in
    place and nothing is copied. `zero`: whether that is so, where the caller has found out.
    ``grads``: the step's own gradient ({name: .grad}) inside the block. :meth:`when_final` runs
    work on a parameter's ``.grad`` as soon as the backward has finished it (risks served as the
    gradients come, :meth:`Serving.serve`).
    """

    def __init__(self, serving: Serving, zero: bool | None = None):
        self.serving, self.tape, self.loss = serving, serving.tape, serving.loss
        self._known_zero = zero  # whether every earlier gradient is None or zero, if the caller knows
        self._earlier: dict[str, torch.Tensor | None] = {}
        self._zeros: set = set()
        self._final: set | None = set()  # names whose .grad the backward has finished (None: all)
        self._waiting: dict[str, list] = {}
        self._taken: list[str] = []

    def when_final(self, name: str, fn) -> None:
        """Call ``fn()`` once the backward has finished the parameter's ``.grad`` (at once if it has;
        autograd accumulates a parameter's gradient once per backward, all its uses summed)."""
        if self._final is None or name in self._final:
            fn()
        else:
            self._waiting.setdefault(name, []).append(fn)

    def _finished(self, name: str):
        def hook(param):
            if param.grad is None:  # a hook before this one took it (an optimizer step inside the backward)
                self._taken.append(name)
                return
            self._final.add(name)
            for fn in self._waiting.pop(name, ()):
                fn()
        return hook

    def __enter__(self) -> "StepBackward":
        self.tape.check_open()
        if not _reaches(self.loss, self.tape):
            raise ValueError("the objective's backward reaches none of the counted parameters")
        # the step's gradient alone must land in .grad: gradients already there (mid-accumulation)
        # wait aside; zeros (zero_grad(set_to_none=False)) stay, as 0 + g = g exactly
        self._earlier = {n: p.grad for n, p in self.tape.params.items() if p.grad is not None}
        zero = self._known_zero if self._known_zero is not None else _all_zero(list(self._earlier.values()))
        self._zeros = set(self._earlier) if zero else set()
        if zero:
            self._earlier = {}
        for n in self._earlier:
            self.tape.params[n].grad = None
        handles = [node.register_prehook(hook) for node, hook in self.serving.hooks()]
        handles += [p.register_post_accumulate_grad_hook(self._finished(n)) for n, p in self.tape.params.items()]
        try:
            self.loss.sum().backward(retain_graph=True)
            if self._taken:
                raise ValueError(f"the step's gradient of parameter {self._taken[0]!r} was taken from .grad during "
                                 "the backward by a hook of yours (register_post_accumulate_grad_hook: an optimizer "
                                 "step inside the backward?); online mode reads the step's gradient in .grad after "
                                 "it: measure before the step instead (g_effect without backward=True)")
            self._final, waiting, self._waiting = None, self._waiting, {}
            for n in self.tape.params:  # what the backward left without a gradient, in tape order
                for fn in waiting.pop(n, ()):
                    fn()
        except BaseException:
            self._waiting = {}
            self._restore(failed=True)
            raise
        finally:
            for h in handles:
                h.remove()
            self.serving.backward_done()
        self.grads = {n: p.grad for n, p in self.tape.params.items() if p.grad is not None}
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._restore(failed=exc_type is not None)

    def _restore(self, failed: bool) -> None:
        for n, p in self.tape.params.items():
            old = self._earlier.get(n)
            if n in self._zeros:
                if failed:
                    p.grad.zero_()
            elif failed or p.grad is None:
                p.grad = old
            elif old is not None:
                p.grad = old.add_(p.grad)
        self._earlier, self._zeros = {}, set()


def _shared_storages(grads: list, tape: Tape) -> set:
    """Storages that more than one of the captured `grads`, or a parameter's .grad, points into:
    those must not be rescaled in place."""
    seen, shared = set(), set()
    for g in grads:
        if g is not None:
            ptr = g.untyped_storage().data_ptr()
            (shared if ptr in seen else seen).add(ptr)
    for p in tape.params.values():
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: a DTensor
            shared.add(g.untyped_storage().data_ptr())
    return shared


def _reaches(loss: torch.Tensor, tape: Tape) -> bool:
    """Whether the loss's graph reaches an accumulator of a counted parameter (a walk that stops
    at the first one)."""
    seen, todo = set(), [loss.grad_fn] if loss.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and tape.canonical(var) is not None:
            return True
        todo.extend(n for n, _ in node.next_functions if n is not None and n not in seen)
    return False


def _all_zero(grads: list) -> bool:
    """Whether every gradient is zero (one reduction each, one synchronisation in all); DTensors
    (FSDP2) are read shard-wise, each rank deciding for its own shards."""
    if not grads:
        return True
    flags = [(g.to_local() if hasattr(g, "to_local") else g).any() for g in grads]
    if len({f.device for f in flags}) == 1:
        return not bool(torch.stack(flags).any())
    return not any(bool(f) for f in flags)


def _row_factors(g_loss: torch.Tensor, g_head: torch.Tensor, floor: float = 0.0) -> torch.Tensor | None:
    """1 / c_i with g_loss[i] = c_i g_head[i] for every row (0 where g_head[i] = 0), or None
    when some row is not such a multiple to within the accepted residual, or |c_i| < `floor`
    (see :func:`_floor`).

    |c_i| = ||g_loss[i]|| / ||g_head[i]||, its sign that of the rows' dot product over a strided
    subset of entries (the whole row if that is 0): two norms and one pass per row instead of a
    fitted dot product (a full vecdot is ~3-10x slower than a norm on the CPU). Whatever c_i this
    gives, the residual test is what decides. A norm so small that squares lost to underflow may
    matter (the step's gradients are c_i times the risk's: tiny for tiny weights) is not trusted:
    that row is fitted again on copies scaled by powers of two (exact), its c_i scaled back."""
    dt = acc_dtype(g_head)
    b = g_head.shape[0]
    a = g_loss.reshape(b, -1)
    r = g_head.reshape(b, -1)
    na = torch.linalg.vector_norm(a, dim=1, dtype=dt).tolist()
    nr = torch.linalg.vector_norm(r, dim=1, dtype=dt).tolist()
    sign = torch.sign(torch.linalg.vecdot(a[:, ::61].to(dt), r[:, ::61].to(dt))).tolist()
    small = math.sqrt(a.shape[1] * torch.finfo(dt).tiny) / torch.finfo(dt).eps
    inv = []
    for i in range(b):
        if min(na[i], nr[i]) < small:
            c = _fit_scaled(a[i], r[i], dt)
        else:
            c = _fit(a[i], r[i], sign[i], na[i], nr[i], dt)
        if c is None or (c != 0 and (abs(c) < floor or abs(1 / c) < torch.finfo(dt).tiny)):
            return None
        inv.append(0.0 if c == 0 else 1 / c)
    return torch.tensor(inv, dtype=dt, device=g_head.device)


def _fit(x: torch.Tensor, y: torch.Tensor, sign: float, nx: float, ny: float, dt) -> float | None:
    """c with x = c y to within the accepted residual (nx, ny: their norms); 0 for y = 0."""
    if ny == 0:
        return 0.0
    if sign == 0:
        sign = float(torch.sign(torch.linalg.vecdot(x.to(dt), y.to(dt))))
    c = sign * nx / ny
    if c == 0:
        return None  # the loss does not reach a row the risk does
    resid = float(torch.linalg.vector_norm(torch.add(x.to(dt), y.to(dt), alpha=-c)))
    return c if resid <= _ROUNDOFFS * torch.finfo(dt).eps * nx else None


def _fit_scaled(x: torch.Tensor, y: torch.Tensor, dt) -> float | None:
    """:func:`_fit` on x and y scaled by powers of two, so that no square that matters underflows."""
    (xs, ex), (ys, ey) = _pow2_unit(x), _pow2_unit(y)
    if ys is None:
        return 0.0
    if xs is None:
        return None
    nx, ny = (float(torch.linalg.vector_norm(v, dtype=dt)) for v in (xs, ys))
    c = _fit(xs, ys, 0.0, nx, ny, dt)
    return None if c is None else math.ldexp(c, ex - ey)


def _pow2_unit(x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(x 2^-e, e) with the largest |entry| of the first in [0.5, 1), or (None, 0) for x = 0. Exact:
    two power-of-two factors, each representable in x's dtype (and in its compute dtype)."""
    m = float(torch.linalg.vector_norm(x, ord=float("inf")))
    if m == 0:
        return None, 0
    e = math.frexp(m)[1]
    half = -e // 2
    return x * 2.0 ** half * 2.0 ** (-e - half), e


def _floor(dtypes) -> float:
    """The smallest |c_i| a row-factor fit accepts. The step's gradients are c_i times the risk's:
    where they underflow, the risk's own lie below tiny / |c_i|. With |c_i| >= float32's epsilon
    that is below 1e-31 in float32 and bfloat16 (float64's range shifted alike): beneath anything
    their arithmetic resolves. float16's range is too narrow for any margin: there |c_i| >= 1 (the
    step's gradients no smaller than the risk's). Below the floor the risk is differentiated."""
    dtypes = [d for d in dtypes if d.is_floating_point]
    if torch.float16 in dtypes:
        return 1.0
    f32 = torch.finfo(torch.float32)
    return max(torch.finfo(d).tiny for d in dtypes) / f32.tiny * f32.eps
