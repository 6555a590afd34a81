"""gefx.ops (torch reference backend) against explicitly formed per-sample gradients in float64."""
import pytest
import torch

from gefx import ops

SHAPES = [  # (B1, T1, B2, T2, Da, Dg)
    (3, 7, 2, 5, 4, 6),
    (1, 1, 4, 33, 33, 5),
    (2, 33, 1, 1, 7, 33),
    (0, 4, 3, 4, 5, 6),
    (4, 6, 0, 3, 5, 6),
]


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def mask_for(b, t, seed):
    m = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) > 0.3
    if b > 1:
        m[-1] = False  # a fully masked row
    return m


def formed(a, g, mask=None):
    """Per-sample gradients [B, Dg, Da] formed explicitly (the oracle)."""
    a, g = a.double(), g.double()
    if mask is not None:
        g = g * mask.unsqueeze(-1)
    return torch.einsum("btg,bta->bga", g, a)


def formed_emb(ids, g, vocab, mask=None):
    onehot = torch.nn.functional.one_hot(ids, vocab).double()
    return formed(g, onehot, mask)  # [B, V, D]


@pytest.fixture(params=[64.0, 1e-4], ids=["one-tile", "many-tiles"])
def tiles(request, monkeypatch):
    monkeypatch.setenv("GEFX_TILE_MB", str(request.param))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_linear_ops(shape, masked, tiles):
    b1, t1, b2, t2, da, dg = shape
    a1, g1, a2, g2 = rand(b1, t1, da, seed=1), rand(b1, t1, dg, seed=2), rand(b2, t2, da, seed=3), rand(b2, t2, dg, seed=4)
    m1, m2 = (mask_for(b1, t1, 5), mask_for(b2, t2, 6)) if masked else (None, None)
    G1, G2 = formed(a1, g1, m1), formed(a2, g2, m2)
    torch.testing.assert_close(ops.pairwise(a1, g1, a2, g2, m1, m2), torch.einsum("iga,jga->ij", G1, G2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.self_norms(a1, g1, m1), (G1 * G1).sum((1, 2)), rtol=1e-10, atol=1e-10)
    m = rand(dg, da, seed=7)
    torch.testing.assert_close(ops.dense_dot(a1, g1, m, m1), (G1 * m).sum((1, 2)), rtol=1e-10, atol=1e-10)
    if masked and b1 > 1:
        assert ops.self_norms(a1, g1, m1)[-1] == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_embedding_ops(shape, masked, tiles):
    b1, t1, b2, t2, _, d = shape
    vocab = 9
    gen = torch.Generator().manual_seed(8)
    ids1, ids2 = torch.randint(0, vocab, (b1, t1), generator=gen), torch.randint(0, vocab, (b2, t2), generator=gen)
    g1, g2 = rand(b1, t1, d, seed=9), rand(b2, t2, d, seed=10)
    m1, m2 = (mask_for(b1, t1, 11), mask_for(b2, t2, 12)) if masked else (None, None)
    E1, E2 = formed_emb(ids1, g1, vocab, m1), formed_emb(ids2, g2, vocab, m2)
    torch.testing.assert_close(ops.embedding_pairwise(ids1, g1, ids2, g2, m1, m2), torch.einsum("ivd,jvd->ij", E1, E2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.embedding_self_norms(ids1, g1, m1), (E1 * E1).sum((1, 2)), rtol=1e-10, atol=1e-10)
    m = rand(vocab, d, seed=13)
    torch.testing.assert_close(ops.embedding_dense_dot(ids1, g1, m, m1), (E1 * m).sum((1, 2)), rtol=1e-10, atol=1e-10)


def test_tied_cross_term(tiles):
    """embedding piece (ids, g) against a linear piece whose left factor spans the vocabulary."""
    from gefx.reference import embedding_linear_pairwise

    vocab, d = 7, 5
    ids = torch.randint(0, vocab, (3, 4), generator=torch.Generator().manual_seed(0))
    g, left, right = rand(3, 4, d, seed=1), rand(2, 6, vocab, seed=2), rand(2, 6, d, seed=3)
    mask = mask_for(3, 4, 4)
    E = formed_emb(ids, g, vocab, mask)        # [3, V, D]
    L = formed(right, left)                    # [2, V, D]
    torch.testing.assert_close(embedding_linear_pairwise(ids, g, left, right, mask, None),
                               torch.einsum("ivd,jvd->ij", E, L), rtol=1e-10, atol=1e-10)


def test_norm_grad():
    u, g = rand(3, 5, 4, seed=1), rand(3, 5, 4, seed=2)
    mask = mask_for(3, 5, 3)
    torch.testing.assert_close(ops.norm_grad(u, g, mask), (u * g * mask.unsqueeze(-1)).sum(1))


def test_non_contiguous_and_2d_inputs():
    a = rand(6, 4, 8, seed=1)[:, :, ::2]             # strided features
    g = rand(4, 6, 3, seed=2).transpose(0, 1)        # transposed batch/token
    assert not a.is_contiguous() and not g.is_contiguous()
    G = formed(a, g)
    torch.testing.assert_close(ops.self_norms(a, g), (G * G).sum((1, 2)))
    a2, g2 = rand(5, 3, seed=3), rand(5, 2, seed=4)  # [B, D] = one token per sample
    G2 = formed(a2.unsqueeze(1), g2.unsqueeze(1))
    torch.testing.assert_close(ops.pairwise(a2, g2, a2, g2), torch.einsum("iga,jga->ij", G2, G2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_dtypes_accumulate_in_float32(dtype):
    a1, g1 = rand(3, 9, 17, dtype=dtype, seed=1), rand(3, 9, 11, dtype=dtype, seed=2)
    a2, g2 = rand(2, 5, 17, dtype=dtype, seed=3), rand(2, 5, 11, dtype=dtype, seed=4)
    out = ops.pairwise(a1, g1, a2, g2)
    assert out.dtype == torch.float32
    ref = torch.einsum("iga,jga->ij", formed(a1, g1), formed(a2, g2))  # same rounded inputs, float64
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert ops.self_norms(a1, g1).dtype == torch.float32


def test_validation_errors():
    a, g = rand(2, 3, 4), rand(2, 3, 5)
    with pytest.raises(ValueError, match="disagree on"):
        ops.self_norms(a, rand(2, 4, 5))
    with pytest.raises(ValueError, match="feature sizes differ"):
        ops.pairwise(a, g, rand(2, 3, 6), g)
    with pytest.raises(ValueError, match=r"m must be \[out, in\]"):
        ops.dense_dot(a, g, rand(4, 5))
    with pytest.raises(ValueError, match="mask must be"):
        ops.self_norms(a, g, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        ops.self_norms(a.long(), g)
    with pytest.raises(TypeError, match="token ids"):
        ops.embedding_self_norms(a, g)
    with pytest.raises(ValueError, match="out of range"):
        ops.embedding_dense_dot(torch.tensor([[9]]), rand(1, 1, 5), rand(4, 5))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        ops.self_norms(rand(2, 3, 4, 5), g)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_dot_converts_a_16_bit_m_a_block_of_rows_at_a_time(backend, dtype, monkeypatch):
    """A 16-bit m (a bf16 model's .grad) on the CPU is converted to float32 a block of its rows at a
    time, the products of the blocks summed: no float32 copy of m (twice the parameter) exists."""
    from gefx.memory import LiveBytes
    monkeypatch.setenv("GEFX_BACKEND", backend)
    monkeypatch.setattr(ops, "_CONVERT_BLOCK", 40)  # 5 rows of 8 a block: 40 blocks
    a, g, m = rand(3, 7, 8, dtype=dtype, seed=1), rand(3, 7, 200, dtype=dtype, seed=2), rand(200, 8, dtype=dtype, seed=3)
    mask = mask_for(3, 7, seed=4)
    with LiveBytes(1) as meter:
        out = ops.dense_dot(a, g, m, mask)
    assert out.dtype == torch.float32
    ref = (formed(a, g, mask) * m.double()).sum((1, 2))  # the same rounded inputs, float64
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert meter.peak < m.numel() * 4 / 2, meter.peak  # a float32 copy of m was m.numel() * 4 bytes


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_embedding_dense_dot_reads_only_the_rows_it_needs(backend, monkeypatch):
    """Against a bf16 table's dense gradient, only the looked-up rows are converted (the torch
    reference converted the whole table to float32)."""
    from gefx.memory import LiveBytes
    monkeypatch.setenv("GEFX_BACKEND", backend)
    ids = torch.randint(0, 500, (3, 7), generator=torch.Generator().manual_seed(5))
    g, m = rand(3, 7, 16, dtype=torch.bfloat16, seed=6), rand(500, 16, dtype=torch.bfloat16, seed=7)
    with LiveBytes(1) as meter:
        out = ops.embedding_dense_dot(ids, g, m)
    ref = (formed_emb(ids, g, 500) * m.double()).sum((1, 2))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert meter.peak < m.numel() * 4 / 4, meter.peak
