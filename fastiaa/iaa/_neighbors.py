"""The neighbour rule of the correction (Eq. 9-15 of the paper, docs/method.md §4), shared by the
dense path (:func:`fastiaa.iaa.neighbor_correction`) and the low-rank one
(:meth:`fastiaa.iaa.LowRankStatistics.corrected`).

The two differ only in how the covariance distance D_cv is computed, so :func:`neighbor_weights`
takes both distances as *distance blocks*: callables ``block(rows [R]) -> (h [R, Cc], x [R, 1])``
with D²(rows[i], candidate j) = h[i, j] + x[i] over the Cc candidate classes (in class order);
``block(rows, columns)`` gives the same for other columns. Keeping the per-row constant x apart
saves a pass over every ``[R, Cc]`` block: it changes neither the order nor the extremes of a
row, and only the few values used are completed. :class:`GramDistances` computes such blocks
from one point per class (``||y||² − 2 x·y``); ``fastiaa.iaa.lowrank`` from precomputed inner
products.

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
    """Distance blocks between classes given one point per class, in Gram form.

    Args:
        points: ``[C, F]`` float32, e.g. the element-wise squared means (D_m) or the flattened
            covariances (D_cv, Frobenius).
        candidate: ``[C]`` bool, the default columns of a block.

    ``self(rows)`` returns ``h [R, Cc] = ||y_j||² − 2 x_i·y_j`` and ``x [R, 1] = ||x_i||²``
    (D² = h + x, may dip below 0 by round-off). The points are centred first: distances are
    translation invariant and centring shrinks the cancellation of the Gram form.

    Memory: a centred copy of ``points``, plus its candidate rows when some class is not a
    candidate.
    """

    def __init__(self, points: torch.Tensor, candidate: torch.Tensor) -> None:
        self.points = points - points.mean(0)
        self.norms = (self.points * self.points).sum(1)
        self.row_elements = points.shape[1]
        if bool(candidate.all()):  # e.g. SOP: no gathered copy needed
            self._columns, self._column_norms = self.points, self.norms
        else:
            cols = torch.nonzero(candidate).squeeze(1)
            self._columns, self._column_norms = self.points[cols], self.norms[cols]

    def __call__(self, rows: torch.Tensor, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, x)`` of the classes ``rows [R]`` against the candidates, or against ``columns [O]``."""
        if columns is None:
            y, y_sq = self._columns, self._column_norms
        else:
            y, y_sq = self.points[columns], self.norms[columns]
        return torch.addmm(y_sq.unsqueeze(0), self.points[rows], y.T, alpha=-2.0), self.norms[rows].unsqueeze(1)


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
        mean_distance, cov_distance: distance blocks of D_m and D_cv (module doc), built for
            the same ``candidate`` mask; each has ``row_elements``, the elements it gathers per
            row of a block (bounds the block height).
        n: ``[C]`` float class sizes n_k.
        candidate: ``[C]`` bool, classes with n_j > 1.
        rows: ``[R]`` int64 classes to process.
        k: neighbours per class, 0 <= k <= number of candidates.
        sigma_m, sigma_cv: σ_m, σ_cv > 0.
        sentinel_normalization: the official row (docs/method.md §4, (c)): d_m normalised by a
            maximum of (largest D_m to a non-candidate) + 1e12 and a minimum of 0, d_cv over all
            classes with a minimum of 0. The neighbour choice is unchanged.

    Returns:
        ``index [R, k]`` int64 classes and ``weight [R, k]`` float32 (0 where a row has fewer
        than k candidates).
    """
    num_rows = rows.numel()
    index = torch.zeros((num_rows, k), dtype=torch.int64, device=n.device)
    weight = torch.zeros((num_rows, k), dtype=torch.float32, device=n.device)
    if k == 0 or num_rows == 0:
        return index, weight
    cols = torch.nonzero(candidate).squeeze(1)
    column_of = torch.full_like(candidate, -1, dtype=torch.int64)
    column_of[cols] = torch.arange(cols.numel(), device=cols.device)
    others = torch.nonzero(~candidate).squeeze(1)
    widest = max(mean_distance.row_elements, cov_distance.row_elements)
    step = max(1, min(memory.block_elements(parts=16) // cols.numel(), memory.block_elements(parts=4) // widest))
    for lo in range(0, num_rows, step):
        r = rows[lo:lo + step]
        h_m, x_m = mean_distance(r)
        h_cv, x_cv = cov_distance(r)
        own = column_of[r]
        at = (torch.nonzero(own >= 0).squeeze(1), own[own >= 0])  # (block row, own column)
        twin = (at[0], (at[1] + 1) % cols.numel())  # another candidate: a copy leaves min / max alone
        h_m[at] = h_m[twin]
        h_cv[at] = h_cv[twin]
        hi_m = h_m.amax(1, keepdim=True)
        lo_cv, hi_cv = torch.aminmax(h_cv, dim=1, keepdim=True)
        h_m[at] = math.inf
        near, idx = nearest_candidates(h_m, k)
        near, hi_m = _root(near + x_m), _root(hi_m + x_m)
        lo_cv, hi_cv = _root(lo_cv + x_cv), _root(hi_cv + x_cv)
        lo_m = near[:, :1]
        if sentinel_normalization:
            # The official row: d_m + 1e12 at itself (d_m 0) and at non-candidates; d_cv 0 at itself.
            far_m = torch.zeros_like(hi_m)
            if others.numel():
                far_m = _farthest(mean_distance, r, others)
                hi_cv = torch.maximum(hi_cv, _farthest(cov_distance, r, others))
            hi_m = far_m + SENTINEL
            lo_cv = torch.zeros_like(lo_cv)
        valid = torch.isfinite(near)
        dm = _min_max(near, lo_m, hi_m)
        dcv = _min_max(_root(h_cv.gather(1, idx) + x_cv), lo_cv, hi_cv)
        logit = -dm.square() / (2 * sigma_m**2) - dcv.square() / (2 * sigma_cv**2)
        neighbors = cols[idx]
        weight[lo:lo + step] = torch.where(valid, n[neighbors] * torch.exp(logit), torch.zeros_like(logit))
        index[lo:lo + step] = neighbors
    return index, weight


def _farthest(distance, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Largest distance ``[R, 1]`` from each of ``rows`` to ``columns``."""
    h, x = distance(rows, columns)
    return _root(h.amax(1, keepdim=True) + x)


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
