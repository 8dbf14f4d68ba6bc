"""Backend choice of fastiaa.kernels (Triton or PyTorch), the guarded Triton import, and the one
input validator of the kernels' entry points."""
from __future__ import annotations

import contextlib
import contextvars
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

BACKENDS = ("auto", "triton", "torch")

_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastiaa_kernel_recorder", default=None)


def triton_available() -> bool:
    """True when ``import triton`` succeeded in this process."""
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(name: str, device: torch.device | str | None = None) -> str:
    """Validate a backend name (the ``--kernels`` flag) and return it; with ``device``, also that
    ``"triton"`` can run there (a CUDA device, or any under the interpreter).

    Raises:
        ValueError: unknown name, ``"triton"`` while ``import triton`` fails (install the
            ``triton`` wheel matching your torch, or pass ``--kernels torch``), or ``"triton"`` on
            a CPU ``device`` outside the interpreter.
    """
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "triton" and triton is None:
        raise ValueError(f"--kernels triton requested but Triton cannot be imported ({_TRITON_IMPORT_ERROR!r}); "
                         "install triton or use --kernels torch")
    if name == "triton" and device is not None and torch.device(device).type != "cuda" and not interpreting():
        raise ValueError(f"--kernels triton runs on CUDA devices, not on {device}: use --device cuda, or "
                         "--kernels auto (Triton where it can run, PyTorch elsewhere)")
    return name


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels process ``tensors`` under ``backend``.

    ``"auto"`` and ``"triton"``: Triton when it imports and every tensor is on a CUDA device;
    ``"triton"`` also takes CPU tensors under the interpreter (``TRITON_INTERPRET=1``, the
    tests). ``"torch"``: never. Outside the interpreter CPU tensors never go to Triton.
    """
    check_backend(backend)
    if triton is None or backend == "torch":
        return False
    if _recorder.get() is not None:  # fastiaa.kernels.aot records what the dispatch would launch
        return True
    if all(t.is_cuda for t in tensors):
        return True
    return backend == "triton" and interpreting() and all(t.device.type == "cpu" for t in tensors)


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """Launch a Triton ``kernel`` on ``grid`` under the CUDA device of its first tensor argument
    (so a tensor on ``cuda:1`` never launches on the current device), or record the launch
    inside :func:`recording`. The one launch point of fastiaa.kernels."""
    recorded = _recorder.get()
    if recorded is not None:
        recorded.append((kernel, grid, args, meta))
        return
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording():
    """Inside the block the dispatch takes the Triton path for any tensors and every
    :func:`launch` is appended to the yielded list as ``(kernel, grid, args, meta)`` instead of
    running (outputs stay uninitialised): what ``fastiaa.kernels.aot`` compiles ahead of time."""
    launches: list = []
    token = _recorder.set(launches)
    try:
        yield launches
    finally:
        _recorder.reset(token)


def reads_values(tensor: torch.Tensor) -> bool:
    """Whether validation may read ``tensor``'s values: on the CPU only (on a GPU it would
    synchronise with the host)."""
    return tensor.device.type == "cpu"


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf (one reduction; NaN propagates through min / max)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor.detach().reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_embeddings(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, values: bool = True,
                     what: str = "embeddings") -> None:
    """Validate ``embeddings [N, D]`` (floating) and their ``labels [N]`` (integer class indices).

    Args:
        values: also check the label range and that every embedding is finite. These read the
            tensors (a device synchronisation on a GPU); False keeps to shapes, dtypes and devices.

    Raises:
        ValueError: wrong rank, non-floating embeddings, non-integer labels, a length or device
            mismatch, a label outside ``[0, num_classes)``, or a NaN / Inf embedding (which must
            never reach the class statistics: check the model and the learning rate, or enable
            AMP's GradScaler).
    """
    if embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(f"{what} must be a floating [N, D] tensor, got {tuple(embeddings.shape)} {embeddings.dtype}")
    if labels.dim() != 1 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer [N] tensor, got {tuple(labels.shape)} {labels.dtype}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{what} has {embeddings.shape[0]} rows but labels has {labels.shape[0]} entries "
                         "(one label per embedding)")
    if labels.device != embeddings.device:
        raise ValueError(f"labels are on {labels.device} but {what} on {embeddings.device}; move them to one device")
    if not values:
        return
    if labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) (the train class indices), got range [{lo}, {hi}]")
    if not all_finite(embeddings):
        raise ValueError(f"{what} contain NaN or Inf values; refusing to use them "
                         "(check the model output, the learning rate, or enable AMP's GradScaler)")
