"""Full-covariance IAA at Stanford Online Products scale: class covariances in low-rank form.

Dense full covariances need C·D² floats: 11,318 × 512 × 512 × 4 B ≈ 12 GB for SOP, and one
Cholesky per class. Here a class covariance is kept exactly as a sum of rank-one terms,

    Σ_k = Σ_{r ∈ rows(k)} ω_r² v_r v_rᵀ,

where the rows v_r are the class's centred embeddings of each refresh (ω² = w / n_new)
plus one row per refresh for the spread of the running mean (v = μ_old − μ_new,
ω² = w(1 − w)); older rows are rescaled by √(1 − w) at every refresh. This is the
parallel-variance fold of docs/method.md §3 term by term:

    Σ ← (1 − w) Σ + w Σ_new + w (1 − w)(μ − μ_new)(μ − μ_new)ᵀ,  Σ_new = (1/n) Σ_i x̃_i x̃_iᵀ.

The neighbour-corrected covariance of Eq. 16 (docs/method.md §4),

    Σ'_k = (1 − α_k) Σ_k + α_k (1 − γ) Σ_j (w_kj / W_k) Σ_j + α_k γ Σ_global,

is again a sum of rank-one terms (the rows of k and of its K neighbours, with coefficients)
plus the dense global part, so a draw L ε with L Lᵀ = Σ'_k is taken as a sum of independent
Gaussians (exact in distribution, no per-class Cholesky):

    √(1 − α_k) Σ_{r∈k} ω_r η_r v_r + Σ_j √(α_k (1 − γ) w_kj / W_k) Σ_{r∈j} ω_r η_r v_r + √(α_k γ) G ε,

with G the Cholesky factor of Σ_global + δI. :meth:`LowRankStatistics.corrected` returns
this as a :class:`fastiaa.kernels.LowRankFactor`, which ``fastiaa.kernels.synthesize``
samples in one launch.

Memory: the rows take 4·R·D bytes (R = N + C per kept refresh, N the train images), the factor's
entry lists 12 bytes per entry ((K + 1) · rows per class · C entries), and :meth:`corrected`
briefly a weighted copy of the rows, the symmetric C × C matrix of covariance inner products and
work blocks within the budget of ``fastiaa.memory`` (bench/RESULTS.md has the SOP figures).

Momentum fold with ``max_history = H``: only the rows of the latest H refreshes that
contained a class are kept. The rows dropped carry the weight Π (1 − w) ≤ momentum^H of
the older covariance (w is clamped at ≥ 1 − momentum, 0.2^4 = 0.16 % with the defaults), so
the kept Σ_k is the exact fold minus that positive semi-definite remainder;
``max_history=None`` keeps everything (exact, memory grows by one block per refresh).

Covariance distance: D_cv(i, j)² = ‖Σ_i‖² + ‖Σ_j‖² − 2⟨Σ_i, Σ_j⟩ (Frobenius), with
⟨Σ_i, Σ_j⟩ = Σ_{a∈i, b∈j} (ω_a ω_b v_a·v_b)²: one R × R × D Gram product (half of it, by
symmetry), squared and summed per class pair, instead of the dense C² D² product.
"""
from __future__ import annotations

import torch

from fastiaa import distributed, kernels, memory
from fastiaa.distributed import World
from fastiaa.kernels import LowRankFactor

from ._neighbors import GramDistances, check_options, correction_strength, neighbor_weights
from .statistics import DenseStatistics, cholesky_factor


class LowRankStatistics:
    """Running class means and full covariances, the covariances in low-rank form (module doc).
    A :class:`fastiaa.iaa.ClassStatistics`.

    Args:
        num_classes: C. dim: D.
        momentum: as :class:`DenseStatistics` (fold weight w >= 1 − momentum).
        max_history: refreshes of rows kept per class (None: all, exact; see the module doc).
        device: where everything lives.

    Attributes:
        diagonal_statistics: a diagonal :class:`DenseStatistics` holding ``mean`` [C, D], ``count``
            [C] (n_seen), ``class_size`` [C] (n_k of the latest refresh) and the diagonal of Σ.
        rows: [R, D] float32 centred embeddings / mean shifts, sorted by class.
        row_class: [R] int64; row_weight: [R] float32 ω_r; row_age: [R] int64 refreshes of
            its class since the row was added; row_ptr: [C + 1] int64 offsets of each class.
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.2, max_history: int | None = 4,
                 device: torch.device | str | None = None) -> None:
        if max_history is not None and max_history < 1:
            raise ValueError(f"max_history must be >= 1 or None (keep all), got {max_history}")
        self.diagonal_statistics = DenseStatistics(num_classes, dim, "diag", momentum, device)
        self.max_history = max_history
        device = self.diagonal_statistics.device
        self.rows = torch.zeros(0, dim, device=device)
        self.row_class = torch.zeros(0, dtype=torch.int64, device=device)
        self.row_weight = torch.zeros(0, device=device)
        self.row_age = torch.zeros(0, dtype=torch.int64, device=device)
        self.row_ptr = torch.zeros(num_classes + 1, dtype=torch.int64, device=device)

    @property
    def num_classes(self) -> int:
        return self.diagonal_statistics.num_classes

    @property
    def dim(self) -> int:
        return self.diagonal_statistics.dim

    @property
    def mean(self) -> torch.Tensor:
        return self.diagonal_statistics.mean

    @property
    def count(self) -> torch.Tensor:
        return self.diagonal_statistics.count

    @property
    def class_size(self) -> torch.Tensor:
        return self.diagonal_statistics.class_size

    def memory_bytes(self) -> int:
        """Bytes held by the rows and their bookkeeping (not the diagonal statistics)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.rows, self.row_class, self.row_weight, self.row_age, self.row_ptr))

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, world: World | None = None,
               backend: str = "auto") -> None:
        """Fold one refresh (docs/method.md §3): this process's ``embeddings`` [N, D] (any float
        dtype) with ``labels`` [N]. The rows are the embeddings themselves, so every rank gathers
        those of all ranks first (in rank order: the same rows on every rank).

        Raises:
            ValueError: as :meth:`DenseStatistics.update` (shapes, label range, NaN / Inf).
        """
        if embeddings.dim() == 2 and embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {embeddings.shape[1]}, the statistics {self.dim}")
        device = self.rows.device
        embeddings, labels = embeddings.to(device), labels.to(device)
        if world is not None:
            embeddings = distributed.all_gather_varsize(embeddings, world)
            labels = distributed.all_gather_varsize(labels, world)
        count, mean_new, m2 = kernels.class_moments(embeddings, labels, self.num_classes, False, backend)
        labels = labels.long()
        stats = self.diagonal_statistics
        n_new = count.double()
        present = count > 0
        w = (n_new / (n_new + stats.count.double()).clamp_min(1.0)).clamp_min(1.0 - stats.momentum)
        w = torch.where(present, w, torch.ones_like(w))
        shift = stats.mean - mean_new  # μ_old − μ_new, before the fold
        stats.fold(count, mean_new, m2)

        old_scale = torch.where(present, (1.0 - w).sqrt(), torch.ones_like(w)).float()
        weight = torch.cat([
            self.row_weight * old_scale[self.row_class],
            (w / n_new.clamp_min(1.0)).sqrt().float()[labels],
            (w * (1.0 - w)).sqrt().float(),
        ])
        age = torch.cat([self.row_age + present[self.row_class].long(),
                         torch.zeros(labels.numel() + self.num_classes, dtype=torch.int64, device=device)])
        rows = torch.cat([self.rows, embeddings.float() - mean_new[labels], shift.float()])
        row_class = torch.cat([self.row_class, labels, torch.arange(self.num_classes, device=device)])
        keep = weight > 0
        if self.max_history is not None:
            keep &= age < self.max_history
        keep = torch.nonzero(keep).squeeze(1)
        order = keep[torch.argsort(row_class[keep], stable=True)]
        self.rows, self.row_class = rows[order], row_class[order]
        self.row_weight, self.row_age = weight[order], age[order]
        self.row_ptr = torch.cat([self.row_ptr[:1],
                                  torch.bincount(self.row_class, minlength=self.num_classes).cumsum(0)])

    def factor(self, correction: dict | None) -> LowRankFactor:
        """The sampling factor: :meth:`corrected` with the ``correction`` options, or (None) each
        class's own rows and no global part (Σ_k uncorrected)."""
        if correction is not None:
            return self.corrected(**correction)
        device = self.rows.device
        counts = self.row_ptr[1:] - self.row_ptr[:-1]
        return LowRankFactor(self.rows, self.row_ptr, torch.arange(self.rows.shape[0], device=device),
                             self.row_weight, torch.zeros(self.dim, self.dim, device=device),
                             torch.zeros(self.num_classes, device=device), int(counts.max()) if counts.numel() else 0)

    def covariance(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Dense Σ_k [k, D, D] float32 for ``classes`` (default all). Small problems only."""
        return self.factor(None).covariance(classes)

    def diagonal(self) -> torch.Tensor:
        """diag Σ_k [C, D] float32 from the rows (equals the diagonal statistics when nothing was dropped)."""
        scaled = self.rows * self.row_weight[:, None]
        return torch.zeros(self.num_classes, self.dim, device=self.rows.device).index_add_(
            0, self.row_class, scaled * scaled)

    def covariance_inner_products(self) -> torch.Tensor:
        """⟨Σ_i, Σ_j⟩ (Frobenius) for all class pairs: [C, C] float32, symmetric.

        Blocks of whole classes against the rows of the classes from the block on (upper
        triangle): (U_I U_{≥I}ᵀ)² summed per class pair, mirrored. Memory: [C, C] plus blocks
        within the working-memory budget.
        """
        num_classes = self.num_classes
        scaled = self.rows * self.row_weight[:, None]
        inner = torch.zeros(num_classes, num_classes, device=scaled.device)
        total = scaled.shape[0]
        lo = 0
        while lo < num_classes:
            r0 = int(self.row_ptr[lo])
            budget = max(1, memory.block_elements(parts=4) // max(1, total - r0))
            hi = int(torch.searchsorted(self.row_ptr, self.row_ptr[lo] + budget, right=True)) - 1
            hi = min(max(hi, lo + 1), num_classes)
            r1 = int(self.row_ptr[hi])
            if r1 > r0:
                gram = (scaled[r0:r1] @ scaled[r0:].T).square_()                         # [rI, R − r0]
                per_col = torch.zeros(r1 - r0, num_classes - lo, device=scaled.device).index_add_(
                    1, self.row_class[r0:] - lo, gram)
                block = torch.zeros(hi - lo, num_classes - lo, device=scaled.device).index_add_(
                    0, self.row_class[r0:r1] - lo, per_col)
                inner[lo:hi, lo:] = block
                inner[lo:, lo:hi] = block.T
            lo = hi
        return inner

    def corrected(self, num_neighbors: int = 25, beta: float = 0.1, gamma: float = 0.1, tau: float = 40,
                  sigma_m: float = 1.0, sigma_cv: float = 1.0, jitter: float = 1e-6) -> LowRankFactor:
        """Neighbour-corrected covariances (Eq. 9-16) as a sampling factor.

        Same rule and conventions as :func:`fastiaa.iaa.neighbor_correction` (paper behaviour,
        Frobenius covariance distance; the official-code switches are not offered here), with
        n_k = :attr:`class_size`. The global part is factored once (:func:`cholesky_factor` of
        Σ_global; its jitter δ, absolute, adds α_k γ δ I to Σ'_k).

        Returns:
            :class:`fastiaa.kernels.LowRankFactor` with LLᵀ = Σ'_k (+ α_k γ δ I).
        """
        check_options(num_neighbors, sigma_m, sigma_cv)
        device = self.rows.device
        num_classes = self.num_classes
        sizes = self.class_size
        n = sizes.float()
        candidate = sizes > 1
        alpha = correction_strength(sizes, beta, tau)

        # Σ_global = Σ_j n_j Σ_j / Σ n_j over the candidates, from the rows in one product.
        class_weight = torch.where(candidate, n, torch.zeros_like(n))
        total = class_weight.sum()
        scaled = self.rows * (self.row_weight * (class_weight / total.clamp_min(1.0)).sqrt()[self.row_class])[:, None]
        global_factor = cholesky_factor((scaled.T @ scaled)[None], jitter=jitter)[0][0]

        k = min(int(num_neighbors), int(candidate.sum()))
        index = torch.zeros((num_classes, k), dtype=torch.int64, device=device)
        weight = torch.zeros((num_classes, k), device=device)
        rows = torch.nonzero(alpha > 0).squeeze(1)  # only classes with α > 0 take neighbours
        if k and rows.numel():
            index[rows], weight[rows] = neighbor_weights(
                GramDistances(self.mean * self.mean),
                _InnerProductDistances(self.covariance_inner_products()),
                n, candidate, rows, k, sigma_m, sigma_cv,
            )
        w_sum = weight.sum(1)
        has_nb = w_sum > 0
        nb_coef = (alpha[:, None] * (1 - gamma) * weight / w_sum.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).sqrt()
        global_coef = torch.where(has_nb, alpha * gamma, alpha).sqrt()

        # Entries of class k: its own rows (√(1 − α_k)), then each neighbour's rows.
        source = torch.cat([torch.arange(num_classes, device=device)[:, None], index], 1)    # [C, k + 1]
        coef = torch.cat([(1.0 - alpha).sqrt()[:, None], nb_coef], 1)
        row_count = self.row_ptr[1:] - self.row_ptr[:-1]
        length = torch.where(coef > 0, row_count[source], torch.zeros_like(source))        # rows per (k, source)
        flat_len = length.flatten()
        pair = torch.repeat_interleave(torch.arange(flat_len.numel(), device=device), flat_len)
        pair_start = torch.cumsum(flat_len, 0) - flat_len
        position = torch.arange(pair.numel(), device=device) - pair_start[pair]
        entry_row = self.row_ptr[source.flatten()[pair]] + position
        entry_coef = coef.flatten()[pair] * self.row_weight[entry_row]
        per_class = length.sum(1)
        entry_ptr = torch.cat([per_class.new_zeros(1), per_class.cumsum(0)])
        return LowRankFactor(self.rows, entry_ptr, entry_row, entry_coef.float(), global_factor,
                             global_coef.float(), int(per_class.max()) if num_classes else 0)

    def state_dict(self) -> dict:
        """Tensors and settings for a checkpoint."""
        return {"stats": self.diagonal_statistics.state_dict(), "max_history": self.max_history,
                "rows": self.rows.clone(), "row_class": self.row_class.clone(), "row_weight": self.row_weight.clone(),
                "row_age": self.row_age.clone(), "row_ptr": self.row_ptr.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (tensors moved to this object's device).

        Raises:
            ValueError: the checkpoint has another number of classes or embedding size.
        """
        self.diagonal_statistics.load_state_dict(state["stats"])
        self.max_history = state["max_history"]
        device = self.diagonal_statistics.device
        for name in ("rows", "row_class", "row_weight", "row_age", "row_ptr"):
            setattr(self, name, state[name].to(device).clone())


class _InnerProductDistances:
    """D_cv in Gram form (see ``fastiaa.iaa._neighbors``) from the Frobenius inner products
    ``inner [C, C]`` = ⟨Σ_i, Σ_j⟩: D²(i, j) = ‖Σ_i‖² + ‖Σ_j‖² − 2⟨Σ_i, Σ_j⟩."""

    row_elements = 0  # its blocks are read, not computed

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner
        self.norms = inner.diagonal()

    def products(self, side: int):
        """``(a, b) -> inner[a][:, b]``."""
        return lambda a, b: self.inner[a[:, None], b[None, :]]
