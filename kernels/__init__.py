"""fastiaa.kernels — the class moments and the synthesis of IAA, each behind one function that
dispatches to a Triton kernel or to the one PyTorch implementation (docs/method.md §3, §5).

This room knows nothing about training: it turns tensors into tensors.

Dispatch, by argument (``backend=``, the ``--kernels`` flag), never by a process-wide setting:

* ``"auto"`` (default): Triton for CUDA tensors when Triton imports, PyTorch otherwise.
* ``"triton"``: Triton for CUDA tensors; CPU tensors take Triton only under the interpreter
  (environment variable ``TRITON_INTERPRET=1``, used by the tests), PyTorch otherwise.
* ``"torch"``: always PyTorch.

The module imports on machines without a GPU driver and without Triton (``triton_available()``
says which); every entry point validates its input once (:func:`check_embeddings`).

Entry points
------------
``class_moments``      per-class count, mean and centred second moment (Eq. 7-8).
``synthesize``         N(z, scale² Σ_y) draws (Eq. 17), noise keyed by a CPU generator.

Dense Cholesky factors come from ``fastiaa.iaa.cholesky_factor`` (batched ``potrf`` through
torch); the full covariance at Stanford Online Products scale uses :class:`LowRankFactor` (built
by ``fastiaa.iaa.lowrank``), which needs no per-class Cholesky.
"""
from __future__ import annotations

from ._dispatch import BACKENDS, all_finite, check_backend, check_embeddings, triton_available, use_triton
from .moments import class_moments
from .sampling import LowRankFactor, draw_seed, synthesize

__all__ = [
    "BACKENDS",
    "LowRankFactor",
    "all_finite",
    "check_backend",
    "check_embeddings",
    "class_moments",
    "draw_seed",
    "synthesize",
    "triton_available",
    "use_triton",
]
