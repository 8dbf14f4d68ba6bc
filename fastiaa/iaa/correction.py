"""Neighbour correction of the class covariances (Eq. 9-16 of the paper, docs/method.md §4).

All classes at once: the two class-by-class distance matrices come from Gram-matrix
products on symmetric blocks (each unordered pair of class blocks once, never a full ``[C, C]``
matrix), the K nearest candidates per row from batched ``topk`` merged block by block, and the
weighted neighbour sums from one sparse product. Cost: half of two ``C x C x D`` products (when
every class is corrected) plus a few passes over each block. For full covariances the covariance
distance is the Frobenius norm, whose Gram product costs ``C² D² / 2`` operations, and the
working memory is about three times the ``[C, D, D]`` covariance (a centred copy and the
output). Only classes with α_k > 0 are processed: with every class at n_k >= τ (CUB, Cars) the
call returns a copy at once.

The neighbour rule and its conventions (candidates, ties, normalisation, α) are those of
``fastiaa.iaa._neighbors``, which the low-rank path shares.
"""
from __future__ import annotations

import torch

from fastiaa import memory
from fastiaa.kernels import all_finite

from ._neighbors import GramDistances, check_options, correction_strength, neighbor_weights


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
    """Neighbour-corrected class covariances (Eq. 9-16).

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
        beta, gamma, tau: β (0.1), γ (0.1), τ (40) of Eq. 15-16.
        sigma_m, sigma_cv: σ_m, σ_cv (1.0).
        official_zero_mean_singletons: treat single-sample classes as the official code
            does (its large-dataset path never updates them): mean and covariance 0, so
            they pick neighbours by distance from a zero mean (docs/method.md §4, (b)).
        official_sentinel_normalization: min-max normalise each row over all C classes as
            the official code does: the mean-distance row holds the 1e12 sentinel for the
            class itself and single-sample classes (so normalised d_m ≈ 0), the covariance
            row includes them too (docs/method.md §4, (c)). The neighbour choice is unchanged.

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
    check_options(num_neighbors, sigma_m, sigma_cv)
    if not (all_finite(mean) and all_finite(covariance)):
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

    alpha = correction_strength(counts, beta, tau)
    rows = torch.nonzero(alpha > 0).squeeze(1)  # only classes with α > 0 change
    if rows.numel() == 0:
        return cov.clone().view(covariance.shape)
    k = min(int(num_neighbors), int(candidate.sum()))
    index, weight = neighbor_weights(
        GramDistances(mean * mean), GramDistances(cov), n, candidate, rows, k,
        sigma_m, sigma_cv, official_sentinel_normalization,
    )

    out = cov.clone()
    step = max(1, memory.block_elements(parts=4) // max(1, cov.shape[1]))
    for lo in range(0, rows.numel(), step):
        r = rows[lo:lo + step]
        w = weight[lo:lo + step]
        w_sum = w.sum(1, keepdim=True)
        # Σ_i w_i Σ_i of each row as one sparse [rows, C] x [C, F] product (k entries a row)
        at = torch.stack([torch.arange(r.numel(), device=device).repeat_interleave(k), index[lo:lo + step].flatten()])
        sums = torch.sparse.mm(torch.sparse_coo_tensor(at, w.flatten(), (r.numel(), num_classes), check_invariants=False), cov)
        neighbor = torch.where(w_sum > 0, sums / w_sum.clamp_min(torch.finfo(w.dtype).tiny), glob)
        a = alpha[r].unsqueeze(1)
        out[r] = (1 - a) * cov[r] + a * ((1 - gamma) * neighbor + gamma * glob)
    return out.view(covariance.shape)
