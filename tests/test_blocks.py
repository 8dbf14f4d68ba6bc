"""fastiaa.blocks: the symmetric block products shared by the evaluator and the neighbour correction."""
import numpy as np
import pytest
import torch

from fastiaa.blocks import ROWS_MULTIPLE, PaddedProduct, block_pairs, entries, even_side, float_order, padded


def test_block_pairs_visit_each_unordered_pair_once_diagonal_first():
    pairs = list(block_pairs(5, 3))
    assert len(pairs) == len(set(pairs)) == 3 + 2 + 1 + 3 * 2  # pairs touching one of the first 3 groups
    assert all(g <= h and g < 3 for g, h in pairs)
    for g, h in pairs:  # a row group's diagonal pair comes before every other pair holding it
        assert pairs.index((g, g)) <= pairs.index((g, h))
        if h < 3:
            assert pairs.index((h, h)) <= pairs.index((g, h))
    assert list(block_pairs(2)) == [(1, 1), (0, 0), (0, 1)]


def test_sides():
    assert padded(1) == ROWS_MULTIPLE and padded(16) == 16 and padded(17) == 32
    assert even_side(60502, 2048) == 2032  # 30 groups of 2017 rows, padded: not 29 full and one of 1,110
    assert even_side(100, 2048, slack=11) == 112
    assert -(-60502 // even_side(60502, 2048)) == 30


@pytest.mark.parametrize("dim", [3, 12, 64])
def test_padded_blocks_assemble_the_product_and_round_alike(dim):
    """Groups of 16-40 rows (not dividing N) in 48-row padded blocks: the assembled matrix is
    P Pᵀ, and rows that are exact copies give bitwise equal entries wherever they sit, on either
    side of a block (what the exact tie rules of the evaluator and the correction rely on)."""
    g = torch.Generator().manual_seed(dim)
    n = 301
    points = torch.randn(n, dim, generator=g)
    copies = [(5, 200), (9, 300), (0, 150), (40, 41)]
    for a, b in copies:
        points[b] = points[a]
    order = torch.randperm(n, generator=g)
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + int(torch.randint(16, 41, (1,), generator=g))))
    groups = [order[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:])]
    product = PaddedProduct(points, 40)
    full = torch.full((n, n), torch.nan)
    for i, j in block_pairs(len(groups)):
        block = product(groups[i], groups[j])
        full[groups[j][:, None], groups[i][None, :]] = block.T
        full[groups[i][:, None], groups[j][None, :]] = block
    torch.testing.assert_close(full, points @ points.T, rtol=1e-5, atol=1e-5)
    for a, b in copies:
        assert torch.equal(full[:, a], full[:, b]) and torch.equal(full[a], full[b])


@pytest.mark.parametrize("above", [True, False])
def test_entries_against_a_row_or_a_column_bound(above):
    g = torch.Generator().manual_seed(0)
    block = torch.randn(37, 53, generator=g)[:, 3:50]  # a view, as the padded blocks are
    for bound in (torch.randn(37, 1, generator=g), torch.randn(1, 47, generator=g)):
        i, j = entries(block, bound, above)
        want = torch.nonzero(block >= bound if above else block <= bound, as_tuple=True)
        assert torch.equal(i, want[0]) and torch.equal(j, want[1]) and i.dtype == torch.int64
    assert len(entries(block, torch.full((37, 1), np.inf), above=True)[0]) == 0


def test_float_order_is_the_order_of_the_floats():
    values = torch.tensor([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-45, 0.25, 0.2500001, 7.0, np.inf])
    key = float_order(values)
    assert key.dtype == torch.int64 and bool((key[1:] >= key[:-1]).all()) and key[3] == key[4]
    assert int((key[1:] == key[:-1]).sum()) == 1  # only -0.0 and +0.0 tie
    assert torch.equal((float_order(values[[2, 2, 6]]) * 2**32 + torch.tensor([5, 1, 0])).argsort(), torch.tensor([1, 0, 2]))
