"""The one working-memory setting of fastiaa: how much memory temporary blocks may take.

Every chunked computation (class moments, the neighbour correction, the low-rank covariance
products, batched Cholesky factors, the blocks of retrieval similarities) cuts its work into
blocks so that the temporaries it holds at one time stay within this budget. A computation that
holds ``parts`` blocks at once asks for :func:`block_elements(parts) <block_elements>` elements
per block; a chain of element-wise passes asks :func:`pass_elements`, which on a CPU also stays
within the cache. The budget bounds working memory only: the results themselves (e.g. a ``[C, D, D]``
covariance) are as large as they are.

Default :data:`DEFAULT_MIB` (256 MiB); ``fastiaa train --work-memory-mib N`` or ``with
work_memory(N): ...`` changes it for one run or one block of code (a context variable: nothing
is left changed afterwards). A larger budget means fewer, larger blocks (faster on a GPU); results
do not depend on it beyond float rounding.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

DEFAULT_MIB = 256.0

CPU_PASS_ELEMENTS = 1 << 17
"""On a CPU, a chain of element-wise passes works in blocks of at most this many elements, whatever
the budget: blocks that stay in the cache, and temporaries that reuse their pages instead of
faulting fresh ones in (bench/bench_estimator.py times the refresh's fold)."""

_budget_mib = contextvars.ContextVar("fastiaa_work_memory_mib", default=DEFAULT_MIB)


def budget_mib() -> float:
    """The working-memory budget in MiB in effect here."""
    return _budget_mib.get()


def block_elements(parts: int = 1, element_bytes: int = 4) -> int:
    """Elements of one block when ``parts`` such blocks are held at once (at least 1)."""
    return max(1, int(_budget_mib.get() * 2**20) // (parts * element_bytes))


def pass_elements(device, parts: int = 1, element_bytes: int = 4) -> int:
    """Elements of one block of a chain of element-wise passes on ``device`` (a ``torch.device`` or
    its name): :func:`block_elements`, at most :data:`CPU_PASS_ELEMENTS` on a CPU."""
    elements = block_elements(parts, element_bytes)
    return min(elements, CPU_PASS_ELEMENTS) if str(device).startswith("cpu") else elements


def block_side(parts: int = 1, element_bytes: int = 4) -> int:
    """Rows of a square block when ``parts`` such blocks are held at once (at least 1)."""
    return math.isqrt(block_elements(parts, element_bytes))


@contextlib.contextmanager
def work_memory(mib: float):
    """Use a budget of ``mib`` MiB inside the ``with`` block.

    Raises:
        ValueError: ``mib`` is not a positive finite number.
    """
    if not 0 < float(mib) < float("inf"):
        raise ValueError(f"the working-memory budget must be a positive number of MiB, got {mib!r}")
    token = _budget_mib.set(float(mib))
    try:
        yield
    finally:
        _budget_mib.reset(token)
