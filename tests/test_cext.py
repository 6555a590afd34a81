"""The compiled C++ extension gefx._C (backend "cext") against the float64 torch reference.

Runs in CI: `make test` builds the extension, and a missing or failed build FAILS these tests with
the recorded reason. They are skipped only when GEFX_BUILD_EXT=0 says the build was turned off.
Tolerance: |cext - ref64| <= 2 |torch_same_dtype - ref64| + rtol * (the op on |inputs|), the
last term bounding the sum of absolute terms of each entry.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import gefx
from gefx import _cext, backends
from gefx import reference as R

pytestmark = pytest.mark.ext

if os.environ.get("GEFX_BUILD_EXT", "").strip() == "0":
    pytest.skip("gefx._C build turned off (GEFX_BUILD_EXT=0)", allow_module_level=True)

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}
ALGOS = {"auto": 0, "ghost": 1, "tile": 2}


@pytest.fixture(autouse=True)
def _built():
    if _cext.UNAVAILABLE:
        pytest.fail(f"gefx._C is not usable here: {_cext.UNAVAILABLE}")


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x under another memory layout (never contiguous except 'contig')."""
    if layout == "contig" or x.dim() != 3:
        return x
    b, t, d = x.shape
    if layout == "bt_swapped":  # token-major storage: unit feature stride, sb != T * st
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":  # feature stride 2 and token-major
        y = torch.zeros(t, b, 2 * d, dtype=x.dtype).permute(1, 0, 2)[:, :, ::2]
        y.copy_(x)
        return y
    raise ValueError(layout)


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _mask(b, t, gen, kind):
    if kind == "none":
        return None
    m = torch.rand(b, t, generator=gen) > 0.35
    if b > 1:
        m[1] = False  # a fully masked row
    if b and t:
        m[0, 0] = True
    return m.t().contiguous().t()  # non-contiguous bool mask


def _check(out, ref_fn, args, abs_args, dtype, what):
    """out (the extension) against ref_fn on float64 copies, with the 2x-error rule."""
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref64 = ref_fn(*up)
    same = ref_fn(*args)
    scale = ref_fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in abs_args]).abs()
    want_dtype = torch.float64 if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64
                                      for a in args) else torch.float32
    assert out.dtype == want_dtype, f"{what}: dtype {out.dtype}, expected {want_dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    err = (out.double() - ref64).abs()
    tol = 2 * (same.double() - ref64).abs() + RTOL[dtype] * scale + 1e-30
    bad = err > tol
    assert not bad.any(), (f"{what}: max err {err.max():.3e} where tol {tol[bad].min():.3e}; "
                           f"ref {ref64.flatten()[:4].tolist()} got {out.flatten()[:4].tolist()}")


# (B1, T1, B2, T2, Da, Dg): odd sizes, T = 1, features 33, an empty batch, and T above one Gram tile
# (tiles of 32 and 64-512 token rows), so that tiles split samples and self-norm strips are partial.
SHAPES = [(3, 7, 2, 33, 33, 5), (2, 1, 3, 1, 8, 33), (1, 33, 2, 7, 33, 33), (0, 5, 2, 5, 4, 3),
          (2, 300, 1, 270, 17, 9)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _abs(xs):
    return [x.abs() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contig", "bt_swapped", "strided"])
@pytest.mark.parametrize("masks", ["none", "masked"])
def test_ghost_ops(threads, shape, dtype, layout, masks):
    B1, T1, B2, T2, Da, Dg = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout, masks)).encode()))
    a1, g1 = _rand((B1, T1, Da), dtype, gen), _rand((B1, T1, Dg), dtype, gen)
    a2, g2 = _rand((B2, T2, Da), dtype, gen), _rand((B2, T2, Dg), dtype, gen)
    m1, m2 = _mask(B1, T1, gen, masks), _mask(B2, T2, gen, masks)
    m = _rand((Dg, Da), dtype, gen)
    L = [_layout(x, layout) for x in (a1, g1, a2, g2)]
    for name, algo in ALGOS.items():
        out = gefx._C.ghost_pairwise(*L, m1, m2, algo)
        _check(out, R.ghost_pairwise, [a1, g1, a2, g2, m1, m2], _abs([a1, g1, a2, g2, m1, m2]), dtype,
               f"ghost_pairwise[{name}]")
        out = gefx._C.ghost_self(L[2], L[3], m2, algo)
        _check(out, R.ghost_self, [a2, g2, m2], _abs([a2, g2, m2]), dtype, f"ghost_self[{name}]")
        out = gefx._C.ghost_self(L[0], L[1], m1, algo)
        _check(out, R.ghost_self, [a1, g1, m1], _abs([a1, g1, m1]), dtype, f"ghost_self set1[{name}]")
    mm = m if layout == "contig" else m.t().contiguous().t()
    out = gefx._C.dense_dot(L[0], L[1], mm, m1)
    _check(out, R.dense_dot, [a1, g1, m, m1], _abs([a1, g1, m, m1]), dtype, "dense_dot")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contig", "strided"])
@pytest.mark.parametrize("masks", ["none", "masked"])
def test_embedding_and_norm_ops(threads, shape, dtype, layout, masks):
    B1, T1, B2, T2, _, D = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout, masks, "emb")).encode()))
    V = 7  # few ids: many repeats within and across samples
    ids1, ids2 = torch.randint(0, V, (B1, T1), generator=gen), torch.randint(0, V, (B2, T2), generator=gen)
    if layout == "strided":
        ids1 = ids1.t().contiguous().t().to(torch.int32)
    g1, g2 = _rand((B1, T1, D), dtype, gen), _rand((B2, T2, D), dtype, gen)
    u1 = _rand((B1, T1, D), dtype, gen)
    m1, m2 = _mask(B1, T1, gen, masks), _mask(B2, T2, gen, masks)
    table = _rand((V, D), dtype, gen)
    L1, L2, Lu = _layout(g1, layout), _layout(g2, layout), _layout(u1, layout)
    i1, i2 = ids1.long(), ids2.long()
    out = gefx._C.embedding_pairwise(ids1, L1, ids2, L2, m1, m2)
    _check(out, R.embedding_pairwise, [i1, g1, i2, g2, m1, m2], _abs([i1, g1, i2, g2, m1, m2]), dtype,
           "embedding_pairwise")
    out = gefx._C.embedding_self(ids1, L1, m1)
    # |.| bound of a self norm: the pairwise op of |g| with itself, diagonal
    scale_fn = lambda ids, g, mask: torch.diagonal(R.embedding_pairwise(ids, g, ids, g, mask, mask))  # noqa: E731
    ref64 = R.embedding_self(i1, g1.double(), m1)
    same = R.embedding_self(i1, g1, m1)
    tol = 2 * (same.double() - ref64).abs() + RTOL[dtype] * scale_fn(i1, g1.double().abs(), m1) + 1e-30
    assert out.shape == ref64.shape and ((out.double() - ref64).abs() <= tol).all(), "embedding_self"
    out = gefx._C.embedding_dense_dot(ids1, L1, table, m1)
    _check(out, R.embedding_dense_dot, [i1, g1, table, m1], _abs([i1, g1, table, m1]), dtype,
           "embedding_dense_dot")
    out = gefx._C.norm_grad(Lu, L1, m1)
    _check(out, R.norm_grad, [u1, g1, m1], _abs([u1, g1, m1]), dtype, "norm_grad")


# Tiling edge cases (tile sizes are chosen from the shapes, csrc/cpu/dense.cpp and ghost.cpp):
#   dense_dot  (B, T, Da, Dg), both kernels: blas R x O product tiles with remainders in rows and out
#              features, out-block groups for few rows, the largest 256-row tiles; micro: own panels
#              (panel groups x 512-row blocks; Dg > 1024 in chunks with carried accumulators: 1030 in
#              auto, 2100 forced) and a shared panel (B T = 450 in auto, the small shapes forced),
#              6-row tiles padded at the end, 64-feature panels cut short (Da = 3, 9, 40, 70, 200,
#              260), rows gathered past masked tokens;
#   ghost      (B1, T1, B2, T2, Da, Dg, algo): long Gram tiles split inside samples and grouping whole
#              samples, 32-row short tiles split / grouped (grown to 64 and 256 rows on the last two
#              shapes' larger Grams), self-norm strips and column chunks with
#              remainders, tile-algorithm blocks of 128 and 256 with partial blocks;
#   ghost micro (B1, T1, B2, T2, Da, Dg): 6 x 4 micro-tiles padded at the ends of both sets, feature
#              tails (not a multiple of 16), features in chunks (1030: 2 x 528/502, 2100: 3 x 704),
#              several set-2 blocks and set-1 row blocks with samples spanning them, D = 1;
#   ghost amx  (B1, T1, B2, T2, Da, Dg): 32-row blocks padded at the ends of both sets, feature tails
#              (not a multiple of 32) and D < 32, Da != Dg, features in chunks with a short last one
#              (1024 x 1024 tokens: 256 x 128 blocks, chunks of 128: 300 = 128 + 128 + 44) and several
#              32-row stages and 32-column sub-blocks per block, 128 x 64 blocks in chunks of 32 (512 x
#              512 tokens, auto's choice there), samples spanning blocks, D = 1.
DENSE_TILING = [(3, 700, 40, 300), (2, 37, 200, 300), (2, 1100, 260, 260), (1, 5, 3, 1), (2, 64, 70, 600),
                (3, 150, 70, 90), (2, 600, 40, 1030), (1, 50, 9, 2100), (2, 256, 520, 1024)]
GHOST_TILING = [(3, 400, 2, 70, 24, 40, 1), (5, 100, 7, 16, 8, 12, 1), (2, 600, 1, 9, 16, 20, 0),
                (1, 512, 1, 512, 200, 200, 2), (1, 1024, 1, 1024, 300, 300, 2),
                (2, 500, 1, 600, 8, 12, 1), (1, 1030, 1, 4100, 4, 3, 1)]
GHOST_MICRO = [(3, 7, 2, 33, 33, 5), (2, 150, 3, 110, 40, 24), (1, 50, 2, 30, 1030, 600),
               (2, 64, 1, 61, 2100, 17), (1, 5, 1, 3, 1, 1)]
GHOST_AMX = [(3, 7, 2, 33, 33, 5), (2, 150, 3, 110, 40, 24), (4, 256, 2, 512, 300, 77),
             (4, 128, 4, 128, 520, 1030), (1, 5, 1, 3, 1, 1)]
MICRO = bool(_cext._C is not None and _cext._C.build_info().get("micro_avx512"))
AMX = bool(_cext._C is not None and _cext._C.build_info().get("amx"))
# (kernel, dtype, layout): blas on every dtype and layout; micro and amx where they apply (float32 with
# unit feature stride, any sample/token strides).
DENSE_KERNELS = ([(1, dt, lay) for dt in DTYPES for lay in ("contig", "strided")]
                 + [(k, torch.float32, lay) for k in (2, 3) for lay in ("contig", "bt_swapped")])


def _need_micro(kernel):
    if kernel == 2 and not MICRO:
        pytest.skip("this CPU (or build) has no AVX-512 micro kernels")
    if kernel == 3 and not AMX:
        pytest.skip("this CPU (or OS, or build) has no AMX bf16 tiles")


def _dense_auto(shape):
    """dense_dot's automatic kernel for float32 inputs of this (unmasked) shape (dense.cpp)."""
    B, T, Da, Dg = shape
    if AMX and min(Da, Dg) >= 512 and B * T * Da * Dg >= 2**28:
        return 3
    return 2 if MICRO and B * T >= 384 and Dg != 2100 else 1


@pytest.mark.parametrize("shape", DENSE_TILING, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel,dtype,layout", DENSE_KERNELS,
                         ids=lambda v: {1: "blas", 2: "micro", 3: "amx"}.get(v, str(v)))
@pytest.mark.parametrize("masks", ["none", "masked"])
def test_dense_dot_tiling(threads, shape, kernel, dtype, layout, masks):
    _need_micro(kernel)
    B, T, Da, Dg = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout, masks, "dd")).encode()))
    a, g = _rand((B, T, Da), dtype, gen), _rand((B, T, Dg), dtype, gen)
    m = _rand((Dg, Da), dtype, gen)
    mask = _mask(B, T, gen, masks)
    mm = m if layout == "contig" else m.t().contiguous().t()
    out = gefx._C.dense_dot(_layout(a, layout), _layout(g, layout), mm, mask, kernel)
    _check(out, R.dense_dot, [a, g, m, mask], _abs([a, g, m, mask]), dtype, f"dense_dot[kernel {kernel}]")
    if kernel > 1 and kernel == _dense_auto(shape):
        assert torch.equal(out, gefx._C.dense_dot(_layout(a, layout), _layout(g, layout), mm, mask))


@pytest.mark.parametrize("kernel", [2, 3], ids=["micro", "amx"])
def test_dense_dot_fast_kernels_refuse_what_they_cannot_run(kernel):
    gen = torch.Generator().manual_seed(5)
    a, g, m = _rand((2, 3, 4), torch.float32, gen), _rand((2, 3, 5), torch.float32, gen), _rand((5, 4), torch.float32, gen)
    if kernel == 3 and not AMX:
        with pytest.raises(RuntimeError, match="amx kernel needs .* AMX bf16 tiles"):
            gefx._C.dense_dot(a, g, m, None, 3)
        return
    _need_micro(kernel)
    name = {2: "micro", 3: "amx"}[kernel]
    for bad in (dict(a=a.bfloat16()), dict(g=g.double()), dict(a=_layout(a, "strided"))):
        args = {"a": a, "g": g, "m": m, **bad}
        with pytest.raises(RuntimeError, match=f"{name} kernel needs float32 a and g with unit feature stride"):
            gefx._C.dense_dot(args["a"], args["g"], args["m"], None, kernel)
        gefx._C.dense_dot(args["a"], args["g"], args["m"], None, 0)  # auto falls back to blas tiles
    with pytest.raises(RuntimeError, match="kernel must be 0"):
        gefx._C.dense_dot(a, g, m, None, 4)


@pytest.mark.parametrize("shape", GHOST_TILING, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("masks", ["none", "masked"])
def test_ghost_tiling(threads, shape, dtype, masks):
    B1, T1, B2, T2, Da, Dg, algo = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, masks, "gt")).encode()))
    a1, g1 = _rand((B1, T1, Da), dtype, gen), _rand((B1, T1, Dg), dtype, gen)
    a2, g2 = _rand((B2, T2, Da), dtype, gen), _rand((B2, T2, Dg), dtype, gen)
    m1, m2 = _mask(B1, T1, gen, masks), _mask(B2, T2, gen, masks)
    out = gefx._C.ghost_pairwise(a1, g1, a2, g2, m1, m2, algo)
    _check(out, R.ghost_pairwise, [a1, g1, a2, g2, m1, m2], _abs([a1, g1, a2, g2, m1, m2]), dtype,
           f"ghost_pairwise[algo {algo}]")
    out = gefx._C.ghost_self(a1, g1, m1, algo)
    _check(out, R.ghost_self, [a1, g1, m1], _abs([a1, g1, m1]), dtype, f"ghost_self[algo {algo}]")


def _auto_picks(kernel, shape, masks):
    """Whether ghost_pairwise's auto choice (ghost.cpp) is this kernel for these unmasked shapes."""
    B1, T1, B2, T2, Da, Dg = shape
    cells = B1 * T1 * B2 * T2
    if kernel == 2:
        return min(Da, Dg) >= 512 and min(B1 * T1, B2 * T2) >= 48 and cells <= 256 * 256 and cells * (Da + Dg) <= 2**28
    return shape == (4, 128, 4, 128, 520, 1030) and masks == "none"  # 128 x 64 blocks (amx_pays)


@pytest.mark.parametrize("kernel,shape", [(2, s) for s in GHOST_MICRO] + [(3, s) for s in GHOST_AMX],
                         ids=lambda v: {2: "micro", 3: "amx"}[v] if isinstance(v, int) else "x".join(map(str, v)))
@pytest.mark.parametrize("layout", ["contig", "bt_swapped"])
@pytest.mark.parametrize("masks", ["none", "masked"])
def test_ghost_pairwise_kernels(threads, kernel, shape, layout, masks):
    _need_micro(kernel)
    if kernel == 3 and not AMX:
        pytest.skip("this CPU (or OS, or build) has no AMX bf16 tiles")
    B1, T1, B2, T2, Da, Dg = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, masks, kernel, "gk")).encode()))
    a1, g1 = _rand((B1, T1, Da), torch.float32, gen), _rand((B1, T1, Dg), torch.float32, gen)
    a2, g2 = _rand((B2, T2, Da), torch.float32, gen), _rand((B2, T2, Dg), torch.float32, gen)
    m1, m2 = _mask(B1, T1, gen, masks), _mask(B2, T2, gen, masks)
    L = [_layout(x, layout) for x in (a1, g1, a2, g2)]
    out = gefx._C.ghost_pairwise(*L, m1, m2, 1, kernel)
    _check(out, R.ghost_pairwise, [a1, g1, a2, g2, m1, m2], _abs([a1, g1, a2, g2, m1, m2]), torch.float32,
           f"ghost_pairwise[kernel {kernel}]")
    if _auto_picks(kernel, shape, masks):
        assert torch.equal(out, gefx._C.ghost_pairwise(*L, m1, m2))


def test_ghost_pairwise_micro_refuses_what_it_cannot_read():
    _need_micro(2)
    gen = torch.Generator().manual_seed(6)
    a, g = _rand((2, 3, 4), torch.float32, gen), _rand((2, 3, 5), torch.float32, gen)
    for bad in (dict(a1=a.bfloat16()), dict(g2=g.double()), dict(a2=_layout(a, "strided"))):
        args = {"a1": a, "g1": g, "a2": a, "g2": g, **bad}
        with pytest.raises(RuntimeError, match="micro kernel needs the ghost algorithm and float32"):
            gefx._C.ghost_pairwise(*args.values(), None, None, 0, 2)
        gefx._C.ghost_pairwise(*args.values(), None, None, 0, 0)  # auto falls back to blas tiles
    with pytest.raises(RuntimeError, match="algo 2 asks for the tile algorithm"):
        gefx._C.ghost_pairwise(a, g, a, g, None, None, 2, 2)
    with pytest.raises(RuntimeError, match="kernel must be 0"):
        gefx._C.ghost_pairwise(a, g, a, g, None, None, 0, 4)


def test_ghost_pairwise_amx_is_as_accurate_as_float32_gemm():
    """Six bf16 products per pair of features: the float32 BLAS kernel's error, not bf16's (~1e-3)."""
    if not AMX:
        pytest.skip("this CPU (or OS, or build) has no AMX bf16 tiles")
    gen = torch.Generator().manual_seed(8)
    x = [_rand((3, 64, 1000), torch.float32, gen) + 0.5 for _ in range(4)]  # offsets: no cancellation
    ref = R.ghost_pairwise(*[t.double() for t in x])
    err = {k: ((gefx._C.ghost_pairwise(*x, None, None, 1, k).double() - ref).abs() / ref.abs()).max().item()
           for k in (1, 3)}
    assert err[3] <= 3 * err[1] + 1e-7, err


def test_ghost_pairwise_amx_refuses_what_it_cannot_run():
    gen = torch.Generator().manual_seed(7)
    a, g = _rand((2, 3, 4), torch.float32, gen), _rand((2, 3, 5), torch.float32, gen)
    if not AMX:
        with pytest.raises(RuntimeError, match="amx kernel needs .* AMX bf16 tiles"):
            gefx._C.ghost_pairwise(a, g, a, g, None, None, 1, 3)
        return
    for bad in (dict(a1=a.bfloat16()), dict(g2=g.double()), dict(a2=_layout(a, "strided"))):
        args = {"a1": a, "g1": g, "a2": a, "g2": g, **bad}
        with pytest.raises(RuntimeError, match=r"amx kernel needs the ghost algorithm and float32 .*\(the inputs are not\)"):
            gefx._C.ghost_pairwise(*args.values(), None, None, 0, 3)
    with pytest.raises(RuntimeError, match="algo 2 asks for the tile algorithm"):
        gefx._C.ghost_pairwise(a, g, a, g, None, None, 2, 3)


def test_results_do_not_depend_on_the_thread_count():
    """Tile sizes and summation orders depend on the shapes only: 1 and 2 threads agree bit for bit."""
    gen = torch.Generator().manual_seed(11)
    a, g = _rand((3, 700, 40), torch.float32, gen), _rand((3, 700, 300), torch.float32, gen)
    m = _rand((300, 40), torch.float32, gen)
    a2, g2 = _rand((2, 70, 40), torch.float32, gen), _rand((2, 70, 300), torch.float32, gen)
    mask = _mask(3, 700, gen, "masked")
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append([gefx._C.dense_dot(a, g, m, mask), gefx._C.dense_dot(a, g, m, None),
                         gefx._C.dense_dot(a, g, m, mask, 1), gefx._C.dense_dot(a[:, :150], g[:, :150], m)]
                        + ([gefx._C.dense_dot(a, g, m, mask, 3)] if AMX else [])
                        + [gefx._C.ghost_pairwise(a, g, a2, g2, mask, None, algo) for algo in (1, 2)]
                        + ([gefx._C.ghost_pairwise(a, g, a2, g2, mask, None, 1, 2)] if MICRO else [])
                        + ([gefx._C.ghost_pairwise(a, g, a2, g2, mask, None, 1, 3),
                            gefx._C.ghost_pairwise(a2, g2, a, g, None, mask, 1, 3)] if AMX else [])
                        + [gefx._C.ghost_self(a, g, mask, algo) for algo in (1, 2)])
    finally:
        torch.set_num_threads(old)
    for x, y in zip(*outs):
        assert torch.equal(x, y), (x - y).abs().max()


def test_mixed_dtypes_and_fp16():
    gen = torch.Generator().manual_seed(3)
    a = _rand((2, 9, 6), torch.float16, gen)
    g = _rand((2, 9, 5), torch.bfloat16, gen)
    a2 = _rand((3, 4, 6), torch.float32, gen)
    g2 = _rand((3, 4, 5), torch.float64, gen)
    out = gefx._C.ghost_pairwise(a, g, a2, g2, None, None, 0)
    assert out.dtype == torch.float64
    ref = R.ghost_pairwise(a.double(), g.double(), a2.double(), g2)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_empty_and_degenerate_sizes():
    z = gefx._C.ghost_pairwise(torch.zeros(2, 0, 3), torch.zeros(2, 0, 4), torch.randn(1, 5, 3),
                               torch.randn(1, 5, 4), None, None, 0)
    assert z.shape == (2, 1) and not z.any()
    assert gefx._C.ghost_self(torch.zeros(0, 4, 3), torch.zeros(0, 4, 2), None, 0).shape == (0,)
    assert gefx._C.dense_dot(torch.zeros(0, 4, 3), torch.zeros(0, 4, 2), torch.zeros(2, 3), None).shape == (0,)
    assert gefx._C.embedding_self(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, 2), None).shape == (0,)
    assert gefx._C.norm_grad(torch.zeros(0, 3, 2), torch.zeros(0, 3, 2), None).shape == (0, 2)


def test_cpp_checks_have_clear_messages():
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match=r"a1 must be \[B, T, D\]"):
        gefx._C.ghost_pairwise(a[0], g, a, g, None, None, 0)
    with pytest.raises(RuntimeError, match="feature sizes differ"):
        gefx._C.ghost_pairwise(a, g, torch.randn(2, 3, 7), g, None, None, 0)
    with pytest.raises(RuntimeError, match="disagree on"):
        gefx._C.ghost_self(a, torch.randn(2, 4, 5), None, 0)
    with pytest.raises(RuntimeError, match="must be bool"):
        gefx._C.ghost_self(a, g, torch.ones(2, 3), 0)
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        gefx._C.ghost_self(a.long(), g, None, 0)
    with pytest.raises(RuntimeError, match=r"m must be \[out, in\]"):
        gefx._C.dense_dot(a, g, torch.randn(4, 5), None)
    with pytest.raises(RuntimeError, match="out of range"):
        gefx._C.embedding_dense_dot(torch.full((2, 3), 9), g, torch.randn(4, 5), None)
    with pytest.raises(RuntimeError, match="algo must be"):
        gefx._C.ghost_self(a, g, None, 7)


def test_unsupported_inputs_fall_back():
    meta = torch.empty(2, 3, 4, device="meta")
    assert _cext.ghost_self(meta, meta) is NotImplemented
    ints = torch.ones(2, 3, 4, dtype=torch.int32)
    assert _cext.norm_grad(ints, ints) is NotImplemented


class _Spy:
    """Counts the calls that reach the compiled module."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def wrapped(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return wrapped


@pytest.mark.parametrize("forced", ["cext", ""])
def test_public_ops_route_to_the_extension(monkeypatch, forced):
    """GEFX_BACKEND=cext (and the automatic choice on CPU tensors) runs gefx.ops on gefx._C."""
    monkeypatch.setenv("GEFX_BACKEND", forced)
    spy = _Spy(_cext._C)
    monkeypatch.setattr(_cext, "_C", spy)
    assert backends.status()["cext"] == "available"
    assert backends.choose(torch.device("cpu")) == "cext"
    gen = torch.Generator().manual_seed(5)
    a, g, a2, g2 = (_rand(s, torch.float32, gen) for s in [(2, 5, 6), (2, 5, 3), (3, 4, 6), (3, 4, 3)])
    ids, ids2 = torch.randint(0, 4, (2, 5), generator=gen), torch.randint(0, 4, (3, 4), generator=gen)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    got = {
        "ghost_pairwise": gefx.ops.pairwise(a, g, a2, g2, mask),
        "ghost_self": gefx.ops.self_norms(a, g, mask),
        "dense_dot": gefx.ops.dense_dot(a, g, torch.randn(3, 6), mask),
        "embedding_pairwise": gefx.ops.embedding_pairwise(ids, g, ids2, g2, mask),
        "embedding_self": gefx.ops.embedding_self_norms(ids, g, mask),
        "embedding_dense_dot": gefx.ops.embedding_dense_dot(ids, g, torch.randn(4, 3), mask),
        "norm_grad": gefx.ops.norm_grad(g, g, mask),
    }
    assert sorted(spy.calls) == sorted(got), spy.calls
    ref = R.ghost_pairwise(a.double(), g.double(), a2.double(), g2.double(), mask)
    assert torch.allclose(got["ghost_pairwise"].double(), ref, rtol=1e-5, atol=1e-5)


def test_algo_env(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    a, g = _rand((2, 40, 8), torch.float64, gen), _rand((2, 40, 3), torch.float64, gen)
    ref = R.ghost_self(a, g)
    for name in ("ghost", "tile", "auto"):
        monkeypatch.setenv("GEFX_CEXT_ALGO", name)
        assert torch.allclose(_cext.ghost_self(a, g), ref, rtol=1e-12)
    monkeypatch.setenv("GEFX_CEXT_ALGO", "fast")
    with pytest.raises(ValueError, match="GEFX_CEXT_ALGO"):
        _cext.ghost_self(a, g)


def test_env_reports_the_extension(capsys):
    from gefx.cli import main
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "cext    available" in out
    assert _cext.build_report() is None or "built" in _cext.build_report()
    assert f"micro_avx512={MICRO}" in out and f"amx={AMX}" in out and "direct_blas=" in out and "openmp=" in out


def _tiny_llama(dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval()


def _g_effect(model, seed=0):
    from gefx.losses import sequence_nll
    g = torch.Generator().manual_seed(seed)
    fi = torch.randint(1, 37, (3, 9), generator=g)
    ri = torch.randint(1, 37, (2, 7), generator=g)
    fm = torch.ones_like(fi)
    fm[2, 6:] = 0
    fl = fi.masked_fill(fm == 0, -100)
    fl[:, :2] = -100
    rl = ri.clone()
    rl[:, :3] = -100
    with gefx.trace(model) as tape:
        f = sequence_nll(model(input_ids=fi, attention_mask=fm).logits, fl)
        r = sequence_nll(model(input_ids=ri).logits, rl)
        eff = gefx.g_effect(tape, -f * torch.tensor([0.5, 1.0, 2.0], dtype=f.dtype), {"forget": f, "retain": r},
                            groups="param", objective_instances=True)
    return eff


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("form", ["ghost", "dense"])
def test_g_effect_cext_equals_torch_backend(monkeypatch, dtype, form):
    """g_effect on a tiny LlamaForCausalLM: the extension backend equals the torch backend."""
    model = _tiny_llama(dtype)
    monkeypatch.setenv("GEFX_DOT_FORM", form)
    spy = _Spy(_cext._C)
    monkeypatch.setattr(_cext, "_C", spy)
    monkeypatch.setenv("GEFX_BACKEND", "torch")
    ref = _g_effect(model)
    assert not spy.calls
    monkeypatch.setenv("GEFX_BACKEND", "cext")
    got = _g_effect(model)
    assert spy.calls, "g_effect never reached gefx._C"
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    for name in ref:
        a, b = got[name], ref[name]
        assert a.groups == b.groups
        scale = b.per_instance_group.abs().max().clamp(min=1e-30)
        assert torch.allclose(a.per_instance_group, b.per_instance_group, rtol=rtol, atol=rtol * scale), name
        assert torch.allclose(a.per_objective_instance_group, b.per_objective_instance_group, rtol=rtol,
                              atol=rtol * b.per_objective_instance_group.abs().max()), name


def test_missing_extension_never_breaks_import_gefx():
    """With gefx._C unimportable, `import gefx` works, ops fall back, and `gefx env` says why."""
    import subprocess
    import sys
    code = r'''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "gefx._C":
            raise ImportError("simulated: no compiled extension")
sys.meta_path.insert(0, Block())
import torch, gefx
from gefx import backends
from gefx.cli import main
print("AUTO", backends.choose(torch.device("cpu")))
print("VAL", float(gefx.ops.self_norms(torch.ones(1, 2, 3), torch.ones(1, 2, 2))[0]))
main(["env"])
'''
    env = {k: v for k, v in os.environ.items() if k != "GEFX_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "AUTO torch" in res.stdout and "VAL 24.0" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("cext"))
    assert "simulated: no compiled extension" in line, line
