"""Float32 accuracy of the 3xTF32 dots and 64-bit offsets of the Triton kernels (gefx.kernels).

3xTF32 (kernels/_common.py::_split_tf32, _dot): float32 tiles are split into hi + lo, both exact
tf32 values, and multiplied as hi hi + hi lo + lo hi on tensor cores. Under the CPU interpreter
the "tf32" dots run in full float32; as hi and lo are already exact tf32 values (rounded in
software) and 11 x 11-bit products are exact in float32, that is also what the GPU computes, up to
the accumulation order. test_split_* check the split itself in torch (what the GPU does, with the
tensor cores' tf32 input rounding emulated by masking 13 bits); test_fp32_ops_* check every op
end to end against the "2x-error rule": the kernel's error against the float64 reference is at
most twice that of torch's float32 computation of the same quantity.

64-bit offsets: tensors laid out with strides such that an element offset passes 2^31 (views
over one large storage that is allocated but, apart from the few elements used, never touched).
"""
from __future__ import annotations

import os

import pytest
import torch

from gefx import reference

K = pytest.importorskip("gefx.kernels")
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
RUNNABLE = K.UNAVAILABLE is None and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
pytestmark = pytest.mark.skipif(not RUNNABLE, reason=f"triton backend unavailable: {K.UNAVAILABLE}")

VOCAB = 11
OPS = ("ghost_pairwise", "ghost_self", "dense_dot", "embedding_pairwise", "embedding_self",
       "embedding_dense_dot", "embedding_linear_pairwise", "norm_grad")


# ------------------------------------------------------------------------------------------------
# the split, in torch (bit-for-bit the kernel's arithmetic)

def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest tf32 value (ties away from zero), as _split_tf32 does."""
    return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def _truncate_tf32(x: torch.Tensor) -> torch.Tensor:
    """What a tensor core does to a float32 operand in a tf32 mma: drop the 13 low mantissa bits."""
    return (x.view(torch.int32) & -8192).view(torch.float32)


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = _round_tf32(x)
    return hi, _round_tf32(x - hi)


def mm_3xtf32(x: torch.Tensor, y: torch.Tensor, accumulate=torch.float32) -> torch.Tensor:
    """x @ y as the GPU computes it: the tensor cores truncate their inputs to tf32 (a no-op on the
    split parts), products are exact, sums in `accumulate`."""
    xh, xl = (_truncate_tf32(p) for p in split_tf32(x))
    yh, yl = (_truncate_tf32(p) for p in split_tf32(y.contiguous()))
    f = (lambda p: p.to(accumulate))
    return f(xl) @ f(yh) + f(xh) @ f(yl) + f(xh) @ f(yh)


def wide_range(*shape, gen) -> torch.Tensor:
    """randn * 10**U(-3, 3): six decades of magnitudes in one tensor."""
    mag = 10.0 ** (torch.rand(*shape, generator=gen, dtype=torch.float64) * 6 - 3)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * mag).float()


def test_split_tf32_parts_are_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([wide_range(4096, gen=gen), torch.tensor([0.0, -0.0, 1.0, -1.5, 3.0e38, 1e-40, 2.0 ** -126])])
    hi, lo = split_tf32(x)
    for part in (hi, lo):  # exact tf32 values: the tensor cores' truncation changes nothing
        assert torch.equal(_truncate_tf32(part), part)
    x64, hi64, lo64 = x.double(), hi.double(), lo.double()
    assert torch.equal((x - hi).double(), x64 - hi64)  # x - hi is exact in float32
    # half a tf32 ulp; subnormals have a fixed absolute spacing (tf32's is 2^-136)
    assert bool(((x64 - hi64).abs() <= 2.0 ** -11 * x64.abs().clamp(min=2.0 ** -126)).all())
    assert bool(((x64 - hi64 - lo64).abs() <= 2.0 ** -23 * x64.abs() + 2.0 ** -137).all())  # ~fp32 rounding


if RUNNABLE:
    import triton
    import triton.language as tl

    from gefx.kernels._common import _split_tf32

    @triton.jit
    def _split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        hi, lo = _split_tf32(tl.load(x_ptr + offs))
        tl.store(hi_ptr + offs, hi)
        tl.store(lo_ptr + offs, lo)


@pytest.mark.interpret
def test_split_tf32_kernel_matches_torch():
    """The Triton helper does the same bit operations as split_tf32 (constants typed as intended)."""
    gen = torch.Generator().manual_seed(1)
    x = wide_range(1024, gen=gen).to(DEVICE)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, N=1024)
    want_hi, want_lo = split_tf32(x.cpu())
    assert torch.equal(hi.cpu(), want_hi) and torch.equal(lo.cpu(), want_lo)


@pytest.mark.parametrize("kind", ["cross", "self", "cancel"])
@pytest.mark.parametrize("k", [33, 512, 4096])
def test_split_3xtf32_matmul_within_2x_of_fp32(k, kind):
    """What the GPU computes for a Gram tile (tf32 inputs, exact products, fp32 or fp64 sums) is
    within the 2x rule of torch's float32 matmul, on wide-range and near-cancelling data."""
    gen = torch.Generator().manual_seed(k + len(kind))
    x = wide_range(64, k, gen=gen)
    y = x if kind == "self" else wide_range(48, k, gen=gen)
    if kind == "cancel":  # y's second half of features cancels the first half: x . y ~ 1e-3 |x||y|
        x = torch.cat([x, x], dim=1)
        y = torch.cat([y, -y * (1 + 1e-3 * torch.randn(y.shape, generator=gen))], dim=1)
    ref = x.double() @ y.double().T
    e32 = (x @ y.T).double() - ref
    absref = x.double().abs() @ y.double().abs().T  # sum of |products|: the error scale of a dot
    for acc in (torch.float32, torch.float64):
        err = (mm_3xtf32(x, y.T, acc).double() - ref).abs()
        assert float(err.mean()) <= 2 * float(e32.abs().mean()), acc
        # per entry: 2x rule, or within 2^-22 of the |products| (a product's 3xTF32 error is
        # <= ~2^-22 |x||y|, four fp32 half-ulps, plus fp32 sums: where one product dominates, torch's
        # single rounding can be more than 2x better)
        assert bool((err <= 2 * e32.abs() + 2.0 ** -21 * absref).all()), acc
    # the scheme's own floor, summed exactly: lo lo dropped plus lo rounding, <= 2^-21 of the |products|
    err64 = (mm_3xtf32(x, y.T, torch.float64) - ref).abs()
    assert bool((err64 <= 2.0 ** -21 * absref).all())


# ------------------------------------------------------------------------------------------------
# every op with float32 inputs, end to end (interpreter or GPU)

def _pair(b, t, d1, d2, gen, cancel: bool):
    """(x [B, T, d1], g [B, T, d2]) of wide range; with `cancel`, the second half of the tokens
    repeats the first with negated (1e-3-perturbed) gradients, so token sums nearly cancel."""
    x, g = wide_range(b, t, d1, gen=gen), wide_range(b, t, d2, gen=gen)
    if cancel:
        h = t // 2
        x[:, h:2 * h] = x[:, :h]
        g[:, h:2 * h] = -g[:, :h] * (1 + 1e-3 * torch.randn(b, h, d2, generator=gen))
    return x.to(DEVICE), g.to(DEVICE)


def _fp32_cases(gen, cancel: bool):
    b1, t1, b2, t2, da, dg = 2, 34, 3, 20, 40, 24
    a1, g1 = _pair(b1, t1, da, dg, gen, cancel)
    a2, g2 = _pair(b2, t2, da, dg, gen, cancel)
    ids1 = torch.randint(0, VOCAB, (b1, t1), generator=gen)
    ids2 = torch.randint(0, VOCAB, (b2, t2), generator=gen)
    l2 = wide_range(b2, t2, VOCAB, gen=gen)
    if cancel:  # repeated tokens share ids (so their contributions meet in one sum)
        ids1[:, t1 // 2:] = ids1[:, :t1 // 2]
        ids2[:, t2 // 2:] = ids2[:, :t2 // 2]
        l2[:, t2 // 2:] = l2[:, :t2 // 2]
    ids1, ids2, l2 = ids1.to(DEVICE), ids2.to(DEVICE), l2.to(DEVICE)
    mat = wide_range(dg, da, gen=gen).to(DEVICE)
    table = wide_range(VOCAB, dg, gen=gen).to(DEVICE)
    u1, ug = _pair(b1, t1, da, da, gen, cancel)
    m1 = (torch.rand(b1, t1, generator=gen) > 0.2).to(DEVICE)
    m2 = (torch.rand(b2, t2, generator=gen) > 0.2).to(DEVICE)
    if cancel:  # keep both tokens of each cancelling pair
        m1[:, t1 // 2:] = m1[:, :t1 // 2]
        m2[:, t2 // 2:] = m2[:, :t2 // 2]
    return {
        "ghost_pairwise": (a1, g1, a2, g2, m1, m2),
        "ghost_self": (a1, g1, m1),
        "dense_dot": (a1, g1, mat, m1),
        "embedding_pairwise": (ids1, g1, ids2, g2, m1, m2),
        "embedding_self": (ids1, g1, m1),
        "embedding_dense_dot": (ids1, g1, table, m1),
        "embedding_linear_pairwise": (ids1, g1, l2, g2, m1, m2),
        "norm_grad": (u1, ug, m1),
    }


def _abs_ref(op, args):
    """The op on |inputs| in float64: a bound on the sum of |terms| of each output (its error scale
    under cancellation)."""
    return reference.OPS[op](*(a.double().abs() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                               for a in args))


def _errors(op, args):
    out = K.OPS[op](*args)
    assert out is not NotImplemented
    f64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    ref = reference.OPS[op](*f64)
    same = reference.OPS[op](*args)
    return (out.double() - ref).abs(), (same.double() - ref).abs(), ref


def _assert_2x(op, err, e32, ref, absref, tag="", mean=True):
    """2x rule: on the mean error (`mean`), and per entry up to 2^-21 of the entry's sum of |terms|
    (a 3xTF32 product errs by up to ~2^-22 |x||y|, four float32 half-ulps; where one term dominates,
    or sums cancel, torch's own error can be far below that, and a change of summation order
    alone breaks a strict per-entry 2x)."""
    scale = float(ref.abs().max())
    msg = f"{op}{tag}: kernel max/mean err {float(err.max()):.3e}/{float(err.mean()):.3e}, " \
          f"torch fp32 {float(e32.max()):.3e}/{float(e32.mean()):.3e}, scale {scale:.3e}"
    if mean:
        assert float(err.mean()) <= 2 * float(e32.mean()) + 2.0 ** -23 * scale, msg
    assert bool((err <= 2 * e32 + 2.0 ** -21 * absref).all()), msg


@pytest.mark.interpret
@pytest.mark.parametrize("cancel", [False, True], ids=["wide_range", "cancelling"])
def test_fp32_ops_within_2x_of_torch_fp32(cancel, monkeypatch):
    monkeypatch.delenv("GEFX_TRITON_FP32_DOT", raising=False)
    monkeypatch.setenv("GEFX_TRITON_AUTOTUNE", "0")
    gen = torch.Generator().manual_seed(1000 + cancel)
    for op, args in _fp32_cases(gen, cancel).items():
        err, e32, ref = _errors(op, args)
        # under cancellation the mean is dominated by summation order (the kernels sum Gram-tile
        # partials, torch sums differently; "ieee" dots do no better): per-entry rule only
        _assert_2x(op, err, e32, ref, _abs_ref(op, args), " cancelling" if cancel else "", mean=not cancel)


@pytest.mark.interpret
def test_fp32_mixed_dtype_upcast_within_2x(monkeypatch):
    """fp16 against fp32 tiles are upcast and take the same 3xTF32 path."""
    monkeypatch.setenv("GEFX_TRITON_AUTOTUNE", "0")
    gen = torch.Generator().manual_seed(77)
    a1, g1 = _pair(2, 17, 33, 20, gen, False)
    a2, g2 = _pair(3, 9, 33, 20, gen, False)
    a1h, g1h = (x.clamp(-6e4, 6e4).half() for x in (a1, g1))
    for op, args in {"ghost_pairwise": (a1h, g1h, a2, g2, None, None),
                     "dense_dot": (a1h, g1h, wide_range(20, 33, gen=gen).to(DEVICE), None)}.items():
        out = K.OPS[op](*args)
        f64 = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
        f32 = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
        ref = reference.OPS[op](*f64)
        _assert_2x(op, (out.double() - ref).abs(), (reference.OPS[op](*f32).double() - ref).abs(), ref,
                   _abs_ref(op, args))


def test_fp32_precision_switch(monkeypatch):
    from gefx.kernels import _common as C
    monkeypatch.delenv("GEFX_TRITON_FP32_DOT", raising=False)
    assert C.dot_precision(torch.float32) == "tf32x3"
    assert C.dot_precision(torch.float16) == C.dot_precision(torch.bfloat16) == "tf32"  # native path
    x16, x32 = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    assert C.pair_mode(x16, x32) == (True, "tf32x3") and C.pair_mode(x16, x16) == (False, "tf32")
    monkeypatch.setenv("GEFX_TRITON_FP32_DOT", "ieee")
    assert C.dot_precision(torch.float32) == "ieee" and C.pair_mode(x16, x32) == (True, "ieee")
    monkeypatch.setenv("GEFX_TRITON_FP32_DOT", "tf32")
    with pytest.raises(ValueError, match="GEFX_TRITON_FP32_DOT"):
        C.dot_precision(torch.float32)


@pytest.mark.interpret
def test_fp32_ieee_path_still_runs(monkeypatch):
    monkeypatch.setenv("GEFX_TRITON_FP32_DOT", "ieee")
    monkeypatch.setenv("GEFX_TRITON_AUTOTUNE", "0")
    gen = torch.Generator().manual_seed(5)
    for op in ("ghost_self", "dense_dot"):
        args = _fp32_cases(gen, False)[op]
        err, e32, ref = _errors(op, args)
        _assert_2x(op, err, e32, ref, _abs_ref(op, args), " ieee")


# ------------------------------------------------------------------------------------------------
# 64-bit offsets: element offsets past 2^31 inside one sample

def _span(n: int) -> int:
    """A stride for a dimension of size n whose last index lands just past 2^31 (by < 2^12 + n)."""
    return (2 ** 31 + 2 ** 12) // (n - 1) + 1


@pytest.fixture(scope="module")
def huge_storage():
    """A float16 buffer of 2^31 + 2^17 elements (4 GiB of address space, allocated untouched: only
    the elements the views below use are written and read)."""
    if DEVICE == "cuda":
        pytest.skip("the huge-stride views need 4 GiB of device memory; run on the interpreter")
    try:
        buf = torch.empty(2 ** 31 + 2 ** 17, dtype=torch.float16)
    except RuntimeError as exc:  # no room for the address space
        pytest.skip(f"cannot reserve a 4 GiB buffer: {exc}")
    yield buf
    del buf


class _Placer:
    """Non-overlapping views into the huge buffer; view k starts at element k * 8192."""

    def __init__(self, buf):
        self.buf, self.k, self.placed = buf, 0, []

    def put(self, x: torch.Tensor, strides) -> torch.Tensor:
        base = self.k * 8192
        self.k += 1
        v = torch.as_strided(self.buf, x.shape, strides, base)
        v.copy_(x)
        self.placed.append((v, x))
        return v

    def check(self):
        assert all(torch.equal(v, x) for v, x in self.placed), "views overlap"


def _small(*shape, gen):
    return torch.randn(*shape, generator=gen).half()


def _huge_cases(buf, layout: str, gen):
    """Every op with its float tensors laid out so that one sample spans more than 2^31 elements:
    layout "tokens": [B, T, D] with a token stride putting the last token past 2^31 (features
    contiguous, samples 512 apart); layout "features": the same with the feature stride (tokens
    contiguous). Tables / matrices get such a row (or column) stride too; l2 [B, S, V] always has
    a huge token stride (the 16k tokens x 128k vocabulary case)."""
    P = _Placer(buf)
    b1, t1, b2, t2, da, dg = 2, 3, 2, 3, 16, 16

    def act(b, t, d):
        x = _small(b, t, d, gen=gen)
        return P.put(x, (512, _span(t), 1) if layout == "tokens" else (512, 1, _span(d)))

    a1, g1, a2, g2, u1 = act(b1, t1, da), act(b1, t1, dg), act(b2, t2, da), act(b2, t2, dg), act(b1, t1, da)
    if layout == "tokens":
        mat = P.put(_small(dg, da, gen=gen), (_span(dg), 1))
        table = P.put(_small(VOCAB, dg, gen=gen), (_span(VOCAB), 1))
    else:
        mat = P.put(_small(dg, da, gen=gen), (1, _span(da)))
        table = P.put(_small(VOCAB, dg, gen=gen), (1, _span(dg)))
    l2 = P.put(_small(b2, t2, VOCAB, gen=gen), (512, _span(t2), 1))
    P.check()
    ids1 = torch.randint(0, VOCAB, (b1, t1), generator=gen)
    ids2 = torch.randint(0, VOCAB, (b2, t2), generator=gen)
    ids1[:, -1] = ids2[:, -1] = 3  # a shared id at the far tokens (the embedding kernels skip tile pairs without one)
    m1 = torch.tensor([[True, False, True], [True, True, True]])
    return {
        "ghost_pairwise": (a1, g1, a2, g2, m1, None),
        "ghost_self": (a1, g1, None),
        "dense_dot": (a1, g1, mat, m1),
        "embedding_pairwise": (ids1, g1, ids2, g2, None, None),
        "embedding_self": (ids1, g1, m1),
        "embedding_dense_dot": (ids1, g1, table, None),
        "embedding_linear_pairwise": (ids1, g1, l2, g2, None, None),
        "norm_grad": (u1, a1, m1),
    }


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["tokens", "features"])
def test_offsets_past_2_31(huge_storage, layout, monkeypatch):
    monkeypatch.setenv("GEFX_TRITON_AUTOTUNE", "0")
    gen = torch.Generator().manual_seed(31)
    for op, args in _huge_cases(huge_storage, layout, gen).items():
        spans = [max((n - 1) * abs(s) for n, s in zip(a.shape, a.stride()))
                 for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        assert max(spans) > 2 ** 31, op
        out = K.OPS[op](*args)
        compact = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        want = K.OPS[op](*compact)  # same kernel, small contiguous copies
        ref = reference.OPS[op](*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                   for a in args))
        torch.testing.assert_close(out, want, rtol=0, atol=0, msg=f"{op} ({layout}): huge strides changed the result")
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3 * max(1.0, float(ref.abs().max())),
                                   msg=f"{op} ({layout}) vs float64 reference")
