"""Symmetric block products: the blocks of P Pᵀ, each unordered pair of row groups once.

The single-set retrieval metrics (X Xᵀ) and the neighbour correction (the class-distance
matrices D_m and D_cv) read symmetric matrices: block (g, h) is the transpose of block (h, g),
so a block computed once serves the rows of both groups, half the multiply-adds of the full
product (docs/architecture.md, "Memory").

Every group is gathered into a buffer of one fixed number of rows (``side`` rounded up to a
multiple of ``ROWS_MULTIPLE``; zero padding that is never read), so every block is the same
``[rows, F] x [F, rows]`` product: one kernel, one rounding, so equal inputs give equal entries
wherever they sit and on either side of a block (the exact tie rules of both users rely on it).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

ROWS_MULTIPLE = 16
"""Padded blocks have a multiple of 16 rows: below that, MKL's small-matrix kernels were seen to
round an entry differently by its position in the block (tests/test_blocks.py)."""


def padded(side: int) -> int:
    """``side`` rounded up to a multiple of ``ROWS_MULTIPLE``: the rows of a padded block."""
    return -(-max(side, 1) // ROWS_MULTIPLE) * ROWS_MULTIPLE


def even_side(n: int, side: int, slack: int = 0) -> int:
    """Group size for ``n`` rows in blocks of about ``side``: as many groups as ``side`` needs,
    evened out so that the last one is not nearly empty, plus ``slack`` rows, padded."""
    groups = -(-n // max(side, 1))
    return padded(-(-n // max(groups, 1)) + slack)


def block_pairs(num_groups: int, num_row_groups: int | None = None) -> Iterator[tuple[int, int]]:
    """Unordered pairs ``(g, h)``, ``g <= h``, that touch one of the first ``num_row_groups``
    groups (default all): g from the last of those to the first, each with itself first and then
    every later group. So when ``(g, h)`` comes, the diagonal pair ``(h, h)`` of every row group
    h > g has come already."""
    rows = num_groups if num_row_groups is None else num_row_groups
    for g in reversed(range(rows)):
        for h in range(g, num_groups):
            yield g, h


class PaddedProduct:
    """``P[a] P[b]ᵀ`` for index sets of at most ``side`` rows, always computed as one
    ``[side, F] x [F, side]`` product of zero-padded gathers (module docstring).

    Args:
        points: ``[N, F]`` float tensor P.
        side: >= the size of every index set passed; the gathers have ``side`` rows rounded up to
            a multiple of ``ROWS_MULTIPLE``.

    Memory: two ``[rows, F]`` gathers and one ``[rows, rows]`` result, reused.
    """

    def __init__(self, points: torch.Tensor, side: int) -> None:
        rows = padded(side)
        self.points = points
        self.left = points.new_zeros((rows, points.shape[1]))
        self.right = torch.zeros_like(self.left)
        self.out = points.new_empty((rows, rows))
        self._left_rows = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[len(a), len(b)]`` view of the result (valid until the next call); ``a [n_a]``,
        ``b [n_b]`` int64 row indices, ``n_a, n_b <= side``. ``a`` is gathered again only when it
        is another tensor than last time."""
        if a is not self._left_rows:  # a group against the later groups: gathered once
            _gather(self.points, a, self.left)
            self._left_rows = a
        _gather(self.points, b, self.right)
        torch.mm(self.left, self.right.T, out=self.out)
        return self.out[: len(a), : len(b)]


def _gather(points: torch.Tensor, rows: torch.Tensor, buffer: torch.Tensor) -> None:
    torch.index_select(points, 0, rows, out=buffer[: len(rows)])
    buffer[len(rows):] = 0


def entries(block: torch.Tensor, bound: torch.Tensor, above: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) int64 indices of the entries of ``block [n, w]`` >= ``bound`` (``above``) or
    <= it; ``bound`` broadcasts (``[n, 1]`` or ``[1, w]``). On CPU through numpy, whose compare
    and flat nonzero are several times faster than torch's there."""
    if block.device.type == "cpu":
        compare = np.greater_equal if above else np.less_equal
        flat = np.flatnonzero(compare(block.numpy(), bound.numpy()))
        row, column = np.divmod(flat, block.shape[1])
        return torch.from_numpy(row), torch.from_numpy(column)
    return torch.nonzero(block >= bound if above else block <= bound, as_tuple=True)


def float_order(values: torch.Tensor) -> torch.Tensor:
    """int64 of the same order as the float32 ``values``, in [-2**31, 2**31): the bit pattern as
    a signed int32, negative floats with their magnitude bits flipped (-0.0 first made +0.0).
    ``float_order(v) * 2**32 + i`` (0 <= i < 2**32) sorts by value, then by i: the exact tie
    rules' one-key sorts."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
