"""A partial backward whose output gradients are used as they come and dropped.

``torch.autograd.grad(loss, [every recorded output])`` returns all the output gradients at once:
one set of B x T x width tensors per recorded layer, alive together (for a 1B Llama at 256 tokens,
about half a GiB). :func:`stream` runs the same backward but hands each recorded output's gradient
to a callback the moment autograd computes it (a pre-hook on the node that produced the output),
so that the caller can turn it into pieces, contract them and let them go while the backward moves
on to the layers below. Only the outputs nothing else recorded lies behind (the *sinks*: the
embedding's output, the first layer of a side branch) are asked of autograd as results; every other
recorded node runs because a sink lies behind it, and its gradient is seen by the pre-hook (the
engine runs each node once, with its gradients complete). The gradients are those of the plain
call, bit for bit: nothing is changed on the way.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def _sinks(nodes: list) -> set:
    """The nodes among `nodes` behind which (towards the inputs) no other of `nodes` lies: one
    memoised walk of the graph above them."""
    wanted = set(nodes)
    behind: dict = {}  # node -> some node of `wanted` lies strictly behind it

    def kids(node) -> list:
        return [n for n, _ in node.next_functions if n is not None]

    for root in nodes:
        stack = [root]
        while stack:
            node = stack[-1]
            if node in behind:
                stack.pop()
                continue
            todo = [k for k in kids(node) if k not in behind and k not in wanted]
            if todo:
                stack.extend(todo)
                continue
            behind[node] = any(k in wanted or behind[k] for k in kids(node))
            stack.pop()
    return {n for n in wanted if not behind[n]}


def stream(root: torch.Tensor, slots: list, visit: Callable[[int, torch.Tensor | None], None]) -> None:
    """Backpropagate the scalar `root` (the graph kept) and call ``visit(j, g)`` once for each
    ``slots[j] = (call, output index, edge)`` with the gradient of the output as recorded
    (``Call.as_output``; None where `root` does not reach it), as soon as it exists. Exceptions
    raised by `visit` end the backward and propagate."""
    by_node: dict = {}
    for j, (_, _, e) in enumerate(slots):
        by_node.setdefault(e.node, []).append(j)
    done: set = set()

    def seen(j: int, g) -> None:
        if j not in done:
            done.add(j)
            call, k, _ = slots[j]
            visit(j, call.as_output(k, g))

    def hook_for(js: list):
        def hook(grad_outputs):
            for j in js:
                seen(j, grad_outputs[slots[j][2].output_nr])
        return hook

    sinks = _sinks(list(by_node))
    asked = [j for j, (_, _, e) in enumerate(slots) if e.node in sinks]
    handles = [node.register_prehook(hook_for(js)) for node, js in by_node.items() if node not in sinks]
    try:
        got = torch.autograd.grad(root, [slots[j][2] for j in asked], retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for j, g in zip(asked, got):
        seen(j, g)
    del got
    for j in range(len(slots)):  # not reached
        seen(j, None)
