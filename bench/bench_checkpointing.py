"""Peak memory of a training step with and without gradient checkpointing, plain and measured by
gefx online (``g_effect(..., backward=True)``), each scenario in its own process.

    python bench/bench_checkpointing.py [--hidden 1024 --layers 8 --batch 4 --seq 256]

A Llama-architecture model from a config (float32, sdpa attention unless --attn eager, vocabulary
32000), one step of
a GradDiff-style unlearning loss over a forget and a retain batch (B x T each). RSS is sampled every
2 ms by a thread reading /proc/self/statm; a scenario's figure is its peak minus the RSS after the
model is built and a warm-up step ran (MALLOC_MMAP_THRESHOLD_ is set so that freed buffers leave
the resident set at once). Prints one line per scenario and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

SCENARIOS = ("plain", "plain+gefx", "ckpt", "ckpt+gefx", "ckpt_reentrant+gefx")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(args) -> None:
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import gefx
    from gefx.losses import sequence_nll

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                      tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = args.attn
    model = LlamaForCausalLM(cfg).float().train()
    scenario = args.scenario
    if scenario.startswith("ckpt"):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": "reentrant" in scenario})
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 32000, (args.batch, args.seq), generator=g) for _ in range(2)]

    def step(measure: bool):
        for p in model.parameters():
            p.grad = None
        if not measure:
            f = sequence_nll(model(input_ids=ids[0]).logits, ids[0])
            r = sequence_nll(model(input_ids=ids[1]).logits, ids[1])
            (-f.sum() + r.sum()).backward()
            return None
        with gefx.trace(model) as tape:
            f = sequence_nll(model(input_ids=ids[0]).logits, ids[0])
            r = sequence_nll(model(input_ids=ids[1]).logits, ids[1])
            e = gefx.g_effect(tape, -f.sum() + r.sum(), {"forget": f, "retain": r}, backward=True)
        return e

    measure = scenario.endswith("+gefx")
    step(measure)  # warm-up: gradients allocated, rules verified, graph structure probed
    for p in model.parameters():
        p.grad = None
    time.sleep(0.2)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = step(measure)
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss())
    total = None if out is None else float(out["forget"].total)
    print(json.dumps({"scenario": scenario, "base_mb": base / 2**20, "peak_extra_mb": (peak[0] - base) / 2**20,
                      "seconds": seconds, "forget_total": total}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    ap.add_argument("--scenario", choices=SCENARIOS)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    args = ap.parse_args()
    if args.scenario:
        return _child(args)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for s in args.only.split(","):
        cmd = [sys.executable, __file__, "--scenario", s, "--hidden", str(args.hidden), "--layers",
               str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
               "--attn", args.attn]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, vocab 32000, float32, {args.attn} attention, "
          f"forget + retain B={args.batch} "
          f"T={args.seq}; peak RSS above the model (+ gradients) after a warm-up step\n")
    print("| scenario | peak extra MiB | step s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['peak_extra_mb']:.0f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
