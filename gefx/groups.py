"""Parameter groups: which group each counted parameter's inner products are summed into.

Presets (found from the model's structure, not from name strings):

    "param"      one group per parameter (its canonical name)
    "module"     one group per owning module (its qualified name)
    "block"      "embed", "block.0" ... "block.{n-1}", "final_norm", "lm_head"
    "paper"      "embed", "shallow", "middle", "deep", "final_norm", "lm_head"
                 (blocks split in thirds, as the paper's figures; with two blocks
                 shallow and deep, with one shallow)
    "reference"  "embed", "layers.0-9", "layers.10-19", "layers.20+", "final_norm", "lm_head"
                 (the reference code's groups)
    callable     name -> group name

The blocks are the model's largest ``nn.ModuleList`` of same-class children (a transformer's
decoder layers). Outside them: parameters of ``nn.Embedding`` modules go to "embed" (a tied
input/output embedding counts once, here), the output embedding (``get_output_embeddings()``,
else the last linear module after the blocks) to "lm_head", an elementwise-affine norm after the
blocks to "final_norm", and any other parameter to a group named after its own module: no
parameter is silently merged into a neighbour's group. Groups that receive no parameter are
omitted; the order is that of the model's parameters.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .dist import shape
from .precision import acc_dtype

PRESETS = ("param", "module", "block", "paper", "reference")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: its largest ModuleList of same-class parameterised children."""
    best, best_size = [], 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            kids = list(m)
            if len({type(k) for k in kids}) == 1 and all(any(True for _ in k.parameters()) for k in kids):
                size = sum(shape(p).numel() for p in m.parameters())
                if size > best_size:
                    best, best_size = kids, size
    return best


def _block_name(i: int, n: int, preset: str) -> str:
    if preset == "block":
        return f"block.{i}"
    if preset == "paper":
        # thirds; two blocks are shallow and deep (the first and the last third), one is shallow
        return ("shallow", "middle", "deep")[2 if n == 2 and i == 1 else min(2, i * 3 // n)]
    return "layers.0-9" if i < 10 else "layers.10-19" if i < 20 else "layers.20+"


def _structural(tape, preset: str) -> dict[str, str]:
    from .rules import _norm_candidate

    model = tape.model
    blocks = find_blocks(model)
    block_of = {id(p): i for i, blk in enumerate(blocks) for p in blk.parameters()}
    in_block = {id(m) for blk in blocks for m in blk.modules()}
    order = {id(m): k for k, m in enumerate(model.modules())}
    last_block = max((order[id(b)] for b in blocks), default=-1)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        linears = [m for m in tape.owned if isinstance(m, nn.Linear) and id(m) not in in_block
                   and order[id(m)] > last_block]
        head = linears[-1] if linears else None
    out: dict[str, str] = {}
    for module, names in tape.owned.items():
        for local, name in names:
            p = tape.params[name]
            if id(p) in block_of:
                group = _block_name(block_of[id(p)], len(blocks), preset)
            elif isinstance(module, nn.Embedding):
                group = "embed"
            elif module is head:
                group = "lm_head"
            elif _norm_candidate(module) and order[id(module)] > last_block >= 0:
                group = "final_norm"
            else:
                group = tape.module_names.get(module, type(module).__name__)
            if name not in out or group == "embed":  # a tied embedding counts in "embed"
                out[name] = group
    return out


def resolve(tape, spec: str | Callable[[str], str]) -> tuple[dict[str, str], list[str]]:
    """(parameter name -> group, groups in order) for the tape's counted parameters."""
    cache = tape.group_cache
    if isinstance(spec, str) and spec in cache:
        return cache[spec]
    if callable(spec):
        mapping = {}
        for name in tape.params:
            g = spec(name)
            if not isinstance(g, str):
                raise TypeError(f"the groups callable returned {type(g).__name__} for {name!r}; it must return a str")
            mapping[name] = g
    elif spec == "param":
        mapping = {name: name for name in tape.params}
    elif spec == "module":
        mapping = {}
        for module, names in tape.owned.items():
            for _, name in names:
                mapping.setdefault(name, tape.module_names.get(module, type(module).__name__))
    elif spec in ("block", "paper", "reference"):
        mapping = _structural(tape, spec)
    else:
        raise ValueError(f"unknown groups {spec!r}: use one of {', '.join(PRESETS)} or a callable")
    mapping = {name: mapping[name] for name in tape.params}
    order = list(dict.fromkeys(mapping.values()))
    if isinstance(spec, str):
        cache[spec] = (mapping, order)
    return mapping, order


def group_sums(tape, per_param: dict[str, torch.Tensor], groups, shape) -> dict[str, torch.Tensor]:
    """Sum per-parameter values into groups (every group present, zeros where nothing reached)."""
    mapping, order = resolve(tape, groups)
    p0 = next(iter(tape.params.values()))
    dt = acc_dtype(*tape.params.values())
    out = {g: torch.zeros(shape, dtype=dt, device=p0.device) for g in order}
    for name, v in per_param.items():
        out[mapping[name]] += v.to(dt)
    return out
