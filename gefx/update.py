"""The exact parameter change an optimizer's next ``step()`` will make, without making it.

``update(opt)`` returns ``{parameter: delta}`` with ``delta = theta_after - theta_before``, the
tensor ``opt.step()`` is about to ADD to each parameter (same dtype and device; for plain SGD
``delta = -lr * grad``). ``gefx.g_effect(..., optimizer=opt)`` uses it to give each risk's
predicted change ``<grad r_i, delta>`` for the step the run really takes, instead of the paper's
plain-SGD assumption. The optimizer's state and the parameters are never modified.

The delta is realized, not idealized: it is computed by applying torch's own operations, in the
parameter's dtype, to a copy of the parameter and subtracting, so it carries the rounding of
``theta + update`` (in bfloat16 a small update may round to zero, exactly as in the real step).

Closed forms (torch 2.x, read from the state and each param group; g is the gradient, negated
when ``maximize``; t the step count after this step, 1 when the state is still empty):

* SGD:   g += wd*theta;  with momentum mu: b = g on the first step, else b = mu*b + (1-dampening)*g,
         then g = g + mu*b (nesterov) or g = b;  delta = -lr*g.
* Adam:  g += wd*theta (L2);  AdamW (``decoupled_weight_decay``): theta *= 1 - lr*wd instead;
         m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g^2;  amsgrad: v = max(v_max, v);
         theta -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps).
  The operations are those of torch's for-loop implementation: its float branch, or with
  ``capturable`` / ``differentiable`` its tensor branch (bias corrections from the ``step``
  tensor, in its dtype: float32 even for float64 parameters), or with ``foreach`` and
  ``capturable`` that branch's own order. The for-loop and foreach steps are thus reproduced
  bit for bit in float64/float32 (bfloat16 foreach SGD: within an ulp). The fused kernels
  (lr read as a double) order their arithmetic differently: the result then agrees to the
  rounding of ``theta + update`` (an ulp of ``|theta_after|``).
  In torch 2.x AdamW is ``Adam(decoupled_weight_decay=True)`` and shares its ``step``.

Any other optimizer, an SGD/Adam/AdamW subclass that overrides ``step`` or ``_init_group``, a
sparse gradient, or fused SGD with 16-bit parameters on the CPU (whose kernel skips most of the
update in torch <= 2.13, pytorch/pytorch#191763): a throw-away twin is stepped (``type(opt)``
rebuilt on detached clones of the parameters with the same param groups, a deep copy of
``opt.state_dict()`` loaded, the gradients cloned onto the clones), at the cost of one copy of
the parameters and the state. When that is impossible (a closure-only step such as LBFGS, a
constructor or state dict it cannot rebuild from, a failing step) a TypeError says why: then
compute the change yourself and pass it as ``g_effect(..., direction=...)``.

Step hooks (``register_step_pre_hook`` / ``_post_hook``) are not run by the closed forms and
only the global ones run on the twin; a warning says so when the optimizer has any. Under AMP,
call it after ``GradScaler.unscale_(opt)`` (it does not know the scale, nor that the scaler may
skip the step). The result is detached.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim import optimizer as _optim_mod

__all__ = ["update", "updates"]

GradOf = Callable[[Tensor], "Tensor | None"]


def update(optimizer: Optimizer, grads: Mapping[Tensor, Tensor | None] | None = None) -> dict[Tensor, Tensor]:
    """{parameter: delta}: the change ``optimizer.step()`` is about to add to each parameter.

    Args:
        optimizer: a torch optimizer; its state, param groups and parameters are left untouched.
        grads: {parameter: gradient} to use instead of ``p.grad``. A parameter of the optimizer
            missing from `grads` (or mapped to None) counts as having no gradient. None: each
            parameter's ``.grad``.

    Returns:
        ``theta_after - theta_before`` (same dtype and device as the parameter) for every
        parameter with a gradient. Parameters without one are absent: torch's optimizers skip
        them (no weight decay, no momentum, state unchanged). See the module docstring for the
        formulas and the fallback.

    Raises:
        ValueError: a gradient of the wrong shape, dtype or device, or a `grads` key that is not
            a parameter of the optimizer.
        TypeError: the optimizer has no closed form and cannot be stepped as a throw-away copy.
    """
    return dict(updates(optimizer, grads))


def updates(optimizer: Optimizer, grads: Mapping[Tensor, Tensor | None] | Callable | None = None,
            has_grad: Callable[[Tensor], bool] | None = None) -> Mapping[Tensor, Tensor]:
    """:func:`update` as a mapping whose deltas are formed when read (closed forms: one parameter's
    delta at a time, nothing parameter-sized kept; the fallback twin is stepped at once).
    `grads` may also be a callable parameter -> gradient or None, read only for the parameters
    whose delta is read; `has_grad(p)` then says which parameters have one without forming it."""
    grad_of = grads if callable(grads) else _grad_lookup(optimizer, grads)
    has_grad = has_grad or (lambda p: grad_of(p) is not None)
    _warn_hooks(optimizer)
    closed = _closed_form(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with_grad = [p for p in params if has_grad(p)]
    sparse = any(p.grad is not None and p.grad.is_sparse for p in with_grad) if callable(grads) else \
        any(grad_of(p).is_sparse for p in with_grad)
    if closed is None or sparse or _kernel_only(optimizer, closed, with_grad):
        return _fallback(optimizer, grad_of)
    return _Deltas(optimizer, closed, grad_of, has_grad)


def updates_as_they_come(optimizer: Optimizer) -> Mapping[Tensor, Tensor] | None:
    """:func:`updates` for a backward still running: a parameter's delta is formed from its
    ``.grad`` when read (once the backward has finished that gradient); contains the parameters
    that have a ``.grad`` at the time of asking. Closed forms only (SGD / Adam / AdamW with dense
    gradients): None where the update needs every gradient at once (the fallback steps a copy)."""
    closed = _closed_form(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if closed is None or _kernel_only(optimizer, closed, params) or any(p.is_sparse for p in params):
        return None
    _warn_hooks(optimizer)
    deltas = _Deltas(optimizer, closed, lambda p: p.grad, lambda p: True)
    return _Present(deltas)


class _Present(Mapping):
    """A {parameter: delta} mapping restricted to the parameters that have a gradient now."""

    def __init__(self, deltas: Mapping):
        self.deltas = deltas

    def __getitem__(self, p: Tensor) -> Tensor:
        if p.grad is None:
            raise KeyError("no gradient")
        if p.grad.is_sparse:
            raise ValueError("a sparse gradient has no closed-form update here; measure with optimizer= after the "
                             "step's backward (gefx.update(optimizer))")
        return self.deltas[p]

    def __contains__(self, p) -> bool:
        return p.grad is not None and p in self.deltas

    def __iter__(self):
        return (p for p in self.deltas if p.grad is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Deltas(Mapping):
    """{parameter: delta} of a closed form, each delta formed when read."""

    def __init__(self, optimizer: Optimizer, closed, grad_of: GradOf, has_grad):
        self.optimizer, self.closed, self.grad_of = optimizer, closed, grad_of
        self.where = {}
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if has_grad(p)]
            impl = _implementation(group, mine)
            self.where.update((p, (group, impl)) for p in mine)

    def __getitem__(self, p: Tensor) -> Tensor:
        group, impl = self.where[p]
        g = self.grad_of(p)
        with torch.no_grad():
            return self.closed(self.optimizer.state.get(p, {}), group, impl, p.detach(), g.detach(), self.optimizer)

    def __contains__(self, p) -> bool:
        return p in self.where

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _grad_lookup(optimizer: Optimizer, grads) -> GradOf:
    params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    if grads is None:
        return lambda p: p.grad
    for key, g in grads.items():
        p = params.get(id(key))
        if p is None:
            what = f"a tensor of shape {tuple(key.shape)}" if isinstance(key, Tensor) else repr(key)
            raise ValueError(f"grads is keyed by the optimizer's parameters; {what} is not one of them")
        if g is not None and (g.shape != p.shape or g.dtype != p.dtype or g.device != p.device):
            raise ValueError(f"gradient {tuple(g.shape)} {g.dtype} on {g.device} does not match its parameter "
                             f"{tuple(p.shape)} {p.dtype} on {p.device}")
    return lambda p: grads.get(p)


def _warn_hooks(optimizer: Optimizer) -> None:
    hooks = [getattr(optimizer, "_optimizer_step_pre_hooks", {}), getattr(optimizer, "_optimizer_step_post_hooks", {}),
             _optim_mod._global_optimizer_pre_hooks, _optim_mod._global_optimizer_post_hooks]
    if any(len(h) for h in hooks):
        warnings.warn(f"{type(optimizer).__name__} has step hooks: gefx.update does not run them, so the "
                      "change it predicts ignores whatever they do", stacklevel=3)


def _same(cls: type, base: type, name: str) -> bool:
    mine, theirs = getattr(cls, name, None), getattr(base, name, None)
    return mine is not None and theirs is not None and inspect.unwrap(mine) is inspect.unwrap(theirs)


def _closed_form(optimizer: Optimizer):
    """The closed form for `optimizer`, or None when its step is not torch's own SGD/Adam/AdamW.

    ``Optimizer.__init__`` wraps ``type(opt).step`` in a profiling hook (set on the subclass
    itself), so the functions are compared after ``inspect.unwrap``."""
    cls = type(optimizer)
    for base, form in ((SGD, _sgd), (Adam, _adam), (AdamW, _adam)):
        if isinstance(optimizer, base) and _same(cls, base, "step") and _same(cls, base, "_init_group"):
            return form
    return None


def _kernel_only(optimizer: Optimizer, closed, params: list[Tensor]) -> bool:
    """Fused SGD on the CPU with 16-bit parameters: in torch <= 2.13 the kernel leaves every full
    SIMD block of the parameter unchanged (pytorch/pytorch#191763), so only stepping it tells."""
    fused = any(group.get("fused") for group in optimizer.param_groups)
    return closed is _sgd and fused and any(p.device.type == "cpu" and p.dtype in (torch.float16, torch.bfloat16)
                                            for p in params)


def _sgd(state: dict, group: dict, impl: str, p: Tensor, g: Tensor, optimizer: Optimizer) -> Tensor:
    """torch.optim.sgd._single_tensor_sgd on a copy of `p` (foreach and fused: the same formula)."""
    lr, wd, mu = _scalar(group["lr"]), group["weight_decay"], group["momentum"]
    grad = -g if group["maximize"] else g
    if wd != 0:
        grad = grad.add(p, alpha=wd)
    if mu != 0:
        buf = state.get("momentum_buffer")
        buf = grad.clone() if buf is None else buf.mul(mu).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buf, alpha=mu) if group["nesterov"] else buf
    new = p.clone()
    new.add_(grad, alpha=-lr)
    return new.sub_(p)


def _adam(state: dict, group: dict, impl: str, p: Tensor, g: Tensor, optimizer: Optimizer) -> Tensor:
    """torch.optim.adam's update of one parameter, from copies of its state: two parameter-sized
    temporaries in float32 / float64 (the moments; the second becomes the denominator, then the
    new value), three in 16-bit (the new value apart)."""
    lr, wd, eps = _scalar(group["lr"]), group["weight_decay"], group["eps"]
    if impl == "fused" and isinstance(lr, Tensor):
        lr = lr.item()  # the fused kernels take lr as a double; the others keep the tensor's dtype
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    decoupled = group.get("decoupled_weight_decay", False) or isinstance(optimizer, AdamW)
    grad = -g if group["maximize"] else g
    if wd != 0 and not decoupled:
        grad = grad.add(p, alpha=wd)

    def real(t: Tensor) -> Tensor:
        return torch.view_as_real(t) if t.is_complex() else t

    def moment(key: str) -> Tensor:  # zeros on the first step, as torch initializes them
        return real(state[key] if key in state else torch.zeros_like(p))

    grad = real(grad)
    b1 = beta1.to(device=p.device, dtype=grad.dtype) if isinstance(beta1, Tensor) else beta1
    m = moment("exp_avg").lerp(grad, 1 - b1)
    v = moment("exp_avg_sq").mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    del grad
    if group["amsgrad"]:
        v = torch.maximum(moment("max_exp_avg_sq"), v)
    tensor_branch = impl != "fused" and (group["capturable"] or group["differentiable"])
    value = _adam_denominator(v, _next_step(state, group, p), lr, beta1, beta2, eps,
                              ("foreach_tensor" if impl == "foreach" else "tensor") if tensor_branch else "float")
    decay = 1 - lr * wd if wd != 0 and decoupled else None
    if v.dtype in (torch.float16, torch.bfloat16):  # addcdiv computes in float32 there, one rounding: as torch
        new = real(p) * decay if decay is not None else real(p).clone()
        new.addcdiv_(m, v, value=value)
    else:  # torch's addcdiv is self + (value * t1) / t2: the same roundings, the new value formed in v
        m.mul_(value).div_(v)
        new = torch.mul(real(p), decay, out=v) if decay is not None else v.copy_(real(p))
        new.add_(m)
    del m, v
    return (torch.view_as_complex(new) if p.is_complex() else new).sub_(p)


def _adam_denominator(v: Tensor, step: Tensor, lr, beta1, beta2, eps: float, branch: str):
    """v <- denom (in place: v is this update's own temporary), returning the `value` of torch's
    ``param.addcdiv_(exp_avg, denom, value)``, in the operation order of torch's `branch`: "float"
    (bias corrections as Python floats: for-loop, foreach and fused without capturable), "tensor"
    (for-loop with capturable or differentiable: from the step tensor, in its dtype; the step size
    folded into denom, value 1) or "foreach_tensor" (foreach with capturable: likewise)."""
    if branch == "float":
        t = step.item()
        v.sqrt_().div_((1 - beta2 ** t) ** 0.5).add_(eps)
        return -(lr / (1 - beta1 ** t))
    if branch == "tensor":
        step_size_neg = (lr / (1 - beta1 ** step)).neg()
        v.sqrt_().div_((1 - beta2 ** step).sqrt() * step_size_neg).add_(eps / step_size_neg)
        return 1
    step_size = ((beta1 ** step - 1) / lr).reciprocal()  # = -lr/(1-beta1^t)
    v.sqrt_().div_((-(beta2 ** step - 1)).sqrt()).add_(eps).div_(step_size)
    return 1


def _implementation(group: dict, params: list[Tensor]) -> str:
    """"loop", "foreach" or "fused": which of torch's implementations this group's step runs."""
    if group.get("fused"):
        return "fused"
    foreach = group.get("foreach")
    if foreach is None and group.get("fused") is None:  # torch's default: foreach on CUDA
        foreach = _optim_mod._default_to_fused_or_foreach(params, group.get("differentiable", False))[1]
        foreach = foreach and (group.get("capturable", False) or not isinstance(group["lr"], Tensor))
    return "foreach" if foreach else "loop"


def _next_step(state: dict, group: dict, p: Tensor) -> Tensor:
    """The step count this step will use, as the tensor torch keeps (dtype and device included)."""
    step = state.get("step")
    if step is None:
        default = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        if group["capturable"] or group["fused"]:
            step = torch.zeros((), dtype=torch.float32 if group["fused"] else default, device=p.device)
        else:
            step = torch.tensor(0.0, dtype=default)
    elif not torch.is_tensor(step):
        step = torch.tensor(float(step))
    return step.detach() + 1


def _scalar(x):
    """torch.optim.optimizer._to_scalar: a 1-element tensor hyper-parameter as a 0-dim tensor."""
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


def _fallback(optimizer: Optimizer, grad_of: GradOf) -> dict[Tensor, Tensor]:
    """Step a throw-away twin of `optimizer` on clones of its parameters."""
    cls = type(optimizer)

    def refuse(why: str) -> TypeError:
        return TypeError(f"gefx.update cannot predict the step of {cls.__name__}: {why}. Compute the "
                         "parameter change yourself and pass it as g_effect(..., direction=...)")

    step_sig = inspect.signature(inspect.unwrap(cls.step))
    closure = step_sig.parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise refuse("its step() requires a closure that re-evaluates the loss")
    clones = {p: p.detach().clone().requires_grad_(p.requires_grad)
              for group in optimizer.param_groups for p in group["params"]}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [clones[p] for p in group["params"]]}
              for group in optimizer.param_groups]
    try:
        twin = cls(groups, **_accepted(cls, optimizer.defaults))
        twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    except Exception as e:
        raise refuse(f"it could not be rebuilt from its param groups and state dict ({type(e).__name__}: {e})") from e
    with_grad = set()
    for p, c in clones.items():
        g = grad_of(p)
        if g is not None:
            c.grad = g.detach().clone()
            with_grad.add(id(p))
    try:
        twin.step()
    except Exception as e:
        raise refuse(f"stepping a throw-away copy failed ({type(e).__name__}: {e})") from e
    return {p: c.detach() - p.detach() for p, c in clones.items() if id(p) in with_grad or not torch.equal(c, p)}


def _accepted(cls: type, defaults: dict) -> dict:
    """The entries of `defaults` that `cls`'s constructor takes as keywords."""
    params = inspect.signature(cls.__init__).parameters
    if any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params and params[k].kind is not inspect.Parameter.POSITIONAL_ONLY}
