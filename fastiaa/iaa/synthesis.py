"""Adaptive synthesis of embeddings (spec IAA.md §5, paper Eq. 17) and the λ schedule.

ẑ = z + √λ · L ε with ε ~ N(0, I) and L L^T = Σ_y: the element-wise square root for a
diagonal Σ, the Cholesky factor of Σ + δI for a full one, or a
:class:`fastiaa.kernels.LowRankFactor` (full covariances at SOP scale). Gradients flow to z only.

Randomness comes from a CPU ``torch.Generator`` on every device: where the noise is not drawn
by ``torch.randn`` on the CPU itself, one 63-bit seed is drawn from it on the host
(:func:`draw_seed`) and keys the device noise. So a training run is reproducible from that
generator's state, and drawing a seed never synchronises the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastiaa import kernels
from fastiaa.kernels import LowRankFactor

from .statistics import check_embeddings

_KINDS = ("diag", "full")
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SamplingFactor:
    """Per-class factor L of the sampling covariance (L L^T = Σ, up to the jitter).

    Attributes:
        kind: ``"diag"`` or ``"full"``.
        data: ``[C, D]`` float32 standard deviations (diag) or ``[C, D, D]`` float32 lower
            triangular Cholesky factors of Σ_k + δ_k I (full).
        jitter: the largest δ_k added to any class's diagonal (0.0 for diag), in the units
            of Σ (squared embedding units).
    """

    kind: str
    data: torch.Tensor
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"SamplingFactor.kind must be one of {_KINDS}, got {self.kind!r}")
        expected = 3 if self.kind == "full" else 2
        if self.data.dim() != expected:
            raise ValueError(f"a {self.kind} SamplingFactor needs a {expected}-d tensor, got {list(self.data.shape)}")

    @property
    def num_classes(self) -> int:
        return self.data.shape[0]

    def to(self, device: torch.device | str) -> "SamplingFactor":
        """The same factor on ``device``."""
        return SamplingFactor(self.kind, self.data.to(device), self.jitter)


def sampling_factor(covariance: torch.Tensor, jitter: float = 1e-6, max_tries: int = 8) -> SamplingFactor:
    """Factor class covariances for sampling (spec §5).

    Diagonal ``[C, D]``: the element-wise square root (negative round-off clamped to 0).
    Full ``[C, D, D]``: batched Cholesky of Σ_k + δ_k I (``torch.linalg.cholesky_ex``, in
    chunks of classes), with δ_k = ``jitter`` and, only for the classes whose factorisation
    failed, δ_k multiplied by 10 up to ``max_tries - 1`` times. Compute once per refresh
    and reuse the factor for every step.

    Args:
        covariance: ``[C, D]`` or ``[C, D, D]`` (symmetric positive semi-definite) float.
        jitter: the first δ (absolute, squared embedding units).
        max_tries: number of δ values tried.

    Returns:
        a :class:`SamplingFactor` (``jitter`` = the largest δ used).

    Raises:
        ValueError: wrong rank, non-finite values, or a class still not positive definite
            with δ = jitter · 10^(max_tries-1) (its covariance is badly broken: rebuild the
            statistics).
    """
    if covariance.dim() not in (2, 3) or (covariance.dim() == 3 and covariance.shape[1] != covariance.shape[2]):
        raise ValueError(f"covariance must be [C, D] (diagonal) or [C, D, D] (full), got {list(covariance.shape)}")
    if not bool(torch.isfinite(covariance).all()):
        raise ValueError("covariance contains NaN or Inf values")
    cov = covariance.detach().float()
    if cov.dim() == 2:
        return SamplingFactor("diag", cov.clamp_min(0.0).sqrt())
    num_classes, d, _ = cov.shape
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    factor = torch.empty_like(cov)
    largest = 0.0
    step = max(1, _CHUNK_ELEMENTS // (d * d))
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
            raise ValueError(
                f"covariance of class(es) {(lo + todo[:10]).tolist()} is not positive definite even with "
                f"jitter {delta / 10:g}; the class statistics are broken (rebuild them from embeddings)"
            )
    return SamplingFactor("full", factor, largest)


def synthesize(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    covariance: torch.Tensor | SamplingFactor | LowRankFactor,
    lam: float,
    num: int,
    generator: torch.Generator | None = None,
    official_repeated_sqrt: bool = False,
) -> torch.Tensor:
    """Draw ``num`` synthetic embeddings per original (spec §5, Eq. 17): ẑ = z + √λ L_y ε.

    Randomness: ``generator`` is a CPU ``torch.Generator`` whatever the embeddings' device
    (None: the global CPU generator), so that reproducibility rests on its state alone
    (``get_state`` / ``set_state`` for checkpoints) and no step waits for the GPU:

    * CPU embeddings on the PyTorch path: ε = ``torch.randn((num, B, D), generator=generator)``.
    * Every other case (CUDA embeddings; the Triton kernels; a :class:`LowRankFactor`): one
      seed ``int(torch.randint(0, 2**63 - 1, (), generator=generator))`` is drawn on the host
      and keys the noise: the Philox stream of ``fastiaa.kernels.synthesize`` (Triton), or a
      ``torch.Generator`` on the embeddings' device seeded with it (PyTorch paths). Either
      way exactly one value is drawn from ``generator`` per call.

    Args:
        embeddings: ``[B, D]`` originals z (un-normalised, as the class statistics); the
            result is differentiable with respect to them (d ẑ / d z = I).
        labels: ``[B]`` integer class indices.
        covariance: class covariances ``[C, D]`` / ``[C, D, D]``, a precomputed
            :class:`SamplingFactor` (pass one for full covariances: a Cholesky per step is
            slow), or a :class:`fastiaa.kernels.LowRankFactor` (from
            :meth:`fastiaa.iaa.LowRankStatistics.corrected`; always sampled by
            ``fastiaa.kernels.synthesize``, whose PyTorch fallback serves CPU tensors).
            Detached: no gradient reaches the statistics.
        lam: λ_t >= 0 (see :func:`lambda_schedule`).
        num: M >= 1 samples per original.
        generator: a CPU ``torch.Generator`` or None (see above).
        official_repeated_sqrt: the official loop's quirk: sample m (1-based) uses
            Σ^(1/2^m) element-wise as its standard deviation (diagonal only).

    Returns:
        ``[num, B, D]`` tensor in the embeddings' dtype; block m holds the m-th draw for
        every original.

    Memory (PyTorch path, full): gathers the ``[U, D, D]`` factors of the U classes in the
    batch per step (63 MB for U = 60, D = 512).

    Raises:
        ValueError: bad shapes or labels, λ < 0, num < 1, a covariance on another device, a
            generator that is not on the CPU, or ``official_repeated_sqrt`` with a full or
            low-rank covariance. The label range and NaN / Inf embeddings are checked for CPU
            tensors only: on a GPU those checks would synchronise every step (labels come from
            the train set there; the caller checks the embeddings with its loss).
    """
    lowrank = isinstance(covariance, LowRankFactor)
    if lowrank:
        factor, table, full = None, covariance.rows, True
        num_classes = covariance.num_classes
    elif isinstance(covariance, SamplingFactor):
        factor, table = covariance, covariance.data
        full = factor.kind == "full"
        num_classes = table.shape[0]
    else:
        factor, table = None, covariance
        full = covariance.dim() == 3
        if covariance.dim() not in (2, 3):
            raise ValueError(f"covariance must be [C, D] or [C, D, D], got {list(covariance.shape)}")
        num_classes = table.shape[0]
    # value checks read the tensors: on a GPU they would synchronise every step
    check_embeddings(embeddings, labels, num_classes, values=embeddings.device.type == "cpu")
    if table.shape[1] != embeddings.shape[1]:
        raise ValueError(f"covariance has dimension {table.shape[1]}, embeddings {embeddings.shape[1]}")
    if table.device != embeddings.device:
        raise ValueError(
            f"covariance is on {table.device} but embeddings on {embeddings.device}; move it once per refresh"
        )
    if lam < 0 or num < 1:
        raise ValueError(f"need lam >= 0 and num >= 1, got lam={lam}, num={num}")
    if official_repeated_sqrt and full:
        raise ValueError(
            "official_repeated_sqrt reproduces a diagonal-only quirk; use it with a diagonal covariance "
            "(not a full or low-rank one)"
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (got one on {generator.device}): synthesis draws its seeds "
            "on the host so that no step waits for the GPU; create it with torch.Generator() and seed it"
        )

    scale = math.sqrt(lam)
    if lowrank or (not official_repeated_sqrt and kernels.use_triton(embeddings)):
        factor = covariance if lowrank else (factor if factor is not None else sampling_factor(covariance)).data
        return kernels.synthesize(embeddings, labels, factor, scale, num, draw_seed(generator))

    if embeddings.device.type != "cpu":
        generator = torch.Generator(embeddings.device).manual_seed(draw_seed(generator))
    b, d = embeddings.shape
    labels = labels.long()
    noise = torch.randn((num, b, d), generator=generator, device=embeddings.device, dtype=torch.float32)
    if full:
        offset = _apply_full_factor(table.detach(), factor is not None, labels, noise)
    else:
        rows = table.detach().index_select(0, labels).float()
        std = rows if factor is not None else rows.clamp_min(0.0).sqrt()
        if official_repeated_sqrt:  # Σ^(1/2^m) = std^(2^(1-m)), m = 1..num
            exponents = 2.0 ** -torch.arange(num, device=rows.device, dtype=torch.float32)
            std = std.unsqueeze(0) ** exponents.view(-1, 1, 1)
        offset = std * noise
    return embeddings.unsqueeze(0) + (scale * offset).to(embeddings.dtype)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One seed in [0, 2**63 - 1) from a CPU ``generator`` (None: the global CPU generator).

    Runs on the host only (never synchronises a GPU); advances ``generator`` by one draw.
    """
    return int(torch.randint(0, 2**63 - 1, (), generator=generator))


def _apply_full_factor(table: torch.Tensor, is_factor: bool, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_{y_b} ε[m, b] for all m, b: each class present in the batch is gathered (and
    factorised, when ``table`` holds covariances) once, and its rows' noise is multiplied
    in one ``bmm`` over a ``[U, rows_per_class · num, D]`` zero-padded block."""
    num, b, d = noise.shape
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    factors = table.index_select(0, classes).float()
    if not is_factor:
        factors = sampling_factor(factors).data
    order = torch.argsort(inverse, stable=True)
    group = inverse[order]
    position = torch.arange(b, device=labels.device) - (torch.cumsum(counts, 0) - counts)[group]
    block = noise.new_zeros((classes.numel(), int(counts.max()), num, d))
    block[group, position] = noise.transpose(0, 1)[order]
    mixed = torch.bmm(block.view(classes.numel(), -1, d), factors.transpose(1, 2)).view(block.shape)
    offset = torch.empty_like(noise)
    offset[:, order] = mixed[group, position].transpose(0, 1)
    return offset


def lambda_schedule(lam: float, epoch: int, epochs: int) -> float:
    """λ_t = λ · s(epoch / epochs) (spec §5), epochs counted from 1 as in the official loop.

    s = 1.0 while epoch <= 0.4 T, 0.9 while epoch <= 0.6 T, 0.75 while epoch <= 0.8 T,
    0.6 after (T = ``epochs``; exact integer comparisons, e.g. T = 100: epochs 1-40 → 1.0,
    41-60 → 0.9, 61-80 → 0.75, 81-100 → 0.6).

    Raises:
        ValueError: epochs < 1 or epoch < 0.
    """
    if epochs < 1 or epoch < 0:
        raise ValueError(f"need epochs >= 1 and epoch >= 0, got epoch={epoch}, epochs={epochs}")
    for tenths, factor in ((4, 1.0), (6, 0.9), (8, 0.75)):
        if 10 * epoch <= tenths * epochs:
            return lam * factor
    return lam * 0.6
