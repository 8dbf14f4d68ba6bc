"""The neighbour rule of the correction (Eq. 9-15 of the paper, docs/method.md §4), shared by the
dense path (:func:`fastiaa.iaa.neighbor_correction`) and the low-rank one
(:meth:`fastiaa.iaa.LowRankStatistics.corrected`).

The two differ only in how the covariance distance D_cv is computed, so :func:`neighbor_weights`
takes both distances in *Gram form*: objects with ``norms [C]`` and ``products(side)``, a callable
``(a [n_a], b [n_b]) -> [n_a, n_b]`` of inner products between the classes ``a`` and ``b``
(``n <= side``), so that D²(i, j) = norms_i + norms_j − 2 ⟨i, j⟩. :class:`GramDistances`
computes them from one point per class; ``fastiaa.iaa.lowrank`` reads precomputed inner products.

D_m and D_cv are symmetric, so :func:`neighbor_weights` computes each block of class pairs once
(``fastiaa.blocks``) and uses it for the rows on both of its sides: per row it keeps the running K
nearest candidates by D_m (with their D_cv) and the running extremes over the candidates. The
per-row constant norms_i is left out until the end: it changes neither the order nor the
extremes of a row.

Conventions (documented choices where the paper leaves room)
-----------------------------------------------------------
* Candidates of class k: every class j != k with n_j > 1. K is clipped to the number of
  candidates by the caller; among equal mean distances the lower class index wins.
* d_m and d_cv are min-max normalised over the candidates of row k (Eq. 13 as intended,
  docs/method.md §4); a row whose candidates all lie at the same distance normalises to 0.
* α_k = 1 / (1 + ln(1 + β(n_k - 1))) for 1 <= n_k < τ, else 0 (classes never seen, n_k = 0,
  keep their covariance).
"""
from __future__ import annotations

import math

import torch

from fastiaa import memory
from fastiaa.blocks import PaddedProduct, block_pairs, entries, even_side, float_order

SENTINEL = 1e12  # the official code's exclusion distance (docs/method.md §4, (c))


def check_options(num_neighbors: int, sigma_m: float, sigma_cv: float) -> None:
    """Raise ValueError unless K >= 0 and σ_m, σ_cv > 0 (Eq. 12-14)."""
    if num_neighbors < 0 or sigma_m <= 0 or sigma_cv <= 0:
        raise ValueError(f"need num_neighbors >= 0 and sigmas > 0, got {num_neighbors}, {sigma_m}, {sigma_cv}")


def correction_strength(counts: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """α_k = 1 / (1 + ln(1 + β(n_k − 1))) where 1 <= n_k < τ, else 0 (Eq. 15).

    Args:
        counts: ``[C]`` integer class sizes n_k.

    Returns:
        ``[C]`` float32.
    """
    n = counts.float()
    alpha = 1.0 / (1.0 + torch.log1p(beta * (n - 1.0)))
    return torch.where((counts >= 1) & (counts < tau), alpha, torch.zeros_like(alpha))


class GramDistances:
    """Distances between classes in Gram form (module doc) from one point per class.

    Args:
        points: ``[C, F]`` float32, e.g. the element-wise squared means (D_m) or the flattened
            covariances (D_cv, Frobenius).

    The points are centred first: distances are translation invariant and centring shrinks the
    cancellation of the Gram form (D² may still dip below 0 by round-off). ``row_elements`` = F,
    the elements per class a block of products gathers.

    Memory: a centred copy of ``points``.
    """

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points - points.mean(0)
        self.norms = (self.points * self.points).sum(1)
        self.row_elements = points.shape[1]

    def products(self, side: int) -> PaddedProduct:
        """Inner products of class blocks of at most ``side`` classes (``fastiaa.blocks``)."""
        return PaddedProduct(self.points, side)


def neighbor_weights(
    mean_distance,
    cov_distance,
    n: torch.Tensor,
    candidate: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    sigma_m: float,
    sigma_cv: float,
    sentinel_normalization: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour classes and weights of the classes ``rows`` (Eq. 11-14).

    N_k = the k candidates nearest to k by D_m (never k itself); w_i = n_i exp(−d_m²/(2σ_m²)
    − d_cv²/(2σ_cv²)) with d_m, d_cv min-max normalised over the candidates of row k.

    Args:
        mean_distance, cov_distance: D_m and D_cv in Gram form (module doc); each has
            ``row_elements``, the elements it gathers per class of a block (bounds the block).
        n: ``[C]`` float class sizes n_k.
        candidate: ``[C]`` bool, classes with n_j > 1.
        rows: ``[R]`` int64 classes to process, ascending.
        k: neighbours per class, 0 <= k <= number of candidates.
        sigma_m, sigma_cv: σ_m, σ_cv > 0.
        sentinel_normalization: the official row (docs/method.md §4, (c)): d_m normalised by a
            maximum of (largest D_m to a non-candidate) + 1e12 and a minimum of 0, d_cv over all
            classes with a minimum of 0. The neighbour choice is unchanged.

    Returns:
        ``index [R, k]`` int64 classes and ``weight [R, k]`` float32 (0 where a row has fewer
        than k candidates).

    Cost: one product per distance for every unordered pair of blocks of classes that holds a
    row (``fastiaa.blocks``), and a few passes over each block from each of its sides.
    """
    index = torch.zeros((rows.numel(), k), dtype=torch.int64, device=n.device)
    weight = torch.zeros((rows.numel(), k), dtype=torch.float32, device=n.device)
    if k == 0 or rows.numel() == 0:
        return index, weight
    widest = max(mean_distance.row_elements, cov_distance.row_elements, 1)
    most = min(memory.block_side(parts=16), memory.block_elements(parts=8) // widest)
    side = even_side(max(rows.numel(), n.numel() - rows.numel()), most)
    nearest = _Nearest(rows, candidate, k, side, sentinel_normalization)
    products_m, products_cv = mean_distance.products(side), cov_distance.products(side)
    scratch_m, scratch_cv = n.new_empty((side, side)), n.new_empty((side, side))
    for g, h in block_pairs(len(nearest.groups), nearest.row_groups):
        a, b = nearest.groups[g], nearest.groups[h]
        inner_m, inner_cv = products_m(a, b), products_cv(a, b)
        nearest.see(g, h, _minus_row_norm(mean_distance.norms[b], inner_m, scratch_m),  # rows of g against h
                    _minus_row_norm(cov_distance.norms[b], inner_cv, scratch_cv), axis=1)
        if g != h and h < nearest.row_groups:  # the same block seen from the rows of h
            nearest.see(h, g, _minus_row_norm(mean_distance.norms[a][:, None], inner_m, scratch_m),
                        _minus_row_norm(cov_distance.norms[a][:, None], inner_cv, scratch_cv), axis=0)

    x_m = mean_distance.norms[nearest.classes[: rows.numel()]].unsqueeze(1)
    x_cv = cov_distance.norms[nearest.classes[: rows.numel()]].unsqueeze(1)
    near, hi_m = _root(nearest.near + x_m), _root(nearest.hi_m + x_m)
    lo_cv, hi_cv = _root(nearest.lo_cv + x_cv), _root(nearest.hi_cv + x_cv)
    lo_m = near[:, :1]
    if sentinel_normalization:
        # The official row: d_m + 1e12 at itself (d_m 0) and at non-candidates; d_cv 0 at itself.
        hi_m = _root(nearest.far_m + x_m) + SENTINEL
        hi_cv = torch.maximum(hi_cv, _root(nearest.far_cv + x_cv))
        lo_cv = torch.zeros_like(lo_cv)
    valid = torch.isfinite(near)
    dm = _min_max(near, lo_m, hi_m)
    dcv = _min_max(_root(nearest.near_cv + x_cv), lo_cv, hi_cv)
    logit = -dm.square() / (2 * sigma_m**2) - dcv.square() / (2 * sigma_cv**2)
    index[nearest.rank] = nearest.index
    weight[nearest.rank] = torch.where(valid, n[nearest.index] * torch.exp(logit), torch.zeros_like(logit))
    return index, weight


class _Nearest:
    """Running K nearest candidates and extremes per row over the blocks seen so far.

    Classes are ordered rows first, then the others; each part candidates first (ascending),
    then non-candidates (ascending), and cut into groups of at most ``side`` that never mix rows
    with others. So every group is a candidate prefix and a non-candidate suffix, each ascending
    by class: within a block, a lower column is a lower class (the tie rule), and the candidate
    columns are a slice.
    """

    def __init__(self, rows: torch.Tensor, candidate: torch.Tensor, k: int, side: int, sentinel: bool) -> None:
        device, num_rows = rows.device, rows.numel()
        is_row = torch.zeros_like(candidate)
        is_row[rows] = True
        rank = torch.arange(num_rows, device=device)
        kept = candidate[rows]
        self.rank = torch.cat([rank[kept], rank[~kept]])  # position in ``rows`` of each row here
        rest = torch.nonzero(~is_row).squeeze(1)
        rest = torch.cat([rest[candidate[rest]], rest[~candidate[rest]]])
        ordered = rows[self.rank]
        self.classes = torch.cat([ordered, rest])
        self.groups = [ordered[lo:lo + side] for lo in range(0, num_rows, side)]
        self.row_groups = len(self.groups)
        self.groups += [rest[lo:lo + side] for lo in range(0, rest.numel(), side)]
        self.first = [g * side for g in range(self.row_groups)]  # row position of each row group
        self.width = [int(candidate[g].sum()) for g in self.groups]  # candidate prefix of each group
        self.k, self.sentinel = k, sentinel

        def full(value, *shape, dtype=torch.float32):
            return torch.full((num_rows, *shape), value, dtype=dtype, device=device)

        self.near, self.near_cv = full(math.inf, k), full(math.inf, k)  # D_m², D_cv² (− the row norm)
        self.index = full(0, k, dtype=torch.int64)
        self.hi_m, self.lo_cv, self.hi_cv = full(-math.inf, 1), full(math.inf, 1), full(-math.inf, 1)
        self.far_m, self.far_cv = full(-math.inf, 1), full(-math.inf, 1)  # over non-candidates (sentinel)

    def see(self, g: int, h: int, h_m: torch.Tensor, h_cv: torch.Tensor, axis: int) -> None:
        """Fold the block of the rows of group ``g`` against the classes of group ``h``:
        ``h_m``, ``h_cv`` = D² − the row's own norm, with the classes of ``h`` along ``axis``
        (1: ``[n_g, n_h]``; 0: ``[n_h, n_g]``, a block seen from its other side)."""
        at = slice(self.first[g], self.first[g] + h_m.shape[1 - axis])
        width = self.width[h]
        if self.sentinel and width < h_m.shape[axis]:  # the row itself is among them when it is one
            rest = h_m.shape[axis] - width
            self.far_m[at] = torch.maximum(self.far_m[at], _reduce(h_m.narrow(axis, width, rest), axis, "max"))
            self.far_cv[at] = torch.maximum(self.far_cv[at], _reduce(h_cv.narrow(axis, width, rest), axis, "max"))
        if width == 0:
            return
        h_m, h_cv = h_m.narrow(axis, 0, width), h_cv.narrow(axis, 0, width)
        if g == h:  # the diagonal block, the rows' first (fastiaa.blocks.block_pairs): their nearest in it
            self._first(at, h, h_m, h_cv)
            return
        self.hi_m[at] = torch.maximum(self.hi_m[at], _reduce(h_m, axis, "max"))
        self.lo_cv[at] = torch.minimum(self.lo_cv[at], _reduce(h_cv, axis, "min"))
        self.hi_cv[at] = torch.maximum(self.hi_cv[at], _reduce(h_cv, axis, "max"))
        # Only what beats the running k-th enters (ties kept for the class rule).
        kth = self.near[at, -1]
        i, j = entries(h_m, kth[:, None] if axis == 1 else kth[None, :], above=False)
        row, column = (i, j) if axis == 1 else (j, i)
        self._merge(at, row, h_m[i, j], self.groups[h][column], h_cv[i, j])

    def _first(self, at: slice, h: int, h_m: torch.Tensor, h_cv: torch.Tensor) -> None:
        """The diagonal block ``[n_g, width]`` (its own scratch): a row is not its own candidate,
        its entry (the diagonal: candidates lead the group) is set aside for every reduction."""
        own_m, own_cv = h_m.diagonal(), h_cv.diagonal()
        own_m.fill_(-math.inf)
        self.hi_m[at] = h_m.amax(1, keepdim=True)
        own_m.fill_(math.inf)
        own_cv.fill_(math.inf)
        self.lo_cv[at] = h_cv.amin(1, keepdim=True)
        own_cv.fill_(-math.inf)
        self.hi_cv[at] = h_cv.amax(1, keepdim=True)
        value, column = nearest_candidates(h_m, min(self.k, h_m.shape[1]))
        taken = slice(0, value.shape[1])
        self.near[at, taken], self.index[at, taken] = value, self.groups[h][column]
        self.near_cv[at, taken] = h_cv.gather(1, column)

    def _merge(self, at: slice, row: torch.Tensor, value: torch.Tensor, cls: torch.Tensor, cv: torch.Tensor) -> None:
        """Merge entries (row of ``at``, D_m value, class, D_cv value) into the running lists:
        per row the k smallest by (value, class), so ties go to the lower class."""
        k = self.k
        touched = torch.nonzero(torch.bincount(row, minlength=at.stop - at.start)).squeeze(1)
        if not len(touched):
            return
        slot = torch.full((at.stop - at.start,), -1, dtype=torch.int64, device=row.device)
        slot[touched] = torch.arange(len(touched), device=row.device)
        lists = at.start + touched
        row = torch.cat([torch.arange(len(touched), device=row.device).repeat_interleave(k), slot[row]])
        value, cls = torch.cat([self.near[lists].flatten(), value]), torch.cat([self.index[lists].flatten(), cls])
        cv = torch.cat([self.near_cv[lists].flatten(), cv])
        order = (float_order(value) * (1 << 32) + cls).argsort()  # by value, then class
        order = order[row[order].argsort(stable=True)]  # by row, then value, then class
        count = torch.bincount(row, minlength=len(touched))
        pick = order[(torch.cumsum(count, 0) - count)[:, None] + torch.arange(k, device=row.device)]
        self.near[lists], self.index[lists], self.near_cv[lists] = value[pick], cls[pick], cv[pick]


def _minus_row_norm(norms: torch.Tensor, inner: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``norms − 2 inner`` in ``scratch``: D² less the norm of the class a row of it belongs to
    (``norms``: those of the classes it is compared with, broadcast along the other axis)."""
    return torch.add(norms, inner, alpha=-2, out=scratch[: inner.shape[0], : inner.shape[1]])


def _reduce(block: torch.Tensor, axis: int, how: str) -> torch.Tensor:
    """Per-row ``"max"`` or ``"min"`` of a block whose classes run along ``axis``: ``[rows, 1]``."""
    return (block.amax(axis) if how == "max" else block.amin(axis)).unsqueeze(1)


def _root(d2: torch.Tensor) -> torch.Tensor:
    return d2.clamp_min(0.0).sqrt()


def _min_max(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x - lo) / (hi - lo), 0 where the range is empty or zero."""
    span = hi - lo
    ok = span > 0
    return torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(x))


def nearest_candidates(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row, ties broken by the lower column; +inf = excluded.

    Args:
        dist: ``[R, C]`` distances (any monotone form), +inf where a column may not be chosen.
        k: 1 <= k <= C.

    Returns:
        ``values [R, k]`` (ascending; +inf where a row has fewer than k candidates) and
        ``index [R, k]`` int64 columns (equal values in column order where they straddle
        the k-th place).
    """
    num_cols = dist.shape[1]
    values, index = dist.topk(min(k + 1, num_cols), dim=1, largest=False)
    if values.shape[1] > k:  # only rows tied across the k-th place need the exact rule
        tied = torch.nonzero((values[:, k - 1] == values[:, k]) & torch.isfinite(values[:, k])).squeeze(1)
        values, index = values[:, :k].clone(), index[:, :k].clone()
        if tied.numel():
            d = dist[tied]
            kth = values[tied, k - 1 :]
            below = d < kth
            level = d == kth
            chosen = below | (level & (level.cumsum(1) <= k - below.sum(1, keepdim=True)))
            columns = torch.arange(num_cols, device=d.device).expand_as(d)
            picked = torch.where(chosen, columns, torch.full_like(columns, num_cols)).topk(k, dim=1, largest=False)
            ordered, order = d.gather(1, picked.values).sort(dim=1, stable=True)
            values[tied] = ordered
            index[tied] = picked.values.gather(1, order)
    return values, index
