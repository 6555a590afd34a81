"""The training step's own backward, reused: ``g_effect(tape, loss, risks, backward=True)``.

On its way to the parameters, the step's ``loss.backward()`` computes the loss's gradient at every
recorded layer output. :class:`StepBackward` runs that backward with a hook on each recorded
output, so that

* ``.grad`` ends up exactly as ``loss.backward()`` leaves it (accumulated onto earlier gradients),
  and the objective's aggregated gradient is ``.grad`` itself: no gradient GEMM is added;
* the captured output gradients are the objective's per-sample pieces (per-objective-instance
  effects come without another backward);
* a risk gets its output gradients without a backward of its own when the step already holds them
  up to one factor per sample (:meth:`StepBackward.risk_grads`).

Row-scaled reuse (the math). Let H be the one recorded output (the logits) through which the risk
r reaches the traced forward, and suppose the loss L reaches the recorded outputs upstream of H
only through H. Backpropagation is linear, and row i of an upstream output affects only row i of H
(the per-sample contract), so

    dL/dH[i] = c_i dr_i/dH[i] for every row i   ==>   dr_i/dy[i] = dL/dy[i] / c_i   for every upstream y.

The condition holds for objectives that weight each sample's NLL by one factor (GA: c_i = -n_i/N;
NPO: the instance weight; GradDiff's terms; DPO), not for token-weighted ones (TNPO, WGA): then the
risk's own backward runs from H (it costs no more than without the reuse). The graph conditions
are checked by walking the autograd graph (no arithmetic); the factors by the risk's backward
through the loss head alone (dr/dH) and a least-squares fit per row, accepted only when the
residual ||dL/dH[i] - c_i dr/dH[i]|| is within 32 float32 roundoffs of ||dL/dH[i]|| (float64
roundoffs for a float64 H). In 16-bit heads the two gradients are rounded separately, so this test
fails unless they are exactly proportional, and the risk is differentiated as usual.
"""
from __future__ import annotations

import torch

from .dots import _check_loss
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


class StepBackward:
    """``loss.backward(retain_graph=True)`` with the recorded outputs' gradients captured.

    Use as a context manager: on a normal exit the gradients held in ``.grad`` before the step
    are added back (``.grad = earlier + step``, as ``loss.backward()`` accumulates); on an
    exception ``.grad`` is restored to what it was before.
    """

    def __init__(self, tape: Tape, loss: torch.Tensor):
        tape.check_open()
        self.tape, self.loss = tape, loss
        self.outs = [o for c in tape.calls for o in c.outputs]
        if not self.outs:
            raise ValueError("nothing was recorded: run the model's forward inside the gefx.trace block")
        self.captured: list[torch.Tensor | None] = [None] * len(self.outs)
        self._earlier: dict[str, torch.Tensor | None] = {}
        self._memo: dict = {}

    def __enter__(self) -> "StepBackward":
        # the step's gradient alone lands in .grad; earlier gradients wait aside
        self._earlier = {n: p.grad for n, p in self.tape.params.items()}
        for p in self.tape.params.values():
            p.grad = None

        def store(k):
            def hook(g):
                self.captured[k] = g
            return hook

        handles = [o.register_hook(store(k)) for k, o in enumerate(self.outs)]
        try:
            self.loss.sum().backward(retain_graph=True)
        except BaseException:
            self._restore(failed=True)
            raise
        finally:
            for h in handles:
                h.remove()
        self.grads = {n: p.grad for n, p in self.tape.params.items() if p.grad is not None}
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._restore(failed=exc_type is not None)

    def _restore(self, failed: bool) -> None:
        for n, p in self.tape.params.items():
            old = self._earlier.get(n)
            if failed or p.grad is None:
                p.grad = old
            elif old is not None:
                p.grad = old.add_(p.grad)
        self._earlier = {}

    # -- risks ------------------------------------------------------------------------------------
    def risk_grads(self, risk: torch.Tensor, what: str) -> list[torch.Tensor | None] | None:
        """The risk's gradient at every recorded output (None where it does not reach), reusing
        the step's where the module docstring's conditions hold and otherwise by one backward
        from the risk's head; None when the risk does not reach the forward through a single
        recorded head (the caller then differentiates it as usual)."""
        _check_loss(risk, what, per_sample=True)
        nodes: dict = {}
        for k, o in enumerate(self.outs):
            nodes.setdefault(o.grad_fn, []).append(k)
        heads = _walk(risk.grad_fn, set(nodes)) & set(nodes)
        if len(heads) != 1:
            return None
        (node,) = heads
        if len(nodes[node]) != 1:
            return None
        h = nodes[node][0]
        head = self.outs[h]
        try:
            (g_head,) = torch.autograd.grad(risk.sum(), head, retain_graph=True)
        except RuntimeError as exc:
            raise RuntimeError(f"could not differentiate {what} through the traced forward: {exc}") from exc
        upstream = self._upstream(node, nodes)
        scale = self._row_factors(h, node, upstream, g_head) if risk.shape[0] == head.shape[0] else None
        if scale is None:  # its own backward, started at the head
            inputs = [self.outs[k] for k in upstream]
            got = torch.autograd.grad([head], inputs, [g_head], retain_graph=True, allow_unused=True)
            out: list = [None] * len(self.outs)
            for k, g in zip(upstream, got):
                out[k] = g
            return out
        out = [None] * len(self.outs)
        for k in upstream:
            g = self.captured[k]
            if g is not None and k != h:
                out[k] = g * scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
        out[h] = g_head
        return out

    def _upstream(self, node, nodes: dict) -> list[int]:
        """Recorded outputs that the head depends on (itself included), in tape order."""
        key = ("up", node)
        if key not in self._memo:
            reached = _walk(node, set())
            self._memo[key] = sorted(k for n in reached & set(nodes) for k in nodes[n])
        return self._memo[key]

    def _row_factors(self, h: int, node, upstream: list[int], g_head: torch.Tensor):
        """1 / c_i per row (0 for rows the risk does not reach), or None when the step's
        gradients cannot be reused for this risk."""
        g_loss = self.captured[h]
        if g_loss is None:
            return None
        key = ("bypass", node)
        if key not in self._memo:  # does L reach an output upstream of H other than through H?
            reached = _walk(self.loss.grad_fn, {node})
            ups = {self.outs[k].grad_fn for k in upstream}
            self._memo[key] = bool((reached - {node}) & ups)
        if self._memo[key]:
            return None
        return _row_factors(g_loss, g_head)


def _row_factors(g_loss: torch.Tensor, g_head: torch.Tensor) -> torch.Tensor | None:
    """1 / c_i with g_loss[i] = c_i g_head[i] for every row (0 where g_head[i] = 0), or None
    when some row is not such a multiple to within the accepted residual.

    |c_i| = ||g_loss[i]|| / ||g_head[i]||, its sign that of the rows' dot product over a strided
    subset of entries (the whole row if that is 0): two norms and one pass per row instead of a
    fitted dot product (a full vecdot is ~3-10x slower than a norm on the CPU). Whatever c_i this
    gives, the residual test is what decides."""
    dt = torch.float64 if g_head.dtype == torch.float64 else torch.float32
    b = g_head.shape[0]
    a = g_loss.reshape(b, -1)
    r = g_head.reshape(b, -1)
    na = torch.linalg.vector_norm(a, dim=1, dtype=dt)
    nr = torch.linalg.vector_norm(r, dim=1, dtype=dt)
    sign = torch.sign(torch.linalg.vecdot(a[:, ::61].to(dt), r[:, ::61].to(dt)))
    if (sign == 0).any():
        sign = torch.where(sign == 0, torch.sign(torch.linalg.vecdot(a.to(dt), r.to(dt))), sign)
    c = sign * na / nr.clamp(min=torch.finfo(dt).tiny)
    tol = _ROUNDOFFS * torch.finfo(dt).eps
    for i in range(b):
        if nr[i] == 0:
            continue
        if c[i] == 0:
            return None
        resid = torch.linalg.vector_norm(torch.add(a[i].to(dt), r[i].to(dt), alpha=-float(c[i])))
        if resid > tol * na[i]:
            return None
    return torch.where(nr > 0, 1.0 / torch.where(nr > 0, c, 1.0), 0.0)
