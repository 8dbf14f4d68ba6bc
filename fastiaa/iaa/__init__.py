"""The method behind :class:`fastiaa.IAA` (docs/method.md §3-5).

* :class:`IAA`: the method as one object (statistics, correction, factor, schedules, synthesis).
* :class:`ClassStatistics`: the protocol of its statistics forms, :class:`DenseStatistics`
  (diagonal or full ``[C, D, D]``) and :class:`LowRankStatistics` (full, low-rank form).
* :func:`neighbor_correction`: covariances of few-sample classes corrected from their neighbours.
* :func:`cholesky_factor`, :func:`lambda_schedule`, :func:`merge_moments`.

Class moments and synthesis themselves are ``fastiaa.kernels.class_moments`` and
``fastiaa.kernels.synthesize`` (Triton or PyTorch, one dispatch each).
"""
from .correction import neighbor_correction
from .lowrank import LowRankStatistics
from .method import IAA, lambda_schedule
from .statistics import ClassStatistics, DenseStatistics, cholesky_factor, merge_moments

__all__ = [
    "IAA",
    "ClassStatistics",
    "DenseStatistics",
    "LowRankStatistics",
    "cholesky_factor",
    "lambda_schedule",
    "merge_moments",
    "neighbor_correction",
]
