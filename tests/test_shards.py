"""The shard-wise products of gefx.pieces (what gefx.shards runs per rank under FSDP2 / ZeRO-3)
against the whole-tensor ones, on flat ranges that start and end inside rows, span blocks and
miss pieces."""
import pytest
import torch

from gefx.pieces import Factored, PerSample, contract, contract_range, dense, dense_range


def pieces(kind: str, g: torch.Generator):
    B, T = 3, 5
    if kind == "linear":  # parameter [7, 4]: left [B, T, 7] (output gradients), right [B, T, 4]
        mask = torch.rand(B, T, generator=g) > 0.3
        return [Factored(torch.randn(B, T, 7, generator=g, dtype=torch.float64),
                         torch.randn(B, T, 4, generator=g, dtype=torch.float64), mask)], (7, 4)
    if kind == "embedding":  # table [11, 4] indexed by ids, padding masked
        ids = torch.randint(0, 11, (B, T), generator=g)
        return [Factored(ids, torch.randn(B, T, 4, generator=g, dtype=torch.float64), ids != 3)], (11, 4)
    if kind == "experts":  # stacked [3, 5, 4]: pieces of experts 0 and 2 only
        return [Factored(torch.randn(B, T, 5, generator=g, dtype=torch.float64),
                         torch.randn(B, T, 4, generator=g, dtype=torch.float64), None, e) for e in (0, 2)], (3, 5, 4)
    return [PerSample(torch.randn(B, 6, generator=g, dtype=torch.float64))], (6,)  # a norm weight


@pytest.mark.parametrize("kind", ["linear", "embedding", "experts", "per_sample"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranges_add_up_to_the_whole(kind, world):
    g = torch.Generator().manual_seed(world)
    P, shape = pieces(kind, g)
    numel = torch.Size(shape).numel()
    whole = dense(P, shape).flatten()
    m = torch.randn(numel, generator=g, dtype=torch.float64)
    want = contract(P, m.view(shape))
    part = -(-numel // world)  # ZeRO-3's equal flat partitions (the last one short)
    ranges = [(min(k * part, numel), min((k + 1) * part, numel)) for k in range(world)]
    got = sum(contract_range(P, m[s:e], shape, s, e) for s, e in ranges)
    torch.testing.assert_close(torch.cat([dense_range(P, shape, s, e) for s, e in ranges]), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_range_missing_every_piece_gives_zeros():
    g = torch.Generator().manual_seed(0)
    P, shape = pieces("experts", g)
    s, e = 20, 40  # inside expert 1, which has no piece
    assert torch.equal(dense_range(P, shape, s, e), torch.zeros(e - s, dtype=torch.float64))
    assert torch.equal(contract_range(P, torch.ones(e - s, dtype=torch.float64), shape, s, e),
                       torch.zeros(3, dtype=torch.float64))


def test_row_blocks_cover_the_range(monkeypatch):
    """Ranges cut into row blocks (tiny blocks here: 1-2 rows) give the same products."""
    import gefx.pieces as pieces_mod

    real = pieces_mod._blocks
    monkeypatch.setattr(pieces_mod, "_blocks", lambda shape, s, e: real(shape, s, e, elements=7))
    test_ranges_add_up_to_the_whole("linear", 3)
    test_ranges_add_up_to_the_whole("embedding", 2)
    test_ranges_add_up_to_the_whole("experts", 5)
    blocks = list(real((7, 4), 3, 25, elements=8))
    assert blocks[0][0] == 3 and blocks[-1][1] == 25 and all(b[1] == c[0] for b, c in zip(blocks, blocks[1:]))
    assert all(e % 8 == 0 for _, e in blocks[:-1])  # cut at row boundaries (rows of 4, blocks of 2 rows)
