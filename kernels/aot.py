"""Ahead-of-time compilation of fastiaa's Triton kernels for real GPU targets, on any machine.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors but accepts code that the
real compiler may reject and says nothing about registers or spills. Here the *real dispatch*
(:func:`fastiaa.kernels.class_moments`, :func:`fastiaa.kernels.synthesize` with backend "triton")
runs on CPU tensors inside :func:`fastiaa.kernels._dispatch.recording`, which captures every launch
(kernel, arguments, constexprs) instead of running it; each distinct launch is then compiled with
``triton.compile`` for a ``GPUTarget`` (no driver needed) with the specialisation the Triton
runtime would give those arguments, and ``ptxas -v`` reports its registers and spills.

Uses Triton's runtime binder (``create_function_from_signature``, ``JITFunction._pack_args``),
an internal interface: checked with Triton 3.6 and 3.8.
"""
from __future__ import annotations

import itertools
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from ._dispatch import recording, triton
from .moments import class_moments
from .sampling import LowRankFactor, synthesize

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMS = ("diag", "full", "lowrank")


@dataclass(frozen=True)
class Launch:
    """One launch the dispatch produced: what it was for, and what Triton would compile."""

    config: str          # e.g. "synthesize full float16 D=512 M=3"
    kernel: object       # the @triton.jit function
    args: tuple
    meta: dict


@dataclass(frozen=True)
class Compiled:
    """Resources of one compiled kernel on one target (from ``ptxas -v`` and Triton's metadata)."""

    kernel: str
    capability: int
    key: str             # the specialisation: argument types, alignment attributes, constexprs
    registers: int | None    # None when ptxas was not asked (usage=False)
    spill_bytes: int | None  # spill stores + spill loads per thread
    shared_bytes: int


GRID = dict(dtypes=tuple(DTYPES), dims=(37, 128, 512, 2048), nums=(1, 2, 3, 4), forms=FORMS)
"""The configurations the tests compile: every dtype, D from odd to large, M = 1-4, every form."""


def dispatch_launches(dtypes=GRID["dtypes"], dims=GRID["dims"], nums=GRID["nums"], forms=FORMS,
                      moments: bool = True, repeated_sqrt: bool = True, seed: int = 0) -> list[Launch]:
    """The launches of the real dispatch over a grid of configurations (CPU tensors, nothing runs).

    Synthesis for every dtype x D x M x form (the diagonal form also with the official repeated
    square root), class moments for every dtype x D, diagonal and full.
    """
    if triton is None:
        raise RuntimeError("Triton is not importable: nothing to compile")
    out: list[Launch] = []
    gen = torch.Generator().manual_seed(seed)
    batch, classes = 8, 3
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for dtype, dim in itertools.product(dtypes, dims):
        z = torch.zeros(batch, dim, dtype=DTYPES[dtype])
        factors = {"diag": torch.ones(classes, dim), "full": torch.eye(dim).expand(classes, dim, dim).contiguous(),
                   "lowrank": _probe_lowrank(classes, dim)}
        if moments:
            for full in (False, True):
                out += _record(f"class_moments {'full' if full else 'diag'} {dtype} D={dim}",
                               lambda: class_moments(z, labels, classes, full, backend="triton"))
        for form, num in itertools.product(forms, nums):
            quirks = (False, True) if form == "diag" and repeated_sqrt else (False,)
            for quirk in quirks:
                name = f"synthesize {form}{' repeated-sqrt' if quirk else ''} {dtype} D={dim} M={num}"
                out += _record(name, lambda: synthesize(z, labels, factors[form], 0.5, num, gen, quirk, "triton"))
    return out


def _record(config: str, call) -> list[Launch]:
    with recording() as launches:
        call()
    return [Launch(config, kernel, args, meta) for kernel, _, args, meta in launches]


def _probe_lowrank(classes: int, dim: int) -> LowRankFactor:
    rows = torch.ones(4, dim)
    ptr = torch.tensor([0, 2, 3, 5])
    return LowRankFactor(rows, ptr, torch.tensor([0, 1, 2, 3, 0]), torch.ones(5), torch.eye(dim),
                         torch.ones(classes), 2)


def specialisation(launch: Launch, capability: int):
    """(signature, constexprs, attrs, options) the Triton runtime would compile ``launch`` with."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.meta, bound, spec, options)
    return signature, constexprs, attrs, options


def key_of(launch: Launch, capability: int) -> str:
    """A string that is equal for two launches exactly when Triton compiles them to one kernel."""
    signature, constexprs, attrs, _ = specialisation(launch, capability)
    return f"{launch.kernel.__name__}|{sorted(signature.items())}|{sorted(constexprs.items())}|{sorted(attrs.items())}"


def compile_launch(launch: Launch, capability: int, usage: bool = True) -> Compiled:
    """Compile ``launch`` for ``sm_<capability>`` (80, 90, ...); with ``usage``, also run
    ``ptxas -v`` on its PTX for the registers and spills.

    Raises:
        Exception: whatever the Triton compiler or ptxas raise for code they reject.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialisation(launch, capability)
    target = GPUTarget("cuda", capability, 32)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    registers, spills = _ptxas_usage(compiled.asm["ptx"], capability) if usage else (None, None)
    return Compiled(launch.kernel.__name__, capability, key_of(launch, capability), registers, spills,
                    int(compiled.metadata.shared))


def compile_grid(capabilities=(80, 90), usage=lambda launch, capability: True, workers: int = 1,
                 **grid) -> list[tuple[Launch, Compiled]]:
    """Compile every distinct launch of :func:`dispatch_launches(**grid) <dispatch_launches>` once per
    capability, in ``workers`` processes; ptxas -v runs for a kernel when ``usage(launch,
    capability)`` holds for any launch that compiles to it. Returns (launch, its compiled kernel) for
    every launch and capability."""
    launches = dispatch_launches(**grid)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, launch in enumerate(launches):
        for capability in capabilities:
            groups.setdefault((capability, key_of(launch, capability)), []).append(i)
    todo = [(members[0], capability, any(usage(launches[i], capability) for i in members))
            for (capability, _), members in groups.items()]
    if workers <= 1:
        results = _compile_part(grid, todo)
    else:
        parts = [todo[w::workers] for w in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = [r for part in pool.map(_compile_part, [grid] * workers, parts) for r in part]
    done = {(compiled.capability, compiled.key): compiled for _, compiled in results}
    return [(launches[i], done[group]) for group, members in groups.items() for i in members]


def _compile_part(grid: dict, todo: list) -> list[tuple[int, Compiled]]:
    launches = dispatch_launches(**grid)
    return [(i, compile_launch(launches[i], capability, usage)) for i, capability, usage in todo]


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill store + load bytes per thread) that ``ptxas -v`` reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}{'a' if capability == 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills
