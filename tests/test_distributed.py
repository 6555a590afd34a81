"""g_effect under torch.distributed (gloo, 2 processes on the CPU) equals one process running the
concatenated batch."""
import contextlib
import datetime
import gc
import os
import time
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gefx
from gefx.losses import sequence_nll
from helpers import batch, tiny_model

pytestmark = pytest.mark.slow
WORLD = 2


def data():
    fi, fm, fl = batch(4, 8, seed=51)
    ri, rm, rl = batch(3, 6, seed=52)
    return (fi, fm, fl), (ri, rm, rl)


def shard(rank):
    """Rank 0 gets forget rows 0-1 and retain rows 0-1; rank 1 forget rows 2-3, retain row 2."""
    (fi, fm, fl), (ri, rm, rl) = data()
    f = slice(2 * rank, 2 * rank + 2)
    r = slice(0, 2) if rank == 0 else slice(2, 3)
    return (fi[f], fm[f], fl[f]), (ri[r], rm[r], rl[r])


def measure(model, fb, rb, vector: bool, direction=None):
    with gefx.trace(model) as tape:
        nll_f = sequence_nll(model(input_ids=fb[0], attention_mask=fb[1]).logits, fb[2])
        nll_r = sequence_nll(model(input_ids=rb[0], attention_mask=rb[1]).logits, rb[2])
        objective = -nll_f if vector else -nll_f.sum() + 0.3 * nll_r.sum()
        out = gefx.g_effect(tape, objective, {"forget": nll_f, "retain": nll_r}, direction=direction,
                            norms=True).to_dict()
        if not vector:
            out["dots"] = all_dots(tape, model, nll_f, nll_r)
        return out


def all_dots(tape, model, nll_f, nll_r) -> dict:
    """grad_dots in each of its forms (norms, against a scalar, pairwise, against a mapping)."""
    def flat(d):
        return {"total": d.total.tolist(), "per_group": {g: v.tolist() for g, v in d.per_group.items()}}

    g = torch.Generator().manual_seed(5)
    mapping = {p: torch.randn(tuple(getattr(p, "ds_shape", p.shape)), generator=g, dtype=torch.float64)
               for p in model.parameters()}
    return {"norms": flat(gefx.grad_dots(tape, nll_f, groups="block")),
            "scalar": flat(gefx.grad_dots(tape, nll_f, nll_r.sum(), groups="block")),
            "pairs": flat(gefx.grad_dots(tape, nll_r, nll_f, groups="block")),
            "mapping": flat(gefx.grad_dots(tape, nll_f, mapping, groups="block"))}


def direction_of(model):
    """The same seeded direction on every rank and in the single process (parameter order)."""
    g = torch.Generator().manual_seed(3)
    return {p: torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()}


def wrapped(wrap):
    model = tiny_model("llama", torch.float64)
    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def measure_rank(rank, wrap):
    """This rank's results; every model, graph and gradient dies when it returns."""
    model = wrapped(wrap)
    fb, rb = shard(rank)
    with counting_full_tensor() as whole:
        results = [measure(model, fb, rb, vector) for vector in (True, False)]
    # FSDP2: products shard by shard; only the RMSNorm weights (1-D) are read whole, by their rule
    assert all(len(shape) == 1 for shape in whole), whole
    if wrap == "fsdp2":  # tensor parallelism (a weight sharded along another dimension) is refused
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        tp = torch.nn.Linear(4, 6, bias=False)
        mesh = init_device_mesh("cpu", (WORLD,))
        tp.weight = torch.nn.Parameter(distribute_tensor(tp.weight.detach(), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match="tensor-parallel"):
            gefx.trace(tp)
    if wrap in ("ddp", "fsdp2"):  # online mode: the averaged gradient of the step's own backward
        with gefx.trace(model) as tape:
            nll_f = sequence_nll(model(input_ids=fb[0], attention_mask=fb[1]).logits, fb[2])
            nll_r = sequence_nll(model(input_ids=rb[0], attention_mask=rb[1]).logits, rb[2])
            (-nll_f.sum() + 0.3 * nll_r.sum()).backward(retain_graph=True)
            # FSDP2: .grad holds DTensors, of which only this rank's shard is read (what the Trainer mixin
            # passes: gefx.engine_grads); DDP: the plain mapping
            step_grads = {n: p.grad for n, p in model.named_parameters()}
            grads = gefx.engine_grads(model) if wrap == "fsdp2" else step_grads
            with counting_full_tensor() as whole:
                results.append(gefx.g_effect(tape, grads, {"forget": nll_f, "retain": nll_r}).to_dict())
            assert all(len(shape) == 1 for shape in whole), whole
        model.zero_grad(set_to_none=True)
        with gefx.trace(model) as tape:  # the same, with gefx running the step's backward
            nll_f = sequence_nll(model(input_ids=fb[0], attention_mask=fb[1]).logits, fb[2])
            nll_r = sequence_nll(model(input_ids=rb[0], attention_mask=rb[1]).logits, rb[2])
            eff = gefx.g_effect(tape, -nll_f.sum() + 0.3 * nll_r.sum(), {"forget": nll_f, "retain": nll_r},
                                backward=True, direction=direction_of(model))
            assert all(torch.equal(p.grad, step_grads[n]) for n, p in model.named_parameters())
            results.append(eff.to_dict())
    if wrap == "fsdp2":  # the predicted change along AdamW's next update: exactly the step's change
        # (last: it moves the parameters)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with gefx.trace(model) as tape:
            nll_f = sequence_nll(model(input_ids=fb[0], attention_mask=fb[1]).logits, fb[2])
            nll_r = sequence_nll(model(input_ids=rb[0], attention_mask=rb[1]).logits, rb[2])
            prepared = gefx.prepare(tape, {"forget": nll_f, "retain": nll_r})
            (-nll_f.sum() + 0.3 * nll_r.sum()).backward()
            before = [p.detach().full_tensor().clone() for p in model.parameters()]
            predicted = prepared.against(gefx.engine_grads(model), optimizer=opt)
            opt.step()
            delta = {p: p.detach().full_tensor() - b for p, b in zip(model.parameters(), before)}
            actual = prepared.against(gefx.engine_grads(model), direction=delta)
        for risk in ("forget", "retain"):
            a, b = (torch.tensor(e[risk].predicted_change) for e in (predicted, actual))
            assert (a - b).abs().max() <= 1e-9 * b.abs().max(), (a, b)
        opt.zero_grad(set_to_none=True)
    return results


@contextlib.contextmanager
def counting_full_tensor():
    """Shapes of the DTensors read whole (``full_tensor()``) inside the block."""
    seen = []
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        yield seen
        return
    original = DTensor.full_tensor

    def counted(self, *args, **kwargs):
        seen.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    DTensor.full_tensor = counted
    try:
        yield seen
    finally:
        DTensor.full_tensor = original


def _worker(rank, port, out, wrap):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(measure_rank(rank, wrap), f"{out}.{rank}")
        gc.collect()  # DDP's reducer holds the process group: release it before the group goes
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, what: str):
    """Run fn(rank, port, *args) on WORLD processes; a worker's error fails the test, a hang too."""
    workers = mp.spawn(fn, args=(free_port(), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not workers.join(timeout=2):  # raises if a worker failed; never hangs CI
        if time.monotonic() > deadline:
            for p in workers.processes:
                p.kill()
            pytest.fail(f"the {WORLD} {what} workers did not finish within 300 s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return a == b


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("wrap", ["ddp", "replicated", pytest.param("fsdp2", marks=pytest.mark.skipif(
    not _has_fully_shard(), reason="this torch has no torch.distributed.fsdp.fully_shard"))])
def test_two_processes_equal_one_process(tmp_path, wrap):
    out = str(tmp_path / "res")
    spawn(_worker, out, wrap, what=wrap)
    single = tiny_model("llama", torch.float64)
    fb, rb = data()
    expected = [measure(single, fb, rb, vector) for vector in (True, False)]
    along = measure(single, fb, rb, False, direction_of(single))
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        if wrap in ("ddp", "fsdp2"):  # gradients are averaged: the online result is that of objective / WORLD
            step, online = got.pop(), got.pop()
            for risk in ("forget", "retain"):
                assert close([WORLD * v for v in online[risk]["per_instance"]], expected[1][risk]["per_instance"])
                # backward=True reuses the step's output gradients (both risks here): equal to the
                # online values to float32 roundoff, Llama's RMSNorm computing in float32 (gefx.step)
                ref = torch.tensor(online[risk]["per_instance"])
                assert (torch.tensor(step[risk]["per_instance"]) - ref).abs().max() <= 1e-6 * ref.abs().max()
                pred = torch.tensor(along[risk]["predicted_change"])  # the direction's products, gathered
                assert (torch.tensor(step[risk]["predicted_change"]) - pred).abs().max() <= 1e-6 * pred.abs().max()
        assert close(got, expected), f"rank {rank} differs from the single-process run"
    assert len(expected[0]["retain"]["per_instance"]) == 3  # uneven shards gathered in rank order


def test_unsupported_parallel_setups_are_refused():
    class FullyShardedDataParallel(torch.nn.Module):  # stands in for FSDP1's wrapper class
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    with pytest.raises(ValueError, match="FSDP1"):
        gefx.trace(FullyShardedDataParallel(tiny_model("llama", torch.float64)))
