"""Per-class statistics of the embeddings and their running estimate (spec IAA.md §3, Eq. 7-8).

``class_moments`` reduces one pass over a set of embeddings to per-class count, mean and
centred second moment; ``ClassStatistics`` folds such moments into running means and
covariances with the parallel-variance rule of the official code.

Conventions
-----------
* The covariance of a class within one update is the *population* covariance (centred
  second moment divided by n, not n - 1), as in the official code; a class with a single
  sample therefore has covariance 0 and the sample as mean (spec §4 (b)).
* Class sums are accumulated in float64, second moments in float32 on centred data, the fold in
  float64, whatever the input dtype (bf16 / fp16 are upcast); results are stored in float32.
* Memory: ``[C, D]`` float32 per diagonal statistic; a full covariance is ``[C, D, D]``
  float32, i.e. 12 GB for Stanford Online Products (C = 11,318, D = 512). The work
  buffers of this module are bounded (chunks of at most ``_CHUNK_ELEMENTS`` elements).
"""
from __future__ import annotations

import torch

from fastiaa import kernels

from .correction import neighbor_correction

# Upper bound on the elements of one temporary buffer (chunks of samples or classes).
_CHUNK_ELEMENTS = 1 << 23

_KINDS = ("diag", "full")


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf (one reduction pass, NaN propagates through min/max)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor.detach().reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str = "embeddings",
    values: bool = True,
) -> None:
    """Validate an ``[N, D]`` floating embedding matrix and its ``[N]`` integer labels.

    Args:
        values: also check the label range and that every embedding is finite. These checks
            read the tensors (a device synchronisation on a GPU); False keeps to shapes,
            dtypes and devices.

    Raises:
        ValueError: wrong rank, non-floating embeddings, non-integer labels, length mismatch,
            a label outside ``[0, num_classes)``, or a NaN / Inf embedding (a non-finite
            value must never reach the class statistics: check the model and the learning
            rate, or enable AMP's GradScaler).
    """
    if embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(f"{what} must be a floating [N, D] tensor, got {tuple(embeddings.shape)} {embeddings.dtype}")
    if labels.dim() != 1 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer [N] tensor, got {tuple(labels.shape)} {labels.dtype}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{what} has {embeddings.shape[0]} rows but labels has {labels.shape[0]} entries")
    if labels.device != embeddings.device:
        raise ValueError(f"labels are on {labels.device} but {what} on {embeddings.device}; move them to one device")
    if not values:
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (the train class indices), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    if not all_finite(embeddings):
        raise ValueError(
            f"{what} contain NaN or Inf values; refusing to use them "
            "(check the model output, the learning rate, or enable AMP's GradScaler)"
        )


def class_moments(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, full: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class count, mean and centred second moment of ``embeddings`` (spec §3, Eq. 7-8).

    Two passes: class sums in float64 give the means (rounded to float32), then the
    float32 deviations d from them give m2 = Σ d dᵀ - (Σ d)(Σ d)ᵀ / n (the corrected
    two-pass form: no E[z²] - E[z]² cancellation, and the rounding of the mean cancels).
    Deterministic on the CPU (``index_add_``, ``bmm``; on CUDA, ``index_add_`` is
    deterministic only under ``torch.use_deterministic_algorithms``). CUDA tensors go to
    the Triton kernel of ``fastiaa.kernels`` when its backend selects it.

    Args:
        embeddings: ``[N, D]`` floating (any precision; upcast), finite.
        labels: ``[N]`` integer class indices in ``[0, num_classes)``, any order.
        num_classes: C.
        full: False for the diagonal second moment ``[C, D]``, True for ``[C, D, D]``.

    Returns:
        ``count [C] int64``, ``mean [C, D] float32`` (0 for absent classes) and
        ``m2 [C, D] | [C, D, D] float32`` = sum over the class of (z - mean)(z - mean)^T
        (its diagonal when ``full`` is False).

    Memory: the full case writes ``[C, D, D]`` float32 (12 GB at C = 11,318, D = 512) and
    works through classes in chunks sorted by class size, so padding stays small.

    Raises:
        ValueError: see :func:`check_embeddings`.
    """
    check_embeddings(embeddings, labels, num_classes)
    if kernels.use_triton(embeddings):
        return kernels.class_moments(embeddings, labels, num_classes, full)
    n, d = embeddings.shape
    labels = labels.long()
    count = torch.bincount(labels, minlength=num_classes)
    rows = max(1, _CHUNK_ELEMENTS // max(d, 1))
    sums = embeddings.new_zeros((num_classes, d), dtype=torch.float64)
    for start in range(0, n, rows):
        sums.index_add_(0, labels[start:start + rows], embeddings[start:start + rows].double())
    mean = (sums / count.clamp_min(1).unsqueeze(1)).float()
    # Corrected two-pass form: deviations d from the float32-rounded mean, then
    # m2 = Σ d dᵀ - (Σ d)(Σ d)ᵀ / n removes the error of rounding the mean.
    shift = torch.zeros_like(mean)
    if full:
        m2 = _full_second_moment(embeddings, labels, mean, count, shift)
    else:
        m2 = torch.zeros_like(mean)
        for start in range(0, n, rows):
            y = labels[start:start + rows]
            dev = embeddings[start:start + rows].float() - mean.index_select(0, y)
            shift.index_add_(0, y, dev)
            m2.index_add_(0, y, dev * dev)
    shift /= count.clamp_min(1).sqrt().unsqueeze(1)
    if full:
        m2 -= shift.unsqueeze(2) * shift.unsqueeze(1)
    else:
        m2 = (m2 - shift * shift).clamp_min_(0.0)
    return count, mean, m2


def _full_second_moment(
    embeddings: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, count: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Sum of outer products of deviations from ``mean`` per class, ``[C, D, D]`` float32;
    adds the summed deviations to ``shift [C, D]``.

    Classes are ordered by size; each chunk of consecutive classes is packed into a
    zero-padded ``[c, n_max, D]`` block of float32 deviations and reduced with one ``bmm``.
    """
    num_classes, d = mean.shape
    order = torch.argsort(count, stable=True)  # ascending class size
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_classes, device=order.device)
    sample_order = torch.argsort(rank[labels], stable=True)  # samples grouped by class, in rank order
    sorted_counts = count[order]
    class_start = torch.cumsum(sorted_counts, 0) - sorted_counts  # first sample of each rank
    sorted_labels = labels[sample_order]
    position = torch.arange(labels.numel(), device=labels.device) - class_start[rank[sorted_labels]]
    dev = embeddings[sample_order].float() - mean.index_select(0, sorted_labels)
    shift.index_add_(0, sorted_labels, dev)

    m2 = torch.zeros((num_classes, d, d), dtype=torch.float32, device=embeddings.device)
    max_count = int(sorted_counts[-1]) if num_classes else 0
    step = max(1, _CHUNK_ELEMENTS // (d * (d + max_count)))
    for lo in range(0, num_classes, step):
        hi = min(lo + step, num_classes)
        n_max = int(sorted_counts[hi - 1])
        if n_max == 0:
            continue
        s0 = int(class_start[lo])
        s1 = int(class_start[hi - 1] + sorted_counts[hi - 1])
        block = dev.new_zeros((hi - lo, n_max, d))
        block[rank[sorted_labels[s0:s1]] - lo, position[s0:s1]] = dev[s0:s1]
        m2[order[lo:hi]] = torch.bmm(block.transpose(1, 2), block)
    return m2


class ClassStatistics:
    """Running per-class mean and covariance of the embeddings (spec §3) and their neighbour
    correction (spec §4).

    Args:
        num_classes: C, the number of train classes.
        dim: D, the embedding size.
        covariance: ``"diag"`` (the paper's diagonal, ``[C, D]``) or ``"full"`` (``[C, D, D]``).
        momentum: m; the fold weight of a class present in an update is at least ``1 - m``
            (official 0.2).
        device: where the statistics live.

    Attributes:
        mean: ``[C, D]`` float32.
        covariance: ``[C, D]`` or ``[C, D, D]`` float32 (population covariance, see module doc).
        count: ``[C]`` int64, n_seen: the number of samples folded in so far (grows with
            every refresh).
        class_size: ``[C]`` int64, the class's sample count in the latest update that
            contained it: the class size n_k used by the neighbour correction (a refresh
            embeds the whole train set, so this is the number of train images of the class;
            n_seen would double with every refresh and turn singletons into candidates).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        covariance: str = "diag",
        momentum: float = 0.2,
        device: torch.device | str | None = None,
    ) -> None:
        if covariance not in _KINDS:
            raise ValueError(f"covariance must be one of {_KINDS}, got {covariance!r}")
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes} and {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.kind = covariance
        self.momentum = float(momentum)
        shape = (num_classes, dim, dim) if self.full else (num_classes, dim)
        self.mean = torch.zeros((num_classes, dim), dtype=torch.float32, device=device)
        self.covariance = torch.zeros(shape, dtype=torch.float32, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.class_size = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @property
    def full(self) -> bool:
        """True for full ``[C, D, D]`` covariances."""
        return self.kind == "full"

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold the statistics of ``embeddings [N, D]`` (any float dtype) with ``labels [N]``
        into the running estimate: :func:`class_moments` then :meth:`update_from_moments`.

        Call it once per refresh with the embeddings of the whole train set (or, in
        distributed training, all-reduce the moments and call :meth:`update_from_moments`
        once): every call is one fold step and sets :attr:`class_size`.

        Raises:
            ValueError: wrong shapes, labels out of range, or NaN / Inf embeddings (nothing
                is changed then).
        """
        if embeddings.dim() == 2 and embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {embeddings.shape[1]}, the statistics {self.dim}")
        self.update_from_moments(*class_moments(embeddings, labels, self.num_classes, self.full))

    def update_from_moments(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold precomputed moments (e.g. all-reduced across processes) into the estimate.

        For each class with ``count > 0`` (spec §3): w = n_new / (n_new + n_seen) clamped
        below at 1 - momentum, Σ_new = m2 / n_new (population covariance),
        Σ ← (1-w)Σ + wΣ_new + w(1-w)(μ - μ_new)(μ - μ_new)^T (element-wise square for the
        diagonal), μ ← (1-w)μ + wμ_new, n_seen += n_new, class_size = n_new. Classes with
        ``count == 0`` are left untouched. Arithmetic in float64, storage float32.

        Args:
            count: ``[C]`` integer sample counts.
            mean: ``[C, D]`` class means of the new samples.
            m2: ``[C, D]`` (diag) or ``[C, D, D]`` (full) centred second moments, summed.

        Raises:
            ValueError: shapes that do not match the statistics, negative counts, or
                non-finite moments.
        """
        c, d = self.num_classes, self.dim
        m2_shape = (c, d, d) if self.full else (c, d)
        if tuple(count.shape) != (c,) or tuple(mean.shape) != (c, d) or tuple(m2.shape) != m2_shape:
            raise ValueError(
                f"moments must be count [{c}], mean [{c}, {d}], m2 {list(m2_shape)} ({self.kind}); "
                f"got {list(count.shape)}, {list(mean.shape)}, {list(m2.shape)}"
            )
        if not (all_finite(mean) and all_finite(m2)):
            raise ValueError("moments contain NaN or Inf values; refusing to fold them into the class statistics")
        count = count.to(self.device, torch.int64)
        if bool((count < 0).any()):
            raise ValueError("moment counts must be non-negative")
        present = count > 0
        per_class = d * d if self.full else d
        step = max(1, _CHUNK_ELEMENTS // per_class)
        for lo in range(0, c, step):
            sl = slice(lo, lo + step)
            n_new = count[sl].double()
            w = (n_new / (n_new + self.count[sl].double())).clamp_min(1.0 - self.momentum)
            w = torch.where(present[sl], w, torch.zeros_like(w))  # absent classes: w = 0, unchanged
            shape = (-1, 1, 1) if self.full else (-1, 1)
            wb, nb = w.view(shape), n_new.clamp_min(1).view(shape)
            mu_old = self.mean[sl].double()
            mu_new = mean[sl].to(self.device, torch.float64)
            delta = mu_old - mu_new
            spread = delta.unsqueeze(2) * delta.unsqueeze(1) if self.full else delta * delta
            cov_new = m2[sl].to(self.device, torch.float64) / nb
            cov = (1 - wb) * self.covariance[sl].double() + wb * cov_new + wb * (1 - wb) * spread
            self.covariance[sl] = cov.float()
            self.mean[sl] = ((1 - w).unsqueeze(1) * mu_old + w.unsqueeze(1) * mu_new).float()
        self.count += count
        self.class_size = torch.where(present, count, self.class_size)

    def corrected(self, **options) -> torch.Tensor:
        """Neighbour-corrected covariances (spec §4, Eq. 9-16), same shape as ``covariance``.

        ``neighbor_correction(mean, covariance, class_size, **options)``: :attr:`class_size`
        is n_k; ``options`` are its keyword arguments (``num_neighbors``, ``beta``, ``gamma``,
        ``tau``, ``sigma_m``, ``sigma_cv`` and the official-code switches), see
        :func:`fastiaa.iaa.neighbor_correction`.
        """
        return neighbor_correction(self.mean, self.covariance, self.class_size, **options)

    def state_dict(self) -> dict:
        """Tensors and settings for a checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "covariance_kind": self.kind,
            "momentum": self.momentum,
            "mean": self.mean.clone(),
            "covariance": self.covariance.clone(),
            "count": self.count.clone(),
            "class_size": self.class_size.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; tensors are moved to this object's device.

        Raises:
            ValueError: the checkpoint was written for another number of classes, embedding
                size or covariance kind (build the ClassStatistics with the checkpoint's
                settings).
        """
        mine = (self.num_classes, self.dim, self.kind)
        theirs = (state.get("num_classes"), state.get("dim"), state.get("covariance_kind"))
        if mine != theirs:
            raise ValueError(
                f"class statistics checkpoint has (num_classes, dim, covariance) = {theirs}, "
                f"this estimator {mine}"
            )
        self.momentum = float(state["momentum"])
        for name in ("mean", "covariance", "count", "class_size"):
            setattr(self, name, state[name].to(self.device, getattr(self, name).dtype).clone())

    def to(self, device: torch.device | str) -> "ClassStatistics":
        """Move the statistics to ``device`` (in place); returns self."""
        for name in ("mean", "covariance", "count", "class_size"):
            setattr(self, name, getattr(self, name).to(device))
        return self
