"""Per-rank communication and peak memory of gefx under DDP, FSDP2 and DeepSpeed ZeRO-3 (2 gloo
processes on the CPU), against the training step's own.

    python bench/bench_dist.py                       # Llama shape (4 layers of TinyLlama-1.1B), ~10 min
    python bench/bench_dist.py --model tiny          # the tests' tiny Llama: a code-path check, seconds

Each rank runs: a warm-up step, a plain step (forward of a forget and a retain micro-batch,
loss = -nll_f.sum() + nll_r.sum(), backward, AdamW step), then a step measured before it
(``g_effect`` of the loss on the forget and retain risks) and a step measured online
(``prepare`` before the backward, ``against(gefx.engine_grads(model))`` after it).

Communication: every torch.distributed collective called from Python is wrapped and its payload
counted (the size of the whole tensor it reduces, gathers or broadcasts), per phase and kind.
DDP's gradient all-reduce runs from its C++ reducer and is not seen: RESULTS.md gives its formula. ``sent`` converts payloads
to bytes each rank sends with bandwidth-optimal algorithms: 2 (W-1)/W n for an all-reduce,
(W-1)/W n for any other collective (reduce-scatter, all-gather, reduce, broadcast).

Memory: peak resident set size (``ru_maxrss``, monotonic) after the plain steps and after the
measured steps, with glibc returning every freed block above 64 KiB to the system
(MALLOC_MMAP_THRESHOLD_, set for the workers), so the peak follows live tensors; gefx's addition
is the difference. Writes bench/out/dist.json and prints a table; bench/RESULTS.md has the formulas.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SHAPES = {  # name: LlamaConfig fields (the tests' tiny model, and 4 layers of TinyLlama-1.1B)
    "tiny": dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "llama-1b-4l": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                        num_attention_heads=32, num_key_value_heads=4),
}
KINDS = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
         "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
         "broadcast_object_list", "all_gather_object", "all_to_all_single")


class Counter:
    """Payload bytes of the collectives called while a phase is set, per phase and kind."""

    def __init__(self):
        self.phase, self.bytes, self.depth = None, {}, 0

    def install(self):
        import torch.distributed.distributed_c10d as c10d

        for kind in KINDS:
            for mod in (dist, c10d):
                fn = getattr(mod, kind, None)
                if fn is not None and not getattr(fn, "_counted", False):
                    setattr(mod, kind, self._wrap(kind, fn))

    def _wrap(self, kind, fn):
        def counted(*args, **kwargs):
            if self.phase is not None and self.depth == 0:  # the outermost call (one may call another)
                n = _payload(kind, args, kwargs)
                key = (self.phase, kind)
                self.bytes[key] = self.bytes.get(key, 0) + n
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        counted._counted = True
        return counted


def _payload(kind, args, kwargs) -> int:
    if kind in ("broadcast_object_list", "all_gather_object"):
        return 0  # pickled objects: gefx sends none in these runs (no pairwise grad_dots)
    sizes = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            sizes.append(a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            sizes.append(sum(t.numel() * t.element_size() for t in a))
    return max(sizes, default=0)


def sent(kind: str, n: int) -> float:
    return (2 if kind == "all_reduce" else 1) * (WORLD - 1) / WORLD * n


def build(engine: str, shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).train()
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    if engine == "zero3":
        import deepspeed

        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
               "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
        engine_, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine_, None
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def batches(rank: int, vocab: int, b: int, t: int):
    g = torch.Generator().manual_seed(100 + rank)
    f, r = (torch.randint(3, vocab, (b, t), generator=g) for _ in range(2))
    return f, r


def run_step(model, opt, f, r, counter, mode: str | None):
    import gefx
    from gefx.losses import sequence_nll

    tag = mode or "plain"
    out = {}
    with gefx.trace(model) as tape:
        counter.phase = f"{tag}: forward"
        nll_f = sequence_nll(model(input_ids=f).logits, f)
        nll_r = sequence_nll(model(input_ids=r).logits, r)
        loss = -nll_f.sum() + nll_r.sum()
        risks = {"forget": nll_f, "retain": nll_r}
        counter.phase = f"{tag}: gefx"
        if mode == "before":
            out = gefx.g_effect(tape, loss, risks)
        elif mode == "online":
            prepared = gefx.prepare(tape, risks)
        counter.phase = f"{tag}: backward+step"
        (model.backward(loss) if opt is None else loss.backward())
        if mode == "online":
            counter.phase = f"{tag}: gefx"
            out = prepared.against(gefx.engine_grads(model))
            counter.phase = f"{tag}: backward+step"
        model.step() if opt is None else (opt.step(), opt.zero_grad(set_to_none=True))
    counter.phase = None
    return out


def worker(rank, port, engine, shape, b, t, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    counter = Counter()
    counter.install()  # before DeepSpeed binds its collectives
    if engine == "zero3":
        import logging

        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed("gloo", auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=600))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    try:
        model, opt = build(engine, shape)
        f, r = batches(rank, SHAPES[shape]["vocab_size"], b, t)
        times = {}
        for mode in ("warmup", None, None, "before", "online"):
            t0 = time.perf_counter()
            if mode in ("before", "online") and "peak_plain" not in times:
                times["peak_plain"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            run_step(model, opt, f, r, counter, None if mode == "warmup" else mode)
            times[mode or "plain"] = time.perf_counter() - t0
            if mode == "warmup":
                counter.bytes.clear()
        times["peak_measured"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.save({"bytes": counter.bytes, "times": times}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_of(shape: str) -> tuple[int, int]:
    """(parameters, largest weight) of the shape, from a meta-device build."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=False))
    return sum(p.numel() for p in m.parameters()), max(p.numel() for p in m.parameters())


GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base")
WEIGHTS, GRADS = "weights", "gradients"


def per_step(r: dict) -> dict:
    """Payload per step and kind (bytes) of the plain step, and of each measured step."""
    steps = {"plain": 2, "before": 1, "online": 1}  # two plain steps were counted
    out = {mode: {} for mode in steps}
    for phase, kinds in r["payload_bytes"].items():
        mode = phase.split(":")[0]
        for kind, n in kinds.items():
            out[mode][kind] = out[mode].get(kind, 0) + n / steps[mode]
    return out


def factors(report: dict) -> dict:
    """Per engine and mode, payload in whole-model units (P elements) per kind, from the float32
    run: what gefx's traffic scales with (kinds: gathers move weights, reduce-scatter gradients,
    gefx's all_reduce / reduce / broadcast its float32 aggregates and shards)."""
    P = report["params"] * 4
    return {engine: {mode: {k: v / P for k, v in kinds.items() if v / P > 1e-3}
                     for mode, kinds in per_step(r).items()} for engine, r in report["engines"].items()}


def sent_bytes(kinds: dict, P: float, W: int, b: int = 2, acc: int = 4) -> float:
    """Bytes a rank sends for payloads `kinds` (whole-model units) with P parameters at W ranks:
    weights and gradients b bytes per element, gefx's aggregates acc bytes; bandwidth-optimal."""
    c = (W - 1) / W
    total = 0.0
    for kind, k in kinds.items():
        size = b if kind in GATHERS or "reduce_scatter" in kind or kind.startswith("grad_") else acc
        total += (2 if kind.endswith("all_reduce") else 1) * c * k * P * size
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b-4l", choices=sorted(SHAPES))
    ap.add_argument("--engines", default="ddp,fsdp2,zero3")
    ap.add_argument("--batch", type=int, default=2, help="sequences per micro-batch and rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="bench/out/dist.json")
    ap.add_argument("--paper", action="store_true", help="from --out's measurement: bytes per rank for the "
                    "1B and 7B shapes at 2-64 ranks (bf16 weights and gradients, float32 gefx aggregates)")
    args = ap.parse_args()
    if args.paper:
        return paper(json.loads(Path(args.out).read_text()))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # inherited by the spawned workers
    n_params, largest = params_of(args.model)
    report = {"machine": _cpu(), "torch": torch.__version__,
              "model": args.model, "params": n_params, "largest_weight": largest, "B": args.batch, "T": args.seq,
              "world": WORLD, "date": time.strftime("%Y-%m-%d"), "engines": {}}
    for engine in args.engines.split(","):
        tmp = os.path.join(tempfile.mkdtemp(prefix="gefx_bench_dist_"), engine)
        t0 = time.perf_counter()
        mp.spawn(worker, args=(free_port(), engine, args.model, args.batch, args.seq, tmp), nprocs=WORLD)
        ranks = [torch.load(f"{tmp}.{k}") for k in range(WORLD)]
        phases = {}
        for (phase, kind), n in ranks[0]["bytes"].items():
            row = phases.setdefault(phase, {})
            row[kind] = n
        report["engines"][engine] = {
            "payload_bytes": phases,
            "sent_bytes": {ph: sum(sent(k, n) for k, n in kinds.items()) for ph, kinds in phases.items()},
            "times_s": ranks[0]["times"], "wall_s": time.perf_counter() - t0,
            "peak_added_bytes": [max(0, r["times"]["peak_measured"] - r["times"]["peak_plain"]) for r in ranks],
            "peak_plain_bytes": [r["times"]["peak_plain"] for r in ranks]}
        print(f"{engine}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    mib = 2**20
    print(f"# {args.model}: {n_params / 1e6:.1f}M parameters (fp32), largest weight {largest * 4 / mib:.0f} MiB; "
          f"B={args.batch} T={args.seq} per rank, {WORLD} ranks")
    print(f"{'engine':7s} {'phase':26s} {'sent MiB/rank':>14s}  payload by kind (MiB)")
    for engine, r in report["engines"].items():
        for phase, n in sorted(r["sent_bytes"].items()):
            kinds = ", ".join(f"{k} {v / mib:.1f}" for k, v in sorted(r["payload_bytes"][phase].items()))
            print(f"{engine:7s} {phase:26s} {n / mib:14.1f}  {kinds}")
        print(f"{engine:7s} peak RSS of the plain step {max(r['peak_plain_bytes']) / mib:.0f} MiB, added by the "
              f"measured steps {max(r['peak_added_bytes']) / mib:.0f} MiB (per rank, max over ranks)")
    for engine, modes in factors(report).items():
        print(f"{engine:7s} payload per step in whole-model units (P x 4 bytes) by kind: "
              + "; ".join(f"{mode} " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items()))
                          for mode, kinds in modes.items()))


def paper(report: dict) -> None:
    """The table of bench/RESULTS.md: bytes each rank sends per step, training step vs gefx's
    addition, from the measured factors (payloads scale with P; per-rank bytes with (W-1)/W)."""
    shapes = {"1B (TinyLlama-1.1B)": 1.10e9, "7B (Llama-2-7B)": 6.74e9}
    fac = factors(report)
    # the step's gradient reduction where a C++ caller runs it (not counted): DDP's all-reduce, FSDP2's reduce-scatter
    uncounted = {"ddp": {"grad_all_reduce": 1.0}, "fsdp2": {"reduce_scatter_tensor": 1.0}, "zero3": {}}
    print("| shape | engine | W | step GB | gefx before the step GB (x step) | gefx online GB (x step) |")
    print("|---|---|---|---|---|---|")
    # ZeRO-3 kept the whole 307M-parameter model gathered between passes (stage3_max_live_parameters,
    # 1e9 elements by default), so its partial backwards re-gathered nothing; above that (1B, 7B)
    # each re-gathers what it passes: counted here as FSDP2's measured re-gathers
    regather = {m: {k: v - fac["fsdp2"]["plain"].get(k, 0) for k, v in fac["fsdp2"][m].items() if k in GATHERS}
                for m in ("before", "online")} if "fsdp2" in fac else {"before": {}, "online": {}}
    for label, P in shapes.items():
        for engine, modes in fac.items():
            step_k = {**modes["plain"], **uncounted[engine]}
            for W in (2, 8, 64):
                step = sent_bytes(step_k, P, W)
                add = {m: sent_bytes(modes[m], P, W) - sent_bytes(modes["plain"], P, W)
                       + (sent_bytes(regather[m], P, W) if engine == "zero3" else 0) for m in ("before", "online")}
                print(f"| {label} | {engine} | {W} | {step / 1e9:.1f} | {add['before'] / 1e9:.1f} "
                      f"({add['before'] / step:.2f}) | {add['online'] / 1e9:.1f} ({add['online'] / step:.2f}) |")


if __name__ == "__main__":
    main()
