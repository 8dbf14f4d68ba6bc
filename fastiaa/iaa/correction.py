"""Neighbour correction of the class covariances (spec IAA.md §4, paper Eq. 9-16).

All classes at once: the two class-by-class distance matrices come from Gram-matrix
products, one block of rows at a time (never a full ``[C, C]`` matrix), the K nearest
candidates per row from a batched ``topk``, and the weighted neighbour sums from a batched
gather. Cost at Stanford Online Products scale (C = 11,318, D = 512, diagonal): two
``C x C x D`` products (about 130 GFLOP each) plus a few passes over ``[rows, C]`` blocks.
For full covariances the covariance distance is the Frobenius norm, whose Gram product
costs ``C^2 D^2`` operations (about 3e16 at SOP scale: a GPU job, hours on a CPU), and the
working memory is about three times the ``[C, D, D]`` covariance (a centred copy and the
output; a fourth when some classes are not candidates). Only classes with α_k > 0 are
processed: with every class at n_k >= τ (CUB, Cars) the call returns a copy at once.

Conventions (documented choices where the spec leaves room)
-----------------------------------------------------------
* Candidates of class k: every class j != k with n_j > 1. K is clipped to the number of
  candidates; among equal mean distances the lower class index wins.
* d_m and d_cv are min-max normalised over the candidates of row k (spec §4, Eq. 13 as
  intended); a row whose candidates all lie at the same distance normalises to 0.
* A class without any candidate uses Σ_global as its neighbour covariance; Σ_global is 0
  when no class has more than one sample.
* α_k = 1 / (1 + ln(1 + β(n_k - 1))) for 1 <= n_k < τ, else 0 (classes never seen, n_k = 0,
  keep their covariance).
"""
from __future__ import annotations

import math

import torch

SENTINEL = 1e12  # the official code's exclusion distance (spec §4 quirk (c))

# Upper bound on the elements of one [rows, C] block / one gathered neighbour block.
_BLOCK_ELEMENTS = 1 << 22
_GATHER_ELEMENTS = 1 << 24


def neighbor_correction(
    mean: torch.Tensor,
    covariance: torch.Tensor,
    counts: torch.Tensor,
    num_neighbors: int = 25,
    beta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 40,
    sigma_m: float = 1.0,
    sigma_cv: float = 1.0,
    official_zero_mean_singletons: bool = False,
    official_sentinel_normalization: bool = False,
) -> torch.Tensor:
    """Neighbour-corrected class covariances (spec §4, Eq. 9-16).

    D_m(i, j) = ||μ_i² - μ_j²||₂ (element-wise squares), D_cv(i, j) = ||Σ_i - Σ_j||₂
    (Frobenius for full matrices); N_k = the K candidates nearest to k by D_m;
    w_i = n_i exp(-d_m²/(2σ_m²) - d_cv²/(2σ_cv²)) with min-max normalised d_m, d_cv;
    Σ_nb = Σ w_i Σ_i / Σ w_i; Σ_global = Σ n_j Σ_j / Σ n_j over classes with n_j > 1;
    corrected Σ_k = (1 - α_k) Σ_k + α_k [(1 - γ) Σ_nb + γ Σ_global].

    Args:
        mean: ``[C, D]`` class means.
        covariance: ``[C, D]`` (diagonal) or ``[C, D, D]`` (full) class covariances.
        counts: ``[C]`` integer class sizes n_k (samples of the class in the train set).
        num_neighbors: K (official 25).
        beta, gamma, tau: β (0.1), γ (0.1), τ (40) of spec §4.
        sigma_m, sigma_cv: σ_m, σ_cv (1.0).
        official_zero_mean_singletons: treat single-sample classes as the official code
            does (its large-dataset path never updates them): mean and covariance 0, so
            they pick neighbours by distance from a zero mean (spec §4 quirk (b)).
        official_sentinel_normalization: min-max normalise each row over all C classes as
            the official code does: the mean-distance row holds the 1e12 sentinel for the
            class itself and single-sample classes (so normalised d_m ≈ 0), the covariance
            row includes them too (spec §4 quirk (c)). The neighbour choice is unchanged.

    Returns:
        float32 tensor shaped like ``covariance``.

    Raises:
        ValueError: inconsistent shapes, non-finite statistics, negative K or counts,
            non-positive σ.
    """
    if mean.dim() != 2 or covariance.dim() not in (2, 3) or covariance.shape[:2] != mean.shape:
        raise ValueError(
            f"expected mean [C, D] and covariance [C, D] or [C, D, D], got {list(mean.shape)} and "
            f"{list(covariance.shape)}"
        )
    if covariance.dim() == 3 and covariance.shape[2] != covariance.shape[1]:
        raise ValueError(f"full covariances must be square [C, D, D], got {list(covariance.shape)}")
    num_classes = mean.shape[0]
    if tuple(counts.shape) != (num_classes,):
        raise ValueError(f"counts must be [{num_classes}], got {list(counts.shape)}")
    if num_neighbors < 0 or sigma_m <= 0 or sigma_cv <= 0:
        raise ValueError(f"need num_neighbors >= 0 and sigmas > 0, got {num_neighbors}, {sigma_m}, {sigma_cv}")
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(covariance).all())):
        raise ValueError("class means / covariances contain NaN or Inf values")
    device = mean.device
    counts = counts.to(device, torch.int64)
    if bool((counts < 0).any()):
        raise ValueError("class counts must be non-negative")

    mean = mean.detach().float()
    cov = covariance.detach().to(device, torch.float32).reshape(num_classes, -1)  # [C, F]
    single = counts == 1
    candidate = counts > 1
    if official_zero_mean_singletons:
        mean = mean.masked_fill(single.unsqueeze(1), 0.0)
        cov = cov.masked_fill(single.unsqueeze(1), 0.0)
    n = counts.float()

    weight_global = torch.where(candidate, n, torch.zeros_like(n))
    total = weight_global.sum()
    glob = (weight_global @ cov) / total if total > 0 else torch.zeros_like(cov[0])

    alpha = 1.0 / (1.0 + torch.log1p(beta * (n - 1.0)))
    alpha = torch.where((counts >= 1) & (counts < tau), alpha, torch.zeros_like(alpha))

    rows = torch.nonzero(alpha > 0).squeeze(1)  # only classes with α > 0 change
    k = min(int(num_neighbors), int(candidate.sum()))
    index, weight = _neighbor_weights(
        mean * mean, cov, n, candidate, rows, k, sigma_m, sigma_cv, official_sentinel_normalization
    )

    out = cov.clone()
    step = max(1, _GATHER_ELEMENTS // max(1, k * cov.shape[1]))
    for lo in range(0, rows.numel(), step):
        r = rows[lo:lo + step]
        w = weight[lo:lo + step]
        w_sum = w.sum(1, keepdim=True)
        gathered = cov.index_select(0, index[lo:lo + step].reshape(-1)).view(r.numel(), k, cov.shape[1])
        neighbor = torch.bmm(w.unsqueeze(1), gathered).squeeze(1) / w_sum.clamp_min(torch.finfo(w.dtype).tiny)
        neighbor = torch.where(w_sum > 0, neighbor, glob)
        a = alpha[r].unsqueeze(1)
        out[r] = (1 - a) * cov[r] + a * ((1 - gamma) * neighbor + gamma * glob)
    return out.view(covariance.shape)


def _neighbor_weights(
    mean_sq: torch.Tensor,
    cov: torch.Tensor,
    n: torch.Tensor,
    candidate: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    sigma_m: float,
    sigma_cv: float,
    sentinel_normalization: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour classes ``[R, k]`` int64 and weights ``[R, k]`` float32 (0 for padding) of
    the classes ``rows [R]``.

    The ``[rows, candidates]`` blocks hold squared distances less the row's own squared
    norm (order and extremes per row unchanged); the few values used are completed and
    square-rooted afterwards.
    """
    num_rows = rows.numel()
    index = torch.zeros((num_rows, k), dtype=torch.int64, device=mean_sq.device)
    weight = torch.zeros((num_rows, k), dtype=torch.float32, device=mean_sq.device)
    if k == 0 or num_rows == 0:
        return index, weight
    # Distances are translation invariant: centring shrinks the cancellation of the Gram form.
    a = mean_sq - mean_sq.mean(0)
    b = cov - cov.mean(0)
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    cols = torch.nonzero(candidate).squeeze(1)
    all_columns = cols.numel() == candidate.numel()  # e.g. SOP: no gathered copy needed
    a_c, b_c = (a, b) if all_columns else (a[cols], b[cols])
    a_c_sq, b_c_sq = a_sq[cols], b_sq[cols]
    column_of = torch.full_like(candidate, -1, dtype=torch.int64)
    column_of[cols] = torch.arange(cols.numel(), device=cols.device)
    others = torch.nonzero(~candidate).squeeze(1)
    step = max(1, min(_BLOCK_ELEMENTS // cols.numel(), _GATHER_ELEMENTS // b.shape[1]))
    for lo in range(0, num_rows, step):
        r = rows[lo:lo + step]
        # h = d² - ||x||²: the per-row constant changes neither the order nor the extremes.
        h_m = torch.addmm(a_c_sq.unsqueeze(0), a[r], a_c.T, alpha=-2.0)
        h_cv = torch.addmm(b_c_sq.unsqueeze(0), b[r], b_c.T, alpha=-2.0)
        own = column_of[r]
        at = (torch.nonzero(own >= 0).squeeze(1), own[own >= 0])  # (block row, own column)
        twin = (at[0], (at[1] + 1) % cols.numel())  # another candidate: a copy leaves min / max alone
        h_m[at] = h_m[twin]
        h_cv[at] = h_cv[twin]
        hi_m = h_m.amax(1, keepdim=True)
        lo_cv, hi_cv = torch.aminmax(h_cv, dim=1, keepdim=True)
        h_m[at] = math.inf
        near, idx = nearest_candidates(h_m, k)
        x_m, x_cv = a_sq[r].unsqueeze(1), b_sq[r].unsqueeze(1)
        near, hi_m = _root(near + x_m), _root(hi_m + x_m)
        lo_cv, hi_cv = _root(lo_cv + x_cv), _root(hi_cv + x_cv)
        lo_m = near[:, :1]
        if sentinel_normalization:
            # The official row: d_m + 1e12 at itself (d_m 0) and at non-candidates; d_cv 0 at itself.
            far_m = torch.zeros_like(hi_m)
            if others.numel():
                far_m = _root(_squared_distance(a[r], a[others], a_sq[r], a_sq[others]).amax(1, keepdim=True))
                far_cv = _root(_squared_distance(b[r], b[others], b_sq[r], b_sq[others]).amax(1, keepdim=True))
                hi_cv = torch.maximum(hi_cv, far_cv)
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


def _squared_distance(x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[R, C]`` as ||x||² + ||y||² - 2 x·y (may dip below 0)."""
    return torch.addmm(y_sq.unsqueeze(0), x, y.T, alpha=-2.0).add_(x_sq.unsqueeze(1))


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
