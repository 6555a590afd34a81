"""DeepSpeed ZeRO-1, 2 and 3 through ``deepspeed.initialize`` (the real engine, 2 gloo processes on
the CPU, float32): every G-effect equals one float64 process running the concatenated batch, before
the step and online (the engine owns the backward), and measuring leaves training bit-identical.

ZeRO-3 runs with ``stage3_param_persistence_threshold = 0``, so every parameter, the RMSNorm
weights included, is partitioned: the products go shard by shard (gefx.shards) and the norm rule
gathers its weight alone. The before-step measurement runs with gradient accumulation (2 steps):
the engine's output hooks would divide gefx's gradients by 2 if they were not switched off."""
import contextlib
import datetime
import gc
import logging
import os

import pytest
import torch
import torch.distributed as dist

import gefx
from gefx.losses import sequence_nll
from helpers import tiny_model
from test_distributed import WORLD, all_dots, data, shard, spawn

pytestmark = pytest.mark.slow
TOL = 1e-5  # float32 engine vs the float64 single process: max |diff| / max |value| per quantity


def config(stage: int, accumulation: int = 1, bf16: bool = False) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "bf16": {"enabled": bf16}}


def engine_for(stage: int, accumulation: int = 1, bf16: bool = False, family: str = "llama"):
    import deepspeed

    model = tiny_model(family, torch.float32)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config(stage, accumulation, bf16))
    return engine


def direction_of(model):
    """The same seeded direction of every parameter's full shape, on every rank and in the single
    process (parameter order)."""
    g = torch.Generator().manual_seed(3)
    return {p: torch.randn(tuple(getattr(p, "ds_shape", p.shape)), generator=g) for p in model.parameters()}


def forwards(model, fb, rb):
    nll_f = sequence_nll(model(input_ids=fb[0], attention_mask=fb[1]).logits, fb[2])
    nll_r = sequence_nll(model(input_ids=rb[0], attention_mask=rb[1]).logits, rb[2])
    return nll_f, nll_r


def before_step(engine, traced, fb, rb, vector: bool) -> dict:
    with gefx.trace(traced) as tape:
        nll_f, nll_r = forwards(engine, fb, rb)
        objective = -nll_f if vector else -nll_f.sum() + 0.3 * nll_r.sum()
        out = gefx.g_effect(tape, objective, {"forget": nll_f, "retain": nll_r}, norms=True,
                            direction=direction_of(traced)).to_dict()
        if not vector:
            out["dots"] = all_dots(tape, traced, nll_f, nll_r)
        return out


def train_step(engine, fb, rb, measure: bool):
    """One step of -nll_f + 0.3 nll_r; with `measure`, G-effects before it and online."""
    out = {}
    with gefx.trace(engine) as tape:
        nll_f, nll_r = forwards(engine, fb, rb)
        loss = -nll_f.sum() + 0.3 * nll_r.sum()
        if measure:
            risks = {"forget": nll_f, "retain": nll_r}
            out["before"] = gefx.g_effect(tape, loss, risks).to_dict()
            with pytest.raises(ValueError, match="engine owns the backward"):
                gefx.g_effect(tape, loss, risks, backward=True)
            prepared = gefx.prepare(tape, risks)
        engine.backward(loss)
        if measure:
            grads = gefx.engine_grads(engine)
            out["online"] = prepared.against(grads).to_dict()
            with pytest.raises(ValueError, match="not supported under DeepSpeed"):
                prepared.against(grads, optimizer=engine.optimizer)
        engine.step()
    return out


@contextlib.contextmanager
def gathered_by_gefx():
    """Full shapes of the ZeRO-3 parameters gefx gathers (gefx.dist.full) inside the block."""
    import gefx.dist as gdist

    seen, real = [], gdist.full

    def counted(t):
        if hasattr(t, "ds_id"):
            seen.append(tuple(t.ds_shape))
        return real(t)

    gdist.full = counted  # the rules call gefx.dist.full through the module
    try:
        yield seen
    finally:
        gdist.full = real


def full_params(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]


def run_rank(rank: int, stage: int, bf16: bool = False, family: str = "llama") -> dict:
    fb, rb = shard(rank)
    if bf16 or family != "llama":  # bf16 mode (bf16 weights and forward, float32 gradient partitions),
        engine = engine_for(stage, bf16=bf16, family=family)  # or another family: before and online
        res = {"scalar": before_step(engine, engine, fb, rb, False)}
        res.update(train_step(engine, fb, rb, measure=True))
        return res
    engine = engine_for(stage, accumulation=2)
    with pytest.raises(ValueError, match="trace the engine"):  # its module: the engine's hooks unseen
        gefx.trace(engine.module)
    with gathered_by_gefx() as whole:
        res = {"vector": before_step(engine, engine, fb, rb, True), "scalar": before_step(engine, engine, fb, rb, False)}
    # ZeRO-3: no weight gathered by gefx but the RMSNorm weights (1-D), for their rule
    assert all(len(shape) == 1 for shape in whole) and (whole or stage < 3), whole
    measured, plain = engine_for(stage), engine_for(stage)
    res.update(train_step(measured, fb, rb, measure=True))
    train_step(plain, fb, rb, measure=False)
    res["trained_alike"] = all(torch.equal(a, b) for a, b in zip(full_params(measured), full_params(plain)))
    if stage == 3:  # parameters offloaded to NVMe are refused (the attribute ZeRO-3 sets for them)
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

        part = next(engine.module.parameters()).ds_tensor
        before, part.final_location = getattr(part, "final_location", None), OffloadDeviceEnum.nvme
        with pytest.raises(ValueError, match="NVMe"):
            gefx.trace(engine)
        part.final_location = before
        import deepspeed
        import zoo

        moe = zoo.build("mixtral", dtype=torch.float32)  # stacked experts: refused under ZeRO-3
        moe_engine, *_ = deepspeed.initialize(model=moe, model_parameters=moe.parameters(), config=config(3))
        with pytest.raises(ValueError, match="mixture-of-experts block with stacked expert weights"):
            gefx.trace(moe_engine)
    return res


def _worker(rank, port, out, stage, bf16=False, family="llama"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(run_rank(rank, stage, bf16, family), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def expected(family: str = "llama") -> dict:
    single = tiny_model(family, torch.float64)
    fb, rb = data()
    res = {key: before_step(single, single, fb, rb, vector) for key, vector in (("vector", True), ("scalar", False))}
    return res


def assert_close(got, want, where: str):
    if isinstance(want, dict):
        for k, v in want.items():
            if v is not None and not isinstance(v, str):
                assert k in got and got[k] is not None, f"{where}: {k} missing"
                assert_close(got[k], v, f"{where}.{k}")
        return
    a = torch.tensor(got, dtype=torch.float64)
    b = torch.tensor(want, dtype=torch.float64)
    scale = b.abs().max().clamp(min=1e-30)
    assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert float((a - b).abs().max() / scale) <= TOL, f"{where}: {a.tolist()} != {b.tolist()}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_equals_one_process(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="the README's set-up installs deepspeed (test extra)")
    out = str(tmp_path / "res")
    spawn(_worker, out, stage, what=f"ZeRO-{stage}")
    want = expected()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got["trained_alike"], f"rank {rank}: measuring changed the ZeRO-{stage} training step"
        assert_agrees(got, want, f"rank {rank} ZeRO-{stage}")


def test_zero3_gpt2(tmp_path):
    """GPT-2 under ZeRO-3 (every parameter partitioned): Conv1D layers (whose rule is picked from the
    full shape, not the empty partition), an embedding tied to the head, LayerNorm with biases."""
    pytest.importorskip("deepspeed", reason="the README's set-up installs deepspeed (test extra)")
    out = str(tmp_path / "res")
    spawn(_worker, out, 3, False, "gpt2", what="ZeRO-3 GPT-2")
    want = expected("gpt2")
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert_close(got["scalar"], want["scalar"], f"rank {rank} GPT-2 before the step")
        online = {r: {"per_instance": [WORLD * v for v in got["online"][r]["per_instance"]]} for r in ("forget", "retain")}
        assert_close(online, {r: {"per_instance": want["scalar"][r]["per_instance"]} for r in ("forget", "retain")},
                     f"rank {rank} GPT-2 online")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_in_bf16_mode(tmp_path, stage):
    """DeepSpeed's bf16 mode (bf16 weights and forward): before the step and online, within bf16's
    rounding of a float64 evaluation (the model itself computes in bf16: 2^-8 = 3.9e-3 per rounding;
    a missing factor, e.g. the accumulation steps or the ranks' mean, is off by 50% or more)."""
    pytest.importorskip("deepspeed", reason="the README's set-up installs deepspeed (test extra)")
    out = str(tmp_path / "res")
    spawn(_worker, out, stage, True, what=f"ZeRO-{stage} bf16")
    want = expected()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        for key in ("before", "online"):
            scale = WORLD if key == "online" else 1
            for r in ("forget", "retain"):
                a = torch.tensor(got[key][r]["per_instance"], dtype=torch.float64) * scale
                b = torch.tensor(want["scalar"][r]["per_instance"], dtype=torch.float64)
                assert float((a - b).abs().max() / b.abs().max()) <= 2e-2, (key, r, a, b)


def assert_agrees(got: dict, want: dict, where: str):
    """A rank's before-step ("vector", "scalar", "before") and online results against the single process."""
    for key in ("vector", "scalar"):
        assert_close(got[key], want[key], f"{where} {key}")
    assert_close(got["before"], {r: {k: want["scalar"][r][k] for k in ("per_instance", "per_group", "total")}
                                 for r in ("forget", "retain")}, f"{where} before the step")
    # the engine reduces the ranks' mean gradient: online values are those of loss / WORLD
    online = {r: {k: [WORLD * v for v in got["online"][r][k]] if isinstance(got["online"][r][k], list)
                  else {g: WORLD * v for g, v in got["online"][r][k].items()} for k in ("per_instance", "per_group")}
              for r in ("forget", "retain")}
    assert_close(online, {r: {k: want["scalar"][r][k] for k in ("per_instance", "per_group")}
                          for r in ("forget", "retain")}, f"{where} online")


# -- a plain accelerate loop with a DeepSpeed config ------------------------------------------------
def _accelerate_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import deepspeed
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    deepspeed.utils.logger.setLevel(logging.WARNING)
    cfg = {**config(2, 1), "gradient_clipping": 1e-3}
    cfg.pop("optimizer")
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    model = tiny_model("llama", torch.float32)
    engine, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    fb, rb = shard(rank)
    res = {"engine": type(engine).__name__, "vector": before_step(engine, engine, fb, rb, True),
           "scalar": before_step(engine, engine, fb, rb, False)}
    with gefx.trace(engine) as tape:
        nll_f, nll_r = forwards(engine, fb, rb)
        loss = -nll_f.sum() + 0.3 * nll_r.sum()
        risks = {"forget": nll_f, "retain": nll_r}
        res["before"] = gefx.g_effect(tape, loss, risks).to_dict()
        prepared = gefx.prepare(tape, risks)
        # accelerator.backward may step the engine (clipping, releasing ZeRO-2's gradient): read it first
        with gefx.before_engine_step(engine, lambda: prepared.against(gefx.engine_grads(engine))) as got:
            accelerator.backward(loss)
        res["online"] = got[0].to_dict()
    torch.save(res, f"{out}.{rank}")
    dist.barrier()


def test_accelerate_loop_with_deepspeed_zero2(tmp_path):
    pytest.importorskip("deepspeed", reason="the README's set-up installs deepspeed (test extra)")
    out = str(tmp_path / "res")
    spawn(_accelerate_worker, out, what="accelerate")
    want = expected()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got["engine"] == "DeepSpeedEngine"
        assert_agrees(got, want, f"rank {rank} accelerate ZeRO-2")


# -- the Hugging Face Trainer mixin under accelerate + DeepSpeed ZeRO-2 / ZeRO-3 ------------------------------
def _trainer_worker(rank, port, out, stage, accumulation):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import transformers
    from gefx.integrations import GEffectMixin
    from test_integrations import GradDiff, Pairs, collate

    if stage:
        import deepspeed
        deepspeed.utils.logger.setLevel(logging.WARNING)

    class Seen(GradDiff):  # remembers its first micro-batch (the data loader picks each rank's)
        def compute_loss(self, model, inputs, *args, **kwargs):
            self.__dict__.setdefault("seen", inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True, "gradient_clipping": "auto"} if stage else None

    def train(cls, name):
        args = transformers.TrainingArguments(
            output_dir=f"{out}.{name}", per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, report_to=[],
            logging_steps=1, save_strategy="no", use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
            seed=0, max_grad_norm=1e-3, ddp_backend="gloo", deepspeed=ds,  # clipping on every step
            gradient_accumulation_steps=accumulation)
        trainer = cls(model=tiny_model("llama", torch.float32).train(), args=args, train_dataset=Pairs(4),
                      data_collator=collate)
        trainer.train()
        params = list(trainer.model.parameters())
        with deepspeed.zero.GatheredParameters(params) if stage else contextlib.nullcontext():
            values = [p.detach().clone() for p in params]
        return trainer, values

    measured, after = train(type("MeasuredSeen", (GEffectMixin, Seen), {"gefx_every": 1}), "m")
    plain, after_plain = train(Seen, "p")
    first = measured.gefx_records[0][1]
    torch.save({"engine": type(measured.model_wrapped).__name__, "mode": measured.gefx_mode,
                "steps": [s for s, _ in measured.gefx_records], "seen": measured.seen,
                "effects": {r: first[r].per_instance.tolist() for r in ("forget", "retain")},
                "trained_alike": all(torch.equal(a, b) for a, b in zip(after, after_plain))}, f"{out}.{rank}")
    dist.barrier()
    # the group accelerate made, closed before the interpreter exits: left to the exit, its
    # threads were once torn down mid-flight ("terminate called without an active exception")
    del measured, plain
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("stage,accumulation", [(2, 1), (3, 1), (2, 2), (0, 1)])
def test_trainer_mixin_under_accelerate_deepspeed(tmp_path, stage, accumulation):
    """The mixin on transformers' Trainer with a DeepSpeed ZeRO-2 / ZeRO-3 config (accelerate builds
    the engine, and its backward runs the engine's step, which clips the gradient in place and, under
    ZeRO-2, releases it), and under plain DDP (stage 0: the risks' forwards after the backward must
    not leave DDP's reducer waiting): online measurements taken before that step, training bit-identical to the
    unmeasured Trainer, and the first step's per-instance values equal float64 autograd of the ranks'
    mean loss on each rank's micro-batch, unclipped. ZeRO-2 with gradient accumulation gives its
    reduced gradient only at the boundary: the mixin measures before the step there (the ranks'
    summed loss: WORLD times the online values)."""
    pytest.importorskip("deepspeed", reason="the README's set-up installs deepspeed (test extra)")
    from helpers import full_grad
    from test_integrations import GradDiff

    out = str(tmp_path / "res")
    spawn(_trainer_worker, out, stage, accumulation, what="Trainer")
    got = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    model = tiny_model("llama", torch.float64).train()
    params = list(model.parameters())
    g_loss = sum(full_grad(GradDiff.compute_loss(None, model, g["seen"]), params) for g in got) / WORLD
    for risk in ("forget", "retain"):
        want = []
        for g in got:  # gefx.integrations' default risk: token_mean over each rank's micro-batch
            b = g["seen"][risk]
            r = gefx.losses.token_mean_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                           b["labels"])
            want += [float(full_grad(r[i], params) @ g_loss) for i in range(r.shape[0])]
        for rank, g in enumerate(got):
            online = accumulation == 1
            assert g["engine"] == ("DeepSpeedEngine" if stage else "DistributedDataParallel") and g["steps"] == [0, 1]
            assert g["mode"] == "online" if online else g["mode"].startswith("before the step (DeepSpeed ZeRO-1/2")
            assert g["trained_alike"], f"rank {rank}: measuring changed the Trainer's training"
            scale = 1 if online else WORLD
            diff = max(abs(a - scale * b) for a, b in zip(g["effects"][risk], want)) / max(abs(scale * b) for b in want)
            assert len(g["effects"][risk]) == len(want) and diff <= TOL, (risk, g["effects"][risk], want)
