"""Backend selection for fastiaa.kernels (Triton or PyTorch) and the guarded Triton import."""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: no wheel, no driver, or a broken install all degrade to PyTorch.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def triton_available() -> bool:
    """True when ``import triton`` succeeded in this process."""
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_backend(name: str) -> None:
    """Select the kernel backend: ``"auto"``, ``"triton"`` or ``"torch"`` (the ``--kernels`` flag).

    Raises:
        ValueError: unknown name.
        RuntimeError: ``"triton"`` requested but ``import triton`` failed (install the
            ``triton`` wheel matching your torch, or pass ``--kernels torch``).
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {name!r}")
    if name == "triton" and triton is None:
        raise RuntimeError(
            "--kernels triton requested but Triton cannot be imported "
            f"({_TRITON_IMPORT_ERROR!r}); install triton or use --kernels torch"
        )
    _backend = name


def get_backend() -> str:
    """The backend name set by :func:`set_backend` (default ``"auto"``)."""
    return _backend


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should process ``tensors``.

    True when Triton imports, the backend is not ``"torch"`` and every tensor is on a CUDA
    device; additionally, with backend ``"triton"`` and ``TRITON_INTERPRET=1``, for CPU
    tensors (the interpreter used by the tests). Never True for CPU tensors otherwise.
    """
    if triton is None or _backend == "torch":
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return _backend == "triton" and interpreting() and all(t.device.type == "cpu" for t in tensors)
