"""``fastiaa.IAA``: Intra-class Adaptive Augmentation with Neighbor Correction as one object.

It owns everything the method keeps between steps and decides by itself: the class statistics
(Eq. 7-8, in the form chosen once: diagonal, dense full or low-rank full), the neighbour
correction (Eq. 9-16), the sampling factor built from them at each refresh, the λ schedule and
the refresh schedule, and the synthesis of Eq. 17 with its noise generator. A training loop calls
:meth:`IAA.fold` at a refresh and :meth:`IAA.synthesize` at every step; which covariance form is
in use is the object's business.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fastiaa import distributed, kernels
from fastiaa.config import IAAConfig
from fastiaa.distributed import World
from fastiaa.kernels import LowRankFactor

from .lowrank import LowRankStatistics
from .statistics import ClassStatistics, DenseStatistics

FORMS = ("diag", "full", "lowrank", "auto")
_OFFICIAL_NEIGHBOUR_SWITCHES = ("official_zero_mean_singletons", "official_sentinel_normalization")


def lambda_schedule(lam: float, epoch: int, epochs: int) -> float:
    """λ_t = λ · s(epoch / epochs), epochs counted from 1 as in the official loop (docs/method.md §5).

    s = 1.0 while epoch <= 0.4 T, 0.9 while epoch <= 0.6 T, 0.75 while epoch <= 0.8 T, 0.6 after
    (exact integer comparisons: T = 100 gives epochs 1-40 → 1.0, 41-60 → 0.9, 61-80 → 0.75, 81-100 → 0.6).

    Raises:
        ValueError: epochs < 1 or epoch < 0.
    """
    if epochs < 1 or epoch < 0:
        raise ValueError(f"need epochs >= 1 and epoch >= 0, got epoch={epoch}, epochs={epochs}")
    for tenths, factor in ((4, 1.0), (6, 0.9), (8, 0.75)):
        if 10 * epoch <= tenths * epochs:
            return lam * factor
    return lam * 0.6


class IAA:
    """Intra-class Adaptive Augmentation with Neighbor Correction (Fu et al., IEEE TMM 2022).

    ::

        iaa = IAA(num_classes, dim, epochs=T, intra_lamda=0.8, aug_num=3, start_epoch=30)
        for epoch in range(1, T + 1):
            if iaa.refresh_due(epoch):          # every update_every_M_epoch epochs after start_epoch
                iaa.fold(train_embeddings, train_labels)
            for images, labels in loader:
                z = model(images)
                synthetic = iaa.synthesize(z, labels, epoch)   # [M, B, D], or None before synthesis starts

    Args:
        num_classes: C, the number of train classes (labels are 0..C-1).
        dim: D, the embedding size.
        settings: an :class:`fastiaa.config.IAAConfig`; keyword ``overrides`` replace its fields.
        epochs: T, the length of the run (the λ schedule).
        device: where the statistics and the factor live (the embeddings' device).
        world: the ``fastiaa.distributed.World`` of this process: :meth:`fold` merges the ranks'
            refreshes, :meth:`state_dict` gathers every rank's generator.
        seed: seed of the CPU generator of the synthesis noise (use a different one per rank).
        backend: kernel backend, ``"auto" | "triton" | "torch"`` (see ``fastiaa.kernels``).

    Attributes:
        form: ``"diag"``, ``"full"`` or ``"lowrank"`` (``"auto"`` resolved: full, dense unless the
            dense ``[C, D, D]`` would exceed ``dense_full_limit_gib``).
        correction: the keyword options of the neighbour correction, or None when the factor is
            built from the uncorrected covariances (``correction="off"``, or ``"auto"`` with at most
            1000 classes as the official code, or ``official_uncorrected_sampling``).
        statistics: the :class:`fastiaa.iaa.ClassStatistics` of that form.
        factor: the sampling factor of the latest refresh (None before the first).

    Raises:
        ValueError: a setting out of range, an unknown form, an official-code switch that the
            chosen form does not offer, or a ``backend`` that cannot run on ``device``.
    """

    def __init__(self, num_classes: int, dim: int, settings: IAAConfig | None = None, *, epochs: int,
                 device: torch.device | str | None = None, world: World | None = None, seed: int = 0,
                 backend: str = "auto", **overrides) -> None:
        s = dataclasses.replace(settings or IAAConfig(), **overrides)
        _check_settings(s, epochs)
        self.settings, self.epochs, self.backend = s, int(epochs), kernels.check_backend(backend, device)
        self.world = world or World()
        self.form = _resolve_form(s, num_classes, dim)
        if self.form == "lowrank":
            quirks = [f for f in _OFFICIAL_NEIGHBOUR_SWITCHES if getattr(s, f)]
            if quirks:
                raise ValueError(f"{quirks} are not offered with the low-rank full covariance; "
                                 "use --covariance diag or --covariance full")
            self.statistics: ClassStatistics = LowRankStatistics(num_classes, dim, s.momentum, device=device)
        else:
            self.statistics = DenseStatistics(num_classes, dim, self.form, s.momentum, device=device)
        correct = s.correction == "on" or (s.correction == "auto" and num_classes > 1000)
        options = dict(num_neighbors=s.num_neighbor, beta=s.beta, gamma=s.gamma, tau=s.tau)
        if self.form != "lowrank":
            options.update({f: getattr(s, f) for f in _OFFICIAL_NEIGHBOUR_SWITCHES})
        self.correction = options if correct and not s.official_uncorrected_sampling else None
        self.factor: torch.Tensor | LowRankFactor | None = None
        self.generator = torch.Generator().manual_seed(int(seed))

    # -- the schedule (docs/method.md §5) ---------------------------------------------------
    def refresh_due(self, epoch: int) -> bool:
        """Whether the statistics are refreshed before training epoch ``epoch`` (1-based): after
        ``start_epoch``, every ``update_every_M_epoch`` epochs; never with ``intra`` off."""
        s = self.settings
        return s.intra and epoch > s.start_epoch and (epoch - s.start_epoch - 1) % s.update_every_M_epoch == 0

    def active(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` trains with synthetic embeddings: from ``start_epoch +
        warmup_epoch + 1`` on, once statistics exist."""
        s = self.settings
        return s.intra and epoch > s.start_epoch + s.warmup_epoch and self.factor is not None

    def lam(self, epoch: int) -> float:
        """λ_t of epoch ``epoch`` (:func:`lambda_schedule` of ``intra_lamda``)."""
        return lambda_schedule(self.settings.intra_lamda, epoch, self.epochs)

    # -- the method ----------------------------------------------------------------------------
    def fold(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Refresh: fold this process's train ``embeddings [N, D]`` (un-normalised, any float
        dtype) with ``labels [N]`` into the class statistics (Eq. 7-8; under DDP every rank passes
        its own share and the ranks are merged), then rebuild the sampling factor (Eq. 9-16).

        Raises:
            ValueError: wrong shapes, labels outside [0, C), or NaN / Inf embeddings (nothing changes).
        """
        self.statistics.update(embeddings, labels, self.world, self.backend)
        self.factor = self.statistics.factor(self.correction)

    def synthesize(self, embeddings: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """``aug_num`` synthetic embeddings per original (Eq. 17): ẑ = z + √λ_t L_y ε.

        Args:
            embeddings: ``[B, D]`` originals z (un-normalised, like the statistics); the result is
                differentiable with respect to them.
            labels: ``[B]`` integer train class indices.
            epoch: the current epoch (1-based; the λ schedule and :meth:`active`).

        Returns:
            ``[M, B, D]`` in the embeddings' dtype (block m: the m-th draw of every original), or
            None when :meth:`active` is false. Normalise before the loss (docs/method.md §6).

        Raises:
            ValueError: see :func:`fastiaa.kernels.synthesize`.
        """
        if not self.active(epoch):
            return None
        s = self.settings
        return kernels.synthesize(embeddings, labels, self.factor, math.sqrt(self.lam(epoch)), s.aug_num,
                                  self.generator, s.official_repeated_sqrt, self.backend)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The statistics and every rank's noise generator (a collective call under DDP: every
        rank calls it)."""
        return {"form": self.form, "statistics": self.statistics.state_dict(),
                "generators": distributed.all_gather_object(self.generator.get_state(), self.world)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output and rebuild the factor. The noise generator is
        restored only when the checkpoint has this world's number of ranks (else it keeps its seed).

        Raises:
            ValueError: the checkpoint holds another covariance form, number of classes or dim.
        """
        if state.get("form") != self.form:
            raise ValueError(f"the checkpoint's class statistics are {state.get('form')!r}, this run's {self.form!r}")
        self.statistics.load_state_dict(state["statistics"])
        generators = state["generators"]
        if len(generators) == self.world.world_size:
            self.generator.set_state(generators[self.world.rank].cpu())
        self.factor = self.statistics.factor(self.correction) if int(self.statistics.count.sum()) else None


def _resolve_form(s: IAAConfig, num_classes: int, dim: int) -> str:
    if s.covariance != "auto":
        return s.covariance
    dense_gib = num_classes * dim**2 * 4 / 2**30
    return "lowrank" if dense_gib > s.dense_full_limit_gib else "full"


def _check_settings(s: IAAConfig, epochs: int) -> None:
    if s.covariance not in FORMS:
        raise ValueError(f"covariance must be one of {', '.join(FORMS)}, got {s.covariance!r}")
    if s.correction not in ("auto", "on", "off"):
        raise ValueError(f"correction must be auto, on or off, got {s.correction!r}")
    if not (s.intra_lamda >= 0 and math.isfinite(s.intra_lamda)):
        raise ValueError(f"intra_lamda (λ) must be a finite number >= 0, got {s.intra_lamda}")
    if s.aug_num < 1 or s.update_every_M_epoch < 1 or epochs < 1:
        raise ValueError(f"need aug_num, update_every_M_epoch and epochs >= 1, got {s.aug_num}, "
                         f"{s.update_every_M_epoch}, {epochs}")
    if s.official_repeated_sqrt and s.covariance != "diag":
        raise ValueError("official_repeated_sqrt reproduces a quirk of the official diagonal code; use it with "
                         "--covariance diag")
