"""Measuring helpers shared by the benchmarks in bench/ (Linux: reads /proc/self/status).

Each method runs in a fresh child process (``measure_in_child``), so one method's caches,
allocator pools and thread pools cannot help or hurt the next, and its peak resident memory
can be read on its own: the child loads its inputs, the kernel's peak-RSS mark is reset,
the method runs under a wall-clock timer, and the peak above the memory held before the
call is reported (tracemalloc cannot see torch's or faiss's allocations; the kernel can).
"""

from __future__ import annotations

import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context


@dataclass(frozen=True)
class Measurement:
    seconds: float  # wall-clock time of the call
    cpu_seconds: float  # CPU time of the call, all threads (user + system)
    peak_mib: float  # peak resident memory during the call, above what was resident before it
    result: object  # what the method returned


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {field} line (not Linux?)")


def rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since start or the last ``reset_peak_rss``, MiB."""
    return _status_mib("VmHWM")


def reset_peak_rss() -> None:
    """Set the kernel's peak-RSS mark (VmHWM) back to the current resident memory."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def use_all_cores() -> int:
    """Let torch and faiss use every core this process may run on; returns that number."""
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    try:
        import faiss

        faiss.omp_set_num_threads(cores)
    except ImportError:
        pass
    return cores


def measure(method, *args, **kwargs) -> Measurement:
    """Time ``method(*args, **kwargs)`` and its peak resident memory in this process."""
    before = rss_mib()
    reset_peak_rss()
    cpu, start = _cpu_seconds(), time.perf_counter()
    result = method(*args, **kwargs)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return Measurement(seconds, cpu, max(peak_rss_mib() - before, 0.0), result)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(load, load_args, method, kwargs) -> Measurement:
    use_all_cores()
    return measure(method, *load(*load_args), **kwargs)


def measure_in_child(load, load_args: tuple, method, **kwargs) -> Measurement:
    """In a fresh (spawned) process: ``inputs = load(*load_args)`` untimed, then
    ``measure(method, *inputs, **kwargs)``. ``load`` and ``method`` must be module-level
    functions (picklable); the result must be picklable too."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_child, load, load_args, method, kwargs).result()
