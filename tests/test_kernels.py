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
