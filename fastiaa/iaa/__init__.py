"""IAA, the method in PyTorch (spec IAA.md §3-5): the reference implementation and CPU path.

* :class:`ClassStatistics` / :func:`class_moments`: per-class means and covariances of the
  embeddings, folded over refreshes (spec §3).
* :func:`neighbor_correction` (also ``ClassStatistics.corrected``): covariances of
  few-sample classes corrected from their nearest classes (spec §4).
* :class:`LowRankStatistics`: the same with full covariances kept in low-rank form
  (Stanford Online Products scale); ``.corrected()`` gives a ``fastiaa.kernels.LowRankFactor``.
* :class:`SamplingFactor`, :func:`sampling_factor`, :func:`synthesize`: synthetic
  embeddings drawn from N(z, λΣ_y) (spec §5), keyed by a CPU generator (:func:`draw_seed`);
  :func:`lambda_schedule`: λ over the epochs.

CUDA tensors go to the Triton kernels of ``fastiaa.kernels`` (``class_moments``,
``synthesize``) when its backend selects them; everything else runs the code here.
"""
from .correction import neighbor_correction
from .lowrank import LowRankStatistics
from .statistics import ClassStatistics, class_moments
from .synthesis import SamplingFactor, draw_seed, lambda_schedule, sampling_factor, synthesize

__all__ = [
    "ClassStatistics",
    "class_moments",
    "neighbor_correction",
    "LowRankStatistics",
    "SamplingFactor",
    "sampling_factor",
    "synthesize",
    "draw_seed",
    "lambda_schedule",
]
