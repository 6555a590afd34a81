"""Triton kernels (gefx.kernels) against the float64 torch reference.

Without CUDA, conftest.py sets TRITON_INTERPRET=1 and these run on the CPU interpreter (fp32 and
fp16, tiny shapes, one config; bf16 is not trusted under the interpreter). With CUDA the same
`interpret` tests run on the GPU, and the `gpu` tests add bf16 and large shapes.

Accuracy rule (flash-attention style), per output entry:
    |kernel - ref64| <= 2 * |torch_same_dtype - ref64| + floor * scale
where ref64 is the reference on the same (already rounded) inputs upcast to float64,
torch_same_dtype the reference on the inputs in their storage dtype, and scale = max(1, max|ref64|).
"""
from __future__ import annotations

import os

import pytest
import torch

from gefx import backends, ops, reference

K = pytest.importorskip("gefx.kernels")
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
RUNNABLE = K.UNAVAILABLE is None and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")

pytestmark = pytest.mark.skipif(not RUNNABLE, reason=f"triton backend unavailable: {K.UNAVAILABLE}")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# floor (relative to max(1, max|ref64|)) per storage dtype: one table for every op
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# interpreter shapes: (B1, T1, B2, T2, Da, Dg) with odd sizes, T = 1, 7, 33 and features 33
SHAPES = [(2, 7, 3, 33, 33, 20), (1, 1, 2, 7, 16, 33), (3, 33, 1, 1, 33, 17)]
VOCAB = 11


# ------------------------------------------------------------------------------------------------
# helpers

def _noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (last two dims transposed in memory)."""
    if x.dim() < 2:
        return x
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _check(op: str, args, out=None):
    """Run kernel `op` on args and assert the 2x-error rule against the float64 reference."""
    if out is None:
        out = K.OPS[op](*args)
    assert out is not NotImplemented, f"{op} fell back on {[getattr(a, 'dtype', None) for a in args]}"
    ref64 = reference.OPS[op](*_f64(args))
    same = reference.OPS[op](*args)
    assert out.dtype == torch.float32 and out.shape == ref64.shape and out.device == ref64.device
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    err = (out.double() - ref64).abs()
    bound = 2 * (same.double() - ref64).abs() + FLOOR[dtype] * scale
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"{op} {dtype}: max error {float(err.max()):.3e} exceeds bound (scale {scale:.3e})"
    return out


def _set(b, t, da, dg, dtype, gen, mask_mode="random", device=DEVICE):
    a = torch.randn(b, t, da, generator=gen).to(dtype).to(device)
    g = torch.randn(b, t, dg, generator=gen).to(dtype).to(device)
    ids = torch.randint(0, VOCAB, (b, t), generator=gen).to(device)
    if mask_mode is None:
        mask = None
    else:
        mask = torch.rand(b, t, generator=gen) > 0.3
        if mask_mode == "dead_row" and b > 0:
            mask[0] = False  # a fully masked sample
        mask = mask.to(device)
    return a, g, ids, mask


def _cases(shape, dtype, gen, mask_mode, noncontig=False, device=DEVICE):
    b1, t1, b2, t2, da, dg = shape
    a1, g1, ids1, m1 = _set(b1, t1, da, dg, dtype, gen, mask_mode, device)
    a2, g2, ids2, m2 = _set(b2, t2, da, dg, dtype, gen, mask_mode, device)
    mat = (torch.randn(dg, da, generator=gen) / da ** 0.5).to(dtype).to(device)
    table = torch.randn(VOCAB, dg, generator=gen).to(dtype).to(device)
    l2 = torch.randn(b2, t2, VOCAB, generator=gen).to(dtype).to(device)
    if noncontig:
        a1, g1, a2, g2, mat, table, l2 = map(_noncontig, (a1, g1, a2, g2, mat, table, l2))
        ids1, ids2 = _noncontig(ids1), _noncontig(ids2)
        m1 = None if m1 is None else _noncontig(m1)
        m2 = None if m2 is None else _noncontig(m2)
    u1 = torch.randn(a1.shape, generator=gen).to(dtype).to(device)
    return {
        "ghost_pairwise": (a1, g1, a2, g2, m1, m2),
        "ghost_self": (a1, g1, m1),
        "dense_dot": (a1, g1, mat, m1),
        "embedding_pairwise": (ids1, g1, ids2, g2, m1, m2),
        "embedding_self": (ids1, g1, m1),
        "embedding_dense_dot": (ids1, g1, table, m1),
        "embedding_linear_pairwise": (ids1, g1, l2, g2, m1, m2),
        "norm_grad": (u1, a1, m1),
    }


SMALL_BLOCKS = {  # tiny tiles so that T = 33 spans several token tiles (off-diagonal, edge tiles)
    "ghost_pairwise": dict(BLOCK_T=16, BLOCK_S=16, BLOCK_K=16),
    "ghost_self": dict(BLOCK_T=16, BLOCK_K=16),
    "dense_dot": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2),
    "embedding_pairwise": dict(BLOCK_T=16, BLOCK_S=16, BLOCK_K=16),
    "embedding_self": dict(BLOCK_T=16, BLOCK_K=16),
    "embedding_linear_pairwise": dict(BLOCK_T=16, BLOCK_S=16, BLOCK_K=16),
    "embedding_dense_dot": dict(BLOCK_T=4, BLOCK_D=16),
    "norm_grad": dict(BLOCK_T=4, BLOCK_D=16),
}


@pytest.fixture(params=["default_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    """Run with each kernel's default config, or with tiny tiles (several tiles per sample)."""
    if request.param == "small_blocks":
        import importlib
        monkeypatch.setenv("GEFX_TRITON_AUTOTUNE", "0")
        for op, small in SMALL_BLOCKS.items():
            mod = importlib.import_module(f"gefx.kernels.{op}")
            monkeypatch.setattr(mod, "CONFIGS", (dict(mod.CONFIGS[0], **small),))
    return request.param


# ------------------------------------------------------------------------------------------------
# interpreter (or GPU) correctness: fp32 and fp16


def test_ops_table_matches_reference():
    assert K.UNAVAILABLE is None
    assert set(K.OPS) == set(reference.OPS)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_mode", [None, "random"])
def test_kernels_vs_float64(shape, dtype, mask_mode, blocks):
    seed = 100 * SHAPES.index(shape) + 10 * (dtype == torch.float16) + (mask_mode is None)
    gen = torch.Generator().manual_seed(seed)
    for op, args in _cases(shape, dtype, gen, mask_mode).items():
        _check(op, args)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fully_masked_rows_and_noncontiguous(dtype, blocks):
    gen = torch.Generator().manual_seed(7)
    for op, args in _cases((3, 33, 2, 7, 33, 20), dtype, gen, "dead_row", noncontig=True).items():
        assert any(isinstance(x, torch.Tensor) and not x.is_contiguous() for x in args)
        out = _check(op, args)
        assert torch.all(out[0] == 0), f"{op}: a fully masked sample must give exact zeros"


@pytest.mark.interpret
def test_all_masked_set_gives_zeros():
    gen = torch.Generator().manual_seed(3)
    for op, args in _cases((2, 7, 2, 7, 16, 16), torch.float32, gen, "random").items():
        args = tuple(torch.zeros_like(x) if isinstance(x, torch.Tensor) and x.dtype == torch.bool else x
                     for x in args)
        out = K.OPS[op](*args)
        assert torch.count_nonzero(out) == 0, op


@pytest.mark.interpret
@pytest.mark.parametrize("which", ["empty_batch", "empty_tokens"])
def test_empty_inputs(which):
    gen = torch.Generator().manual_seed(1)
    shape = (0, 7, 2, 5, 16, 33) if which == "empty_batch" else (2, 0, 3, 0, 16, 33)
    for op, args in _cases(shape, torch.float32, gen, "random").items():
        out = K.OPS[op](*args)
        ref = reference.OPS[op](*args)
        assert out.shape == ref.shape and out.dtype == torch.float32, op
        assert torch.count_nonzero(out) == 0, op


@pytest.mark.interpret
def test_mixed_dtypes_upcast():
    """a1 fp16 vs a2 fp32 (and m fp32 against fp16 activations) run in fp32 inside the kernel."""
    gen = torch.Generator().manual_seed(5)
    a1, g1, _, m1 = _set(2, 7, 33, 20, torch.float16, gen)
    a2, g2, _, m2 = _set(3, 9, 33, 20, torch.float32, gen)
    _check("ghost_pairwise", (a1, g1, a2, g2, m1, m2))
    mat = torch.randn(20, 33, generator=gen).to(DEVICE)
    _check("dense_dot", (a1, g1, mat, m1))


# ------------------------------------------------------------------------------------------------
# launcher validation and fallbacks


def test_float64_and_foreign_device_fall_back():
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE)
    assert K.OPS["ghost_self"](x, x, None) is NotImplemented
    assert K.OPS["dense_dot"](x, x, torch.randn(4, 4, dtype=torch.float64, device=DEVICE)) is NotImplemented
    if os.environ.get("TRITON_INTERPRET") != "1":
        y = torch.randn(2, 3, 4)
        assert K.OPS["ghost_self"](y, y, None) is NotImplemented  # CPU tensor without the interpreter


def test_launchers_reject_bad_inputs():
    a = torch.randn(2, 3, 4, device=DEVICE)
    g = torch.randn(2, 3, 5, device=DEVICE)
    with pytest.raises(TypeError, match="floating-point"):
        K.OPS["ghost_self"](a.long(), g, None)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        K.OPS["ghost_self"](a, g[:, :2], None)
    with pytest.raises(ValueError, match="feature sizes"):
        K.OPS["ghost_pairwise"](a, g, a[..., :3], g, None, None)
    with pytest.raises(TypeError, match="bool"):
        K.OPS["ghost_self"](a, g, torch.ones(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="mask"):
        K.OPS["ghost_self"](a, g, torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="m must be"):
        K.OPS["dense_dot"](a, g, torch.randn(4, 5, device=DEVICE), None)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        K.OPS["norm_grad"](a[0], a[0], None)
    ids = torch.randint(0, 3, (2, 3), device=DEVICE)
    with pytest.raises(TypeError, match="token ids"):
        K.OPS["embedding_self"](ids.float(), g, None)
    with pytest.raises(ValueError, match="outside a table"):
        K.OPS["embedding_dense_dot"](ids + 10, g, torch.randn(4, 5, device=DEVICE), None)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="one device"):
            K.OPS["ghost_self"](a, g.cpu(), None)


# ------------------------------------------------------------------------------------------------
# dispatch through gefx.ops / gefx.backends


@pytest.mark.interpret
def test_forced_triton_backend_routes_and_agrees(monkeypatch):
    table = backends.load("triton")
    calls = []
    for op in list(table):
        fn = table[op]
        monkeypatch.setitem(table, op, lambda *a, _fn=fn, _op=op, **k: (calls.append(_op), _fn(*a, **k))[1])
    gen = torch.Generator().manual_seed(11)
    a1, g1, ids1, m1 = _set(2, 7, 33, 20, torch.float32, gen)
    a2, g2, ids2, m2 = _set(3, 5, 33, 20, torch.float32, gen)
    mat = torch.randn(20, 33, generator=gen).to(DEVICE)
    table_m = torch.randn(VOCAB, 20, generator=gen).to(DEVICE)
    run = {
        "ghost_pairwise": lambda: ops.pairwise(a1, g1, a2, g2, m1, m2),
        "ghost_self": lambda: ops.self_norms(a1, g1, m1),
        "dense_dot": lambda: ops.dense_dot(a1, g1, mat, m1),
        "embedding_pairwise": lambda: ops.embedding_pairwise(ids1, g1, ids2, g2, m1, m2),
        "embedding_self": lambda: ops.embedding_self_norms(ids1, g1, m1),
        "embedding_dense_dot": lambda: ops.embedding_dense_dot(ids1, g1, table_m, m1),
        "norm_grad": lambda: ops.norm_grad(a1, a1 * 0.5, m1),
    }
    for op, fn in run.items():
        monkeypatch.setenv("GEFX_BACKEND", "triton")
        assert backends.choose(a1.device) == "triton"
        calls.clear()
        got = fn()
        assert calls == [op], f"{op} did not run on triton: {calls}"
        monkeypatch.setenv("GEFX_BACKEND", "torch")
        want = fn()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


def test_triton_backend_status_available():
    assert backends.status()["triton"] == "available"


# ------------------------------------------------------------------------------------------------
# g_effect on a tiny model: triton backend == torch backend


@pytest.mark.interpret
@pytest.mark.slow
def test_g_effect_tiny_llama_triton_equals_torch(monkeypatch):
    gefx = pytest.importorskip("gefx")
    if not hasattr(gefx, "g_effect") or not hasattr(gefx, "trace"):
        pytest.skip("engine (gefx.trace / gefx.g_effect) not available")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).float().to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    ids_f = torch.randint(0, 37, (2, 7), generator=gen).to(DEVICE)
    ids_r = torch.randint(0, 37, (3, 5), generator=gen).to(DEVICE)
    lab_f, lab_r = ids_f.clone(), ids_r.clone()
    lab_f[:, :3] = -100  # prompt tokens
    lab_r[0, :] = -100   # a sample without answer tokens

    table = backends.load("triton")
    calls = []
    for op in list(table):
        fn = table[op]
        monkeypatch.setitem(table, op, lambda *a, _fn=fn, _op=op, **k: (calls.append(_op), _fn(*a, **k))[1])

    def run(backend):
        monkeypatch.setenv("GEFX_BACKEND", backend)
        with gefx.trace(model) as tape:
            out_f, out_r = model(input_ids=ids_f), model(input_ids=ids_r)
            nll_f = gefx.losses.sequence_nll(out_f.logits, lab_f)
            nll_r = gefx.losses.sequence_nll(out_r.logits, lab_r)
            eff = gefx.g_effect(tape, -nll_f, {"forget": nll_f, "retain": nll_r}, objective_instances=True)
        return eff

    want = run("torch")
    calls.clear()
    got = run("triton")
    assert calls, "the triton backend was never called"
    for name in want:
        w, g = want[name], got[name]
        assert w.groups == g.groups
        scale = max(1.0, float(w.per_instance_group.abs().max()))
        torch.testing.assert_close(g.per_instance_group, w.per_instance_group, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(g.per_objective_instance_group, w.per_objective_instance_group,
                                   rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# GPU only: bf16 and large shapes


@pytest.fixture
def no_tuning(monkeypatch):
    """One config per call (the first candidate): keeps GPU test compile time down."""
    monkeypatch.setenv("GEFX_TRITON_AUTOTUNE", "0")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_small_shapes_all_dtypes(dtype, no_tuning):
    gen = torch.Generator().manual_seed(21)
    shapes = SHAPES + [(4, 130, 3, 77, 257, 129)] if dtype == torch.bfloat16 else [(4, 130, 3, 77, 257, 129)]
    for shape in shapes:
        for mode in (None, "dead_row"):
            for op, args in _cases(shape, dtype, gen, mode, noncontig=mode is not None, device="cuda").items():
                _check(op, args)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_large_shapes(dtype, no_tuning):
    gen = torch.Generator().manual_seed(22)
    shape = (4, 512, 3, 384, 1024, 1376)  # features not multiples of 128; several token tiles
    for op, args in _cases(shape, dtype, gen, "random", device="cuda").items():
        _check(op, args)


@pytest.mark.gpu
@gpu
def test_gpu_deterministic():
    """Fixed-order partial sums: bitwise repeatable (this one also exercises the host tuner)."""
    gen = torch.Generator().manual_seed(23)
    a, g, _, m = _set(4, 300, 512, 700, torch.bfloat16, gen, device="cuda")
    first = K.OPS["ghost_self"](a, g, m)
    for _ in range(3):
        assert torch.equal(K.OPS["ghost_self"](a, g, m), first)


# ------------------------------------------------------------------------------------------------
# split feature loops (kernels/_split.py): forced and cost-model splits, exact against float64


class _GridSpy:
    """Stands in for a @triton.jit kernel: records each launch grid, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


SPLIT_OPS = {"ghost_self": "_ghost_self_kernel", "ghost_pairwise": "_ghost_pairwise_kernel",
             "dense_dot": "_dense_dot_kernel"}


def _spy(monkeypatch, op):
    import importlib
    mod = importlib.import_module(f"gefx.kernels.{op}")
    spy = _GridSpy(getattr(mod, SPLIT_OPS[op]))
    monkeypatch.setattr(mod, SPLIT_OPS[op], spy)
    return mod, spy


def _dense_splits(grids):
    """dense_dot's split-K of each recorded launch (grid axis 1)."""
    return [g[1] for g in grids]


def _force(monkeypatch, mod, **extra):
    """Every config of the module (16-bit and float32 lists) with tiny tiles and `extra` set."""
    small = SMALL_BLOCKS[mod.__name__.rsplit(".", 1)[1]]
    monkeypatch.setenv("GEFX_TRITON_AUTOTUNE", "0")
    for name in ("CONFIGS", "CONFIGS_FP32"):
        monkeypatch.setattr(mod, name, (dict(getattr(mod, name)[0], **small, **extra),))


@pytest.fixture
def reduce_spy(monkeypatch):
    from gefx.kernels import _split as S
    calls = []
    orig = S.gram_reduce
    monkeypatch.setattr(S, "gram_reduce", lambda ws, n_ca: (calls.append(tuple(ws.shape)), orig(ws, n_ca))[1])
    return calls


@pytest.mark.interpret
@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", list(SPLIT_OPS))
def test_forced_split_vs_float64(op, dtype, split, monkeypatch, reduce_spy):
    """About SPLIT chunks of the feature loop (3 + 2 blocks of 16 for Da = 33, Dg = 20: chunks of
    3, 2 or 1 blocks, cut at the A / G boundary; dense_dot: 3 blocks of Da), exact by the 2x-error
    rule, with masks, a fully masked sample and non-contiguous inputs; the split is asserted."""
    mod, spy = _spy(monkeypatch, op)
    _force(monkeypatch, mod, SPLIT=split)
    gen = torch.Generator().manual_seed(31 + split)
    for shape, mode, nc in (((3, 33, 2, 7, 33, 20), "dead_row", True), ((2, 7, 3, 33, 33, 20), None, False)):
        spy.grids.clear()
        reduce_spy.clear()
        args = _cases(shape, dtype, gen, mode, noncontig=nc)[op]
        out = _check(op, args)
        if mode == "dead_row":
            assert torch.all(out[0] == 0)
        # chunks: dense_dot ceil(3 / ceil(3 / S)); the Gram kernels gram_chunks(3, 2, S): per =
        # ceil(5 / S) blocks, ceil(3 / per) + ceil(2 / per) chunks
        want = {"dense_dot": {2: 2, 3: 3, 7: 3}}.get(op, {2: 2, 3: 3, 7: 5})[split]
        if op == "dense_dot":
            assert _dense_splits(spy.grids) == [want]
            assert not reduce_spy
        else:  # the chunk kernel filled `want` chunks; the unsplit kernel did not run
            assert len(reduce_spy) == 1 and reduce_spy[0][0] == want, reduce_spy
            assert spy.grids == []


@pytest.mark.interpret
def test_ghost_self_grid_has_no_lower_triangle(monkeypatch):
    """n token tiles -> n (n + 1) / 2 programs per sample (each upper pair once, upper_pairs)."""
    mod, spy = _spy(monkeypatch, "ghost_self")
    _force(monkeypatch, mod)
    gen = torch.Generator().manual_seed(4)
    for t, n in ((16, 1), (33, 3), (80, 5)):
        spy.grids.clear()
        a, g, _, m = _set(2, t, 17, 18, torch.float32, gen)
        _check("ghost_self", (a, g, m))
        assert spy.grids == [(n * (n + 1) // 2, 2)]


@pytest.mark.interpret
@pytest.mark.parametrize("op", list(SPLIT_OPS))
def test_cost_model_splits_small_grids(op, monkeypatch, reduce_spy):
    """Through the public launcher with the module's own (tiny-tile) config: the cost model splits
    a grid of a few programs over a long feature loop (MIN_STEPS lowered so that the interpreter's
    small features suffice), exactly; a workspace bound too small for two Gram chunks keeps the
    ghost kernels unsplit (dense_dot needs no workspace)."""
    from gefx.kernels import _split as S
    mod, spy = _spy(monkeypatch, op)
    _force(monkeypatch, mod)
    monkeypatch.setattr(S, "MIN_STEPS", 2)
    monkeypatch.setenv("GEFX_TRITON_SMS", "132")
    gen = torch.Generator().manual_seed(9)
    shape = (2, 20, 2, 20, 600, 300)  # 38 + 19 feature blocks of 16 (dense_dot: 38 over Da); inputs
    # of 144 / 288 KB allow a workspace of 36 / 72 KB (1/4), chunks of 6 / 16 [16, 16] tiles of 1 KiB
    args = _cases(shape, torch.float32, gen, "random")[op]
    _check(op, args)
    split = (reduce_spy[0][0] if reduce_spy else 1) if op != "dense_dot" else _dense_splits(spy.grids)[0]
    assert split > 1, f"{op}: no split chosen ({spy.grids}, {reduce_spy})"
    spy.grids.clear()
    reduce_spy.clear()
    # 4 KiB: less than two chunks of >= 6 tile pairs' [16, 16] float32 Gram tiles (12 KiB)
    monkeypatch.setenv("GEFX_TRITON_WORKSPACE_MB", str(4096 / 2**20))
    _check(op, args)
    if op == "dense_dot":
        assert _dense_splits(spy.grids)[0] > 1
    else:
        assert not reduce_spy and len(spy.grids) == 1


def test_split_cost_model():
    """The stated model: split only grids under about a wave with a long loop; bounded by
    MIN_STEPS, MAX_SPLIT and the workspace; Llama-7B-shaped cases from the H200 run."""
    from gefx.kernels import _split as S
    from gefx.kernels import dense_dot, ghost_pairwise, ghost_self
    slots = 132 * S.PROGRAMS_PER_SM
    assert S.split_count(4 * slots, 128, slots) == 1            # four full waves: nothing to gain
    assert S.split_count(10, 128, slots) == 16                   # 16 steps a chunk (of 8 at least) ...
    # 26 x 10 = 260 programs stay in one wave of 264 slots (chunks of 5 steps); 27 would add a wave
    assert S.split_count(10, 128, slots, min_steps=4) == 26
    assert S.split_count(2, 128, slots, min_steps=1) == S.MAX_SPLIT
    assert S.split_count(10, 20, slots) == 2                     # ... a short loop splits less
    assert S.split_count(10, 128, slots, ws_per_program=1 << 20, ws_limit=3 << 20) == 1
    assert S.split_count(10, 128, slots, ws_per_program=1 << 20, ws_limit=40 << 20) == 4
    cost = lambda s: S.split_cost(100 * s, -(-512 // s), slots, 1.0)  # noqa: E731
    assert all(cost(S.split_count(100, 512, slots)) <= cost(s) for s in range(1, 20))  # the stated cost's minimum
    dev = torch.device("cpu")  # no CUDA: DEFAULT_SMS (the H100 / H200's 132)
    bf16 = dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3)
    # ghost_self attn (4096 + 4096 features), T = 512: B = 4 -> 144 tile-pair programs < 264 slots
    assert ghost_self.plan(bf16, 4, 512, 4096, 4096, 2, dev)["SPLIT"] > 1
    assert ghost_self.plan(bf16, 16, 2048, 4096, 4096, 2, dev)["SPLIT"] == 1
    assert ghost_self.plan(dict(bf16, SPLIT=3), 4, 512, 4096, 4096, 2, dev)["SPLIT"] == 3  # explicit wins
    pw = dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=64, num_warps=4, num_stages=3)
    assert ghost_pairwise.plan(pw, 4, 4, 128, 128, 4096, 4096, 2, dev)["SPLIT"] > 1
    assert ghost_pairwise.plan(pw, 8, 8, 512, 512, 4096, 4096, 2, dev)["SPLIT"] == 1
    dd = dict(dense_dot.CONFIGS[0])
    assert dense_dot.plan(dd, 4, 128, 4096, 4096, dev)["SPLIT"] > 1      # 128 output tiles, 64 K steps
    assert dense_dot.plan(dd, 16, 2048, 4096, 32000, dev)["SPLIT"] == 1


# ------------------------------------------------------------------------------------------------
# the host tuner's pick and its log (_common.pick / choose), driven by a fake timer


@pytest.fixture
def fresh_tuner(monkeypatch):
    from gefx.kernels import _common as C
    monkeypatch.setattr(C, "_TUNED", {})
    monkeypatch.setattr(C, "_LOGGED", set())
    monkeypatch.setattr(C, "PICKS", [])
    return C


def test_tuner_picks_fastest_and_logs_once_per_key(fresh_tuner, monkeypatch, tmp_path):
    import json
    C = fresh_tuner
    log = tmp_path / "tune.jsonl"
    monkeypatch.setenv("GEFX_TRITON_TUNE_LOG", str(log))
    cands = [dict(BLOCK_T=64, num_warps=4), dict(BLOCK_T=128, num_warps=8), dict(BLOCK_T=32, num_warps=4)]
    fake_ms = {64: 2.0, 128: 1.0, 32: 3.0}
    timed = []

    def measure(cfg):
        timed.append(cfg["BLOCK_T"])
        return fake_ms[cfg["BLOCK_T"]]

    key = (4, 512, torch.bfloat16)
    assert C.choose("ghost_self", key, "cuda:0", cands, measure) == cands[1]
    assert timed == [64, 128, 32]
    assert C.choose("ghost_self", key, "cuda:0", cands, measure) == cands[1]  # cached: not timed again
    assert timed == [64, 128, 32]
    fake_ms[32] = 0.5  # another key is timed afresh
    assert C.choose("ghost_self", (8, 512, torch.bfloat16), "cuda:0", cands, measure) == cands[2]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 2 and lines == C.PICKS
    first = lines[0]
    assert first["op"] == "ghost_self" and first["key"] == ["4", "512", "torch.bfloat16"]
    assert first["device"] == "cuda:0" and first["how"] == "timed" and first["config"] == cands[1]
    assert [t["ms"] for t in first["times_ms"]] == [2.0, 1.0, 3.0]


def test_tuner_skips_failing_candidates_and_stderr_log(fresh_tuner, monkeypatch, capsys):
    C = fresh_tuner
    monkeypatch.setenv("GEFX_TRITON_TUNE_LOG", "1")
    cands = [dict(BLOCK_T=64), dict(BLOCK_T=128), dict(BLOCK_T=32)]

    def measure(cfg):
        if cfg["BLOCK_T"] == 32:
            raise RuntimeError("out of shared memory")
        return {64: 2.0, 128: 2.0}[cfg["BLOCK_T"]]

    assert C.choose("dense_dot", (1,), "cuda:0", cands, measure) == cands[0]  # tie: the earlier one
    err = capsys.readouterr().err
    assert err.count("gefx.kernels tune:") == 1 and '"ms": null' in err
    with pytest.raises(RuntimeError, match="no candidate config ran"):
        C.choose("dense_dot", (2,), "cuda:0", cands, lambda cfg: 1 / 0)


def test_tuner_untimed_pick_first_logged_once_not_cached(fresh_tuner, monkeypatch, tmp_path):
    C = fresh_tuner
    log = tmp_path / "tune.jsonl"
    monkeypatch.setenv("GEFX_TRITON_TUNE_LOG", str(log))
    cands = [dict(BLOCK_T=64), dict(BLOCK_T=128)]
    for _ in range(3):
        assert C.choose("ghost_self", (1,), "cpu", cands, None) == cands[0]
    assert len(log.read_text().splitlines()) == 1 and C.PICKS[0]["how"] == "first"
    assert C.choose("ghost_self", (1,), "cpu", cands[1:], None) == cands[1]  # a new list takes effect
    assert [p["config"] for p in C.PICKS] == [cands[0], cands[1]] and C.PICKS[1]["how"] == "only"
    monkeypatch.delenv("GEFX_TRITON_TUNE_LOG")


@pytest.mark.interpret
def test_launcher_records_its_pick(fresh_tuner):
    """A launch through gefx.kernels records the config it ran with (planned SPLIT included)."""
    C = fresh_tuner
    gen = torch.Generator().manual_seed(2)
    a, g, _, m = _set(2, 7, 33, 20, torch.float32, gen)
    _check("ghost_self", (a, g, m))
    (entry,) = C.PICKS
    assert entry["op"] == "ghost_self" and entry["key"][:2] == ["2", "7"]
    assert entry["config"]["SPLIT"] == 1 and entry["config"]["BLOCK_T"] == 16


@pytest.mark.interpret
def test_forced_split_mixed_dtypes(monkeypatch, reduce_spy):
    """A split with inputs of different dtypes (each Gram's chunks in its own dtype pair, upcast to
    float32 where a pair differs), exact by the 2x-error rule for float32."""
    gen = torch.Generator().manual_seed(12)
    a1, g1, _, m1 = _set(2, 20, 33, 20, torch.float16, gen)
    a2, g2, _, m2 = _set(3, 9, 33, 20, torch.float32, gen)
    for op, args in (("ghost_pairwise", (a1, g1, a2, g2, m1, m2)), ("ghost_self", (a1, g2[:2, :9].repeat(1, 3, 1)[:, :20], m1))):
        import importlib
        _force(monkeypatch, importlib.import_module(f"gefx.kernels.{op}"), SPLIT=3)
        reduce_spy.clear()
        _check(op, args)
        assert len(reduce_spy) == 1 and reduce_spy[0][0] == 3
