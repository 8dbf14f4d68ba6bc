"""fastiaa.kernels — Triton kernels for IAA and their dispatch (spec IAA.md §3-5).

This room knows nothing about training: it turns tensors into tensors.

Dispatch
--------
``set_backend("auto" | "triton" | "torch")`` picks the implementation:

* ``"auto"`` (default): Triton for CUDA tensors when Triton imports, PyTorch otherwise.
* ``"triton"``: Triton for CUDA tensors; CPU tensors take Triton only under the
  interpreter (environment variable ``TRITON_INTERPRET=1``, used by the tests), and the
  PyTorch code otherwise (Triton cannot launch on CPU tensors).
* ``"torch"``: always the PyTorch code.

The module imports on machines without a GPU driver and without Triton; Triton import
failures silently degrade to PyTorch (``triton_available()`` says which).

Entry points
------------
``class_moments``      per-class count, mean and centred second moment (spec §3).
``synthesize``         N(z, scale² Σ_y) draws with in-kernel Philox noise (spec §5, Eq. 17).

Dense Cholesky factors come from ``fastiaa.iaa.sampling_factor`` (cuSOLVER / LAPACK batched
``potrf`` through torch, which a Triton Cholesky would not beat at D = 512); the SOP-scale
full covariance uses :class:`LowRankFactor` (built by ``fastiaa.iaa.lowrank``) and needs
no per-class Cholesky.
"""
from __future__ import annotations

from ._dispatch import get_backend, set_backend, triton_available, use_triton
from .moments import class_moments
from .sampling import LowRankFactor, synthesize

__all__ = [
    "set_backend",
    "get_backend",
    "use_triton",
    "triton_available",
    "class_moments",
    "synthesize",
    "LowRankFactor",
]
