"""Per-class statistics of the embeddings and their running estimate (Eq. 7-8 of the paper,
docs/method.md §3), in the forms behind one protocol, :class:`ClassStatistics`.

:class:`DenseStatistics` keeps the diagonal ``[C, D]`` or the full ``[C, D, D]`` covariances;
``fastiaa.iaa.lowrank.LowRankStatistics`` keeps full covariances in low-rank form (Stanford Online
Products scale). Both fold one refresh at a time with the parallel-variance rule of the official
code and turn their covariances, neighbour-corrected or not, into the sampling factor that
``fastiaa.kernels.synthesize`` draws from.

Conventions
-----------
* The covariance of a class within one refresh is the *population* covariance (centred second
  moment divided by n, not n − 1), as in the official code; a class with a single sample therefore
  has covariance 0 and the sample as mean (docs/method.md §4, official-code difference (b)).
* Moments come from ``fastiaa.kernels.class_moments`` (float64 class sums on the PyTorch path,
  float32 accumulators in Triton); the fold runs in float64; results are stored in float32.
* Temporary buffers stay within the working-memory budget of ``fastiaa.memory``.
"""
from __future__ import annotations

from typing import Protocol

import torch

from fastiaa import distributed, kernels, memory
from fastiaa.distributed import World
from fastiaa.kernels import LowRankFactor, all_finite

from .correction import neighbor_correction

COVARIANCES = ("diag", "full")


class ClassStatistics(Protocol):
    """What :class:`fastiaa.IAA` needs of a form of class statistics.

    Attributes: ``num_classes`` C, ``dim`` D, ``mean [C, D]`` float32, ``count [C]`` int64 (n_seen,
    samples folded so far), ``class_size [C]`` int64 (n_k: the class's size in its latest refresh).
    """

    num_classes: int
    dim: int
    mean: torch.Tensor
    count: torch.Tensor
    class_size: torch.Tensor

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, world: World | None = None,
               backend: str = "auto") -> None:
        """Fold one refresh: this process's ``embeddings [N, D]`` and ``labels [N]`` (every rank calls)."""

    def factor(self, correction: dict | None) -> torch.Tensor | LowRankFactor:
        """The sampling factor L (L Lᵀ = Σ_k, corrected with ``neighbor_correction(**correction)``
        unless None), in the form ``fastiaa.kernels.synthesize`` takes."""

    def covariance(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_k of ``classes`` (default all): ``[k, D]`` (diagonal) or ``[k, D, D]`` float32."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, world: World | None):
    """Per-rank class moments (count, mean, m2) → the moments of all ranks together (Chan et al.'s
    parallel rule, float64, all-reduced); the identity in a single process."""
    if world is None or not world.distributed:
        return count, mean, m2
    n = distributed.all_reduce(count.clone().double(), world)
    total = distributed.all_reduce(mean.double() * count.double()[:, None], world)
    global_mean = total / n.clamp(min=1)[:, None]
    delta = mean.double() - global_mean
    spread = (count.double()[:, None] * delta * delta if m2.dim() == 2
              else torch.einsum("c,ci,cj->cij", count.double(), delta, delta))
    m2 = distributed.all_reduce(m2.double() + spread, world)
    return n.long(), global_mean.float(), m2.float()


def cholesky_factor(covariance: torch.Tensor, jitter: float = 1e-6, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factors of full covariances for sampling (docs/method.md §5).

    Batched Cholesky of Σ_k + δ_k I (``torch.linalg.cholesky_ex``, in chunks of classes), δ_k =
    ``jitter`` and, only for the classes whose factorisation failed, ×10 up to ``max_tries − 1`` times.

    Args:
        covariance: ``[C, D, D]`` symmetric positive semi-definite, finite.
        jitter: the first δ (absolute, squared embedding units).

    Returns:
        ``(L [C, D, D] float32, largest δ used)``.

    Raises:
        ValueError: wrong shape, non-finite values, or a class still not positive definite at
            δ = jitter · 10^(max_tries − 1) (its covariance is broken: rebuild the statistics).
    """
    if covariance.dim() != 3 or covariance.shape[1] != covariance.shape[2]:
        raise ValueError(f"covariance must be [C, D, D], got {list(covariance.shape)}")
    if not all_finite(covariance):
        raise ValueError("covariance contains NaN or Inf values")
    cov = covariance.detach().float()
    num_classes, d, _ = cov.shape
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    factor = torch.empty_like(cov)
    largest = 0.0
    step = max(1, memory.block_elements(parts=4) // (d * d))
    for lo in range(0, num_classes, step):
        block = cov[lo:lo + step]
        todo = torch.arange(block.shape[0], device=cov.device)
        delta = jitter
        for _ in range(max_tries):
            chol, info = torch.linalg.cholesky_ex(block[todo] + delta * eye)
            ok = info == 0
            factor[lo + todo[ok]] = chol[ok]
            if bool(ok.any()):
                largest = max(largest, delta)
            todo = todo[~ok]
            if todo.numel() == 0:
                break
            delta *= 10.0
        else:
            raise ValueError(f"covariance of class(es) {(lo + todo[:10]).tolist()} is not positive definite even "
                             f"with jitter {delta / 10:g}; the class statistics are broken (rebuild them)")
    return factor, largest


class DenseStatistics:
    """Running per-class means and covariances, diagonal ``[C, D]`` or full ``[C, D, D]``
    (Eq. 7-8), and their neighbour correction (Eq. 9-16). A :class:`ClassStatistics`.

    Args:
        num_classes: C. dim: D.
        covariance: ``"diag"`` (the paper's diagonal) or ``"full"``.
        momentum: m; the fold weight of a class present in a refresh is at least 1 − m (0.2).
        device: where the statistics live.

    Raises:
        ValueError: unknown covariance form, non-positive sizes, momentum outside [0, 1].
    """

    def __init__(self, num_classes: int, dim: int, covariance: str = "diag", momentum: float = 0.2,
                 device: torch.device | str | None = None) -> None:
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes} and {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.num_classes, self.dim, self.kind, self.momentum = int(num_classes), int(dim), covariance, float(momentum)
        shape = (num_classes, dim, dim) if self.full else (num_classes, dim)
        self.mean = torch.zeros((num_classes, dim), dtype=torch.float32, device=device)
        self.sigma = torch.zeros(shape, dtype=torch.float32, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.class_size = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @property
    def full(self) -> bool:
        """True for full ``[C, D, D]`` covariances."""
        return self.kind == "full"

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def covariance(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_k ``[C, D]`` / ``[C, D, D]`` float32 (the stored tensor when ``classes`` is None)."""
        return self.sigma if classes is None else self.sigma[classes]

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, world: World | None = None,
               backend: str = "auto") -> None:
        """Fold one refresh: :func:`fastiaa.kernels.class_moments` of this process's ``embeddings``
        ``[N, D]`` (any float dtype) and ``labels [N]``, merged over the ranks of ``world``, then
        :meth:`fold`. Every call is one fold step and sets :attr:`class_size`.

        Raises:
            ValueError: wrong shapes, labels out of range, or NaN / Inf embeddings (nothing changes).
        """
        if embeddings.dim() == 2 and embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {embeddings.shape[1]}, the statistics {self.dim}")
        moments = kernels.class_moments(embeddings.to(self.device), labels.to(self.device), self.num_classes,
                                        self.full, backend)
        self.fold(*merge_moments(*moments, world))

    def fold(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold moments of one refresh into the estimate (docs/method.md §3).

        For each class with ``count > 0``: w = n_new / (n_new + n_seen) clamped below at 1 − m,
        Σ_new = m2 / n_new, Σ ← (1−w)Σ + wΣ_new + w(1−w)(μ − μ_new)(μ − μ_new)ᵀ (element-wise
        square for the diagonal), μ ← (1−w)μ + wμ_new, n_seen += n_new, class_size = n_new. Classes
        with ``count == 0`` are untouched. Arithmetic in float64, storage float32.

        Args:
            count: ``[C]`` integer counts; mean: ``[C, D]``; m2: ``[C, D]`` / ``[C, D, D]`` summed
                centred second moments (as ``fastiaa.kernels.class_moments`` returns them).

        Raises:
            ValueError: shapes that do not match, negative counts, or non-finite moments.
        """
        c, d = self.num_classes, self.dim
        m2_shape = (c, d, d) if self.full else (c, d)
        if tuple(count.shape) != (c,) or tuple(mean.shape) != (c, d) or tuple(m2.shape) != m2_shape:
            raise ValueError(f"moments must be count [{c}], mean [{c}, {d}], m2 {list(m2_shape)} ({self.kind}); "
                             f"got {list(count.shape)}, {list(mean.shape)}, {list(m2.shape)}")
        if not (all_finite(mean) and all_finite(m2)):
            raise ValueError("moments contain NaN or Inf values; refusing to fold them into the class statistics")
        count = count.to(self.device, torch.int64)
        if bool((count < 0).any()):
            raise ValueError("moment counts must be non-negative")
        present = count > 0
        step = max(1, memory.pass_elements(self.device, parts=8) // (d * d if self.full else d))
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
            cov = (1 - wb) * self.sigma[sl].double() + wb * cov_new + wb * (1 - wb) * spread
            self.sigma[sl] = cov.float()
            self.mean[sl] = ((1 - w).unsqueeze(1) * mu_old + w.unsqueeze(1) * mu_new).float()
        self.count += count
        self.class_size = torch.where(present, count, self.class_size)

    def corrected(self, **options) -> torch.Tensor:
        """Neighbour-corrected covariances (Eq. 9-16), shaped like :meth:`covariance`:
        ``neighbor_correction(mean, Σ, class_size, **options)`` (see
        :func:`fastiaa.iaa.neighbor_correction` for the options)."""
        return neighbor_correction(self.mean, self.sigma, self.class_size, **options)

    def factor(self, correction: dict | None) -> torch.Tensor:
        """Standard deviations ``[C, D]`` (diagonal) or lower Cholesky factors ``[C, D, D]`` of the
        covariances, corrected with ``correction`` (keyword options of :meth:`corrected`) unless None."""
        cov = self.corrected(**correction) if correction is not None else self.sigma
        if not self.full:
            return cov.float().clamp_min(0.0).sqrt()
        return cholesky_factor(cov)[0]

    def state_dict(self) -> dict:
        """Tensors and settings for a checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        return {"num_classes": self.num_classes, "dim": self.dim, "covariance_kind": self.kind,
                "momentum": self.momentum, "mean": self.mean.clone(), "covariance": self.sigma.clone(),
                "count": self.count.clone(), "class_size": self.class_size.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (tensors moved to this object's device).

        Raises:
            ValueError: the checkpoint has another number of classes, embedding size or form.
        """
        mine = (self.num_classes, self.dim, self.kind)
        theirs = (state.get("num_classes"), state.get("dim"), state.get("covariance_kind"))
        if mine != theirs:
            raise ValueError(f"class statistics checkpoint has (num_classes, dim, covariance) = {theirs}, "
                             f"this estimator {mine}")
        self.momentum = float(state["momentum"])
        self.mean = state["mean"].to(self.device, torch.float32).clone()
        self.sigma = state["covariance"].to(self.device, torch.float32).clone()
        self.count = state["count"].to(self.device, torch.int64).clone()
        self.class_size = state["class_size"].to(self.device, torch.int64).clone()
