"""No measurement is lost: records are logged to <folder>/records.jsonl as they are made, read back
exactly, survive a real kill (a subprocess that os._exit's mid-run) of a plain loop and of a
Trainer, continue without duplicates on train(resume_from_checkpoint=...), live on the CPU, and
only rank 0 writes them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gefx
from gefx.effects import GEffect, RiskEffect
from gefx.integrations import Recorder, measured, read_records
from gefx.losses import sequence_nll
from helpers import batch, tiny_model

transformers = pytest.importorskip("transformers")
from test_integrations import GradDiff, Pairs, collate  # noqa: E402

TESTS = str(Path(__file__).parent)
LOG = "records.jsonl"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for the subprocesses


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run as fast on one intra-op thread, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- effects to record ------------------------------------------------------------------------
def measured_effects() -> GEffect:
    """A real measurement with every field set: PG-effects, norms and the AdamW update's change."""
    model = tiny_model("llama", torch.float32)
    fi, fm, fl = batch(3, 8, seed=31)
    ri, rm, rl = batch(2, 8, seed=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with gefx.trace(model, params=opt) as tape:
        nll_f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        nll_r = sequence_nll(model(input_ids=ri, attention_mask=rm).logits, rl)
        eff = gefx.g_effect(tape, -nll_f, {"forget": nll_f, "retain": nll_r}, groups="paper", norms=True,
                            optimizer=opt, objective_instances=True)
    assert all(getattr(e, n) is not None for e in eff.values() for n in RiskEffect.tensor_fields())
    return eff


SPECIAL = [-0.0, 5e-324, 1e-45, float("inf"), -float("inf"), float("nan"), 1 / 3, -1e300]


def synthetic(dtype=torch.float64, device="cpu", b=3) -> GEffect:
    """Random values in `dtype` with awkward ones (-0, subnormals, infinities, NaN) in front; a
    second risk with no instances and the optional fields None."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64).flatten()
        n = min(len(x), len(SPECIAL))
        x[:n] = torch.tensor(SPECIAL[:n], dtype=torch.float64)
        return x.reshape(shape).to(dtype).to(device)
    groups = ["embed", "deep"]
    return GEffect(forget=RiskEffect("forget", groups, t(2, b), t(2, 2), t(2, b), t(2), t(2, b)),
                   retain=RiskEffect("retain", groups, t(2, 0), None))


def same(a, b) -> bool:
    """Equal bit for bit (NaN payloads aside): dtype, shape, sign of zero, every value."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    keep = ~a.isnan()
    return (torch.equal(keep, ~b.isnan()) and torch.equal(a[keep], b[keep])
            and torch.equal(a[keep].signbit(), b[keep].signbit()))


def assert_same_records(got, expected):
    assert len(got) == len(expected)
    for r, e in zip(got, expected):
        assert (r.step, r.objective, r.data_rows) == (e.step, e.objective, e.data_rows)
        assert list(r.effects) == list(e.effects)
        for name, eff in e.effects.items():
            back = r.effects[name]
            assert (back.risk, back.groups) == (eff.risk, eff.groups)
            for field in RiskEffect.tensor_fields():
                assert same(getattr(back, field), getattr(eff, field)), (r.step, name, field)
        assert (r.actual_change is None) == (e.actual_change is None)
        for name, change in (e.actual_change or {}).items():
            assert same(r.actual_change[name], change)


def test_round_trip_is_exact_and_a_recorder_continues_the_log(tmp_path):
    rec = Recorder(tmp_path)
    rec.add(0, measured_effects(), objective="ga", data_rows={"forget": [3, 1, 4], "retain": [0, 2]},
            actual_change={"forget": torch.tensor([0.5, -0.0, 1 / 3], dtype=torch.float64),
                           "retain": torch.tensor([1e-45, 2.5], dtype=torch.float32)})
    for step, dtype in ((5, torch.float64), (6, torch.float32), (7, torch.bfloat16), (8, torch.float16)):
        rec.add(step, synthetic(dtype), objective=f"npo@lr=1e-3 {dtype}")
    assert_same_records(read_records(tmp_path), rec.records)
    assert rec.records[1].effects["forget"].per_instance_group[0, 0].signbit()  # -0.0 kept
    again = Recorder(tmp_path)  # continues: loads, then appends
    assert_same_records(again.records, rec.records)
    again.add(9, synthetic())
    assert [r.step for r in read_records(tmp_path)] == [0, 5, 6, 7, 8, 9]
    assert Recorder(tmp_path, resume=False).records == [] and read_records(tmp_path) == []


def test_torn_last_line_is_skipped_and_a_corrupt_middle_line_is_an_error(tmp_path):
    rec = Recorder(tmp_path)
    for step in range(3):
        rec.add(step, synthetic(b=step + 1))
    path = tmp_path / LOG
    data = path.read_bytes()
    start = data.rfind(b"\n", 0, len(data) - 1) + 1  # where the last line starts
    path.write_bytes(data[:start + (len(data) - start) // 2])  # killed mid-write
    assert_same_records(read_records(tmp_path), rec.records[:2])
    path.write_bytes(data[:start] + b'{"step": 2, "objective": \n')  # a complete but invalid last line
    assert_same_records(read_records(tmp_path), rec.records[:2])

    cont = Recorder(tmp_path)  # continuing cuts the bad tail off before appending
    assert path.read_bytes() == data[:start]
    cont.add(7, synthetic())
    assert [r.step for r in read_records(tmp_path)] == [0, 1, 7]

    lines = data.split(b"\n")
    lines[1] = lines[1][:40]
    for corrupt in (b"\n".join(lines), b"\n".join(lines[:2]) + b"\n" + lines[2][:40]):  # then a torn line
        path.write_bytes(corrupt)
        for read in (read_records, Recorder):
            with pytest.raises(ValueError, match=rf"{LOG}: line 2 is not a gefx record .*only the last line may"):
                read(tmp_path)


# -- a real kill ------------------------------------------------------------------------------
def plain_loop(out, steps=8, kill_after=None) -> Recorder:
    """GA on a tiny Llama, measured online every other step into Recorder(out); with `kill_after`,
    the process ends (os._exit(1)) right after that many measurements."""
    model = tiny_model("llama", torch.float32).train()
    fi, fm, fl = batch(3, 8, seed=31)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = Recorder(out)
    for step in range(steps):
        with gefx.trace(model, params=opt) as tape:
            nll = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
            effects = gefx.g_effect(tape, -nll, {"forget": nll}, backward=True) if step % 2 == 0 else None
            if effects is None:
                (-nll).sum().backward()
        if effects is not None:
            rec.add(step, effects, objective="ga")
            if len(rec.records) == kill_after:
                os._exit(1)
        opt.step()
        opt.zero_grad()
    return rec


def killed(call: str) -> None:
    """Run ``t.<call>`` (t: this module) in a fresh Python that must end by os._exit(1)."""
    code = f"import sys; sys.path[:0] = [{TESTS!r}]; import test_records as t; t.{call}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=TESTS,
                          env=ONE_THREAD)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * abs(b)


def test_a_killed_plain_loop_keeps_every_completed_measurement(tmp_path):
    killed(f"plain_loop({str(tmp_path / 'killed')!r}, kill_after=3)")
    got = read_records(tmp_path / "killed")
    assert [r.step for r in got] == [0, 2, 4] and {r.objective for r in got} == {"ga"}
    full = plain_loop(tmp_path / "full", steps=5).records  # the same run, not killed
    assert [r.step for r in full] == [0, 2, 4]
    for r, e in zip(got, full):
        assert close(r.effects["forget"].total, e.effects["forget"].total)
        assert r.effects["forget"].total < 0  # GA: -||grad||^2
    assert not (tmp_path / "killed" / "g_effects.csv").exists()


# -- the Trainer mixin ------------------------------------------------------------------------
class ExitAt(transformers.TrainerCallback):
    """Ends the process (os._exit(1)) when global step `step` is done, before it is checkpointed."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(1)


def trainer_run(out, steps=5, kill_at=None, resume=None, cls=None):
    """GradDiff measured at every step, 2 rows a step (3 steps per epoch, shuffled), a checkpoint
    every 2 steps; killed at the end of step `kill_at`, resumed from checkpoint `resume`."""
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2, report_to=[],
        logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0, seed=0, max_grad_norm=1.0, disable_tqdm=True)
    cls = cls or measured(GradDiff, every=1)
    trainer = cls(model=tiny_model("llama", torch.float32).train(), args=args, train_dataset=Pairs(6),
                  data_collator=collate, callbacks=[ExitAt(kill_at)] if kill_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def totals(records) -> dict:
    return {(r.step, name): e.total for r in records for name, e in r.effects.items()}


def test_a_killed_trainer_keeps_its_measurements_and_resumes_without_duplicates(tmp_path):
    killed(f"trainer_run({str(tmp_path)!r}, kill_at=4)")
    assert [r.step for r in read_records(tmp_path / "gefx")] == [0, 1, 2, 3]  # killed after 4 steps
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "gefx" / "g_effects.csv").exists()

    # mid-epoch: drops the records of steps 2 and 3 (measured after the checkpoint) and measures them again
    resumed = trainer_run(tmp_path, resume=str(tmp_path / "checkpoint-2"))
    on_disk = read_records(tmp_path / "gefx")
    assert [r.step for r in on_disk] == [s for s, _ in resumed.gefx_records] == [0, 1, 2, 3, 4]
    csv_steps = {line.split(",")[1] for line in (tmp_path / "gefx" / "g_effects.csv").read_text().splitlines()[1:]}
    assert csv_steps == {"0", "1", "2", "3", "4"}

    fresh = trainer_run(tmp_path)  # uninterrupted, same seed; not resuming, it starts a new log
    assert [r.step for r in read_records(tmp_path / "gefx")] == [s for s, _ in fresh.gefx_records] == [0, 1, 2, 3, 4]
    expected, got = totals(fresh.gefx_recorder.records), totals(on_disk)
    assert got.keys() == expected.keys() and all(close(v, expected[k]) for k, v in got.items()), (got, expected)


# -- memory and ranks -------------------------------------------------------------------------
def tensors_of(effects: GEffect) -> list:
    return [getattr(e, f) for e in effects.values() for f in e.tensor_fields()]


def test_records_live_on_the_cpu_detached():
    w = torch.ones((), requires_grad=True)
    with_graph = GEffect({n: RiskEffect(e.risk, e.groups, *[t if t is None else t * w for t in tensors_of({n: e})])
                          for n, e in synthetic(torch.float32).items()})
    rec = Recorder()
    rec.add(0, with_graph, actual_change={"forget": torch.ones(3) * w})
    kept = [t for t in tensors_of(rec.records[0].effects) if t is not None] + [rec.records[0].actual_change["forget"]]
    assert len(kept) == 7 and all(t.device.type == "cpu" and not t.requires_grad for t in kept)
    # a tensor elsewhere is copied to the CPU: a meta tensor has no data to copy, so add fails trying
    with pytest.raises(NotImplementedError, match="meta tensor"):
        rec.add(1, synthetic(device="meta"))
    assert len(rec.records) == 1


RANK = """
import sys, torch, torch.distributed as dist
from gefx.effects import GEffect, RiskEffect
from gefx.integrations import Recorder
rank, folder = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
rec = Recorder(f"{folder}/rank{rank}")
for step in range(3):
    rec.add(step, GEffect(forget=RiskEffect("forget", ["all"], torch.full((1, 2), float(step)), None)))
assert len(rec.records) == 3
dist.barrier()
dist.destroy_process_group()
"""


def test_only_rank_0_writes(tmp_path):
    """Two gloo processes record the same steps, each into its own folder: only rank 0's exists."""
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(tmp_path)], stderr=subprocess.PIPE,
                              text=True, env=ONE_THREAD) for rank in range(2)]
    try:
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # only one still running (a timeout)
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert [r.step for r in read_records(tmp_path / "rank0")] == [0, 1, 2]
    assert not (tmp_path / "rank1").exists()


def test_only_the_world_process_zero_trainer_writes(tmp_path):
    cls = type("NotZero", (measured(GradDiff, every=1),), {"is_world_process_zero": lambda self: False})
    trainer = trainer_run(tmp_path, steps=2, cls=cls)
    assert [s for s, _ in trainer.gefx_records] == [0, 1]
    assert not (tmp_path / "gefx").exists()
