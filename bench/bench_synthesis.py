"""Synthesis benchmark (issue 4): one training step's draw of M synthetic embeddings per
original (spec IAA.md §5, Eq. 17), B = 180, M = 3, D = 512, per factor form.

Factor forms and tables:
  diag      standard deviations [C, D], C = 11,318 (SOP)
  full      dense lower Cholesky factors [C, D, D], C = 98 (Cars; SOP would be 12 GB)
  low-rank  SOP-shaped LowRankFactor: 59,551 rows, each class drawing on its own rows and
            on 25 neighbours' (≈ 140 rank-one terms) plus a 512 x 512 global factor
Batches are balanced as in training: 60 classes x 3 images.

Paths:
  torch     fastiaa.iaa.synthesize with a precomputed SamplingFactor (diag, full) or
            fastiaa.kernels.synthesize's PyTorch path (low rank)
  triton    fastiaa.kernels.synthesize, one Triton launch (CUDA only)
Times: median over repeats of the forward draw, and of forward + backward (gradient to z).

Usage: python bench/bench_synthesis.py [--repeats N] [--threads N]
Prints a Markdown table. Without CUDA only the CPU PyTorch path is measured
("GPU: not measured").
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from fastiaa import kernels
from fastiaa.iaa import SamplingFactor, synthesize
from fastiaa.kernels import LowRankFactor

B, M, D, LAM = 180, 3, 512, 0.6
SOP_CLASSES, CARS_CLASSES, SOP_ROWS, NEIGHBORS = 11318, 98, 59551, 25


def batch_labels(num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """60 random classes x 3 images each (the balanced sampler's batch)."""
    classes = torch.randperm(num_classes, generator=gen)[: B // 3]
    return classes.repeat_interleave(3)


def sop_lowrank(gen: torch.Generator) -> LowRankFactor:
    """A random LowRankFactor with SOP's shape: class row counts 2-12, 25 neighbours each."""
    counts = 2 + torch.randint(0, 11, (SOP_CLASSES,), generator=gen)
    counts = (counts.double() * SOP_ROWS / counts.sum()).round().long().clamp(2, 12)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    rows = 0.05 * torch.randn(int(row_ptr[-1]), D, generator=gen)
    sources = torch.cat([torch.arange(SOP_CLASSES)[:, None],
                         torch.randint(0, SOP_CLASSES, (SOP_CLASSES, NEIGHBORS), generator=gen)], 1)
    length = counts[sources].flatten()
    pair = torch.repeat_interleave(torch.arange(length.numel()), length)
    position = torch.arange(pair.numel()) - (length.cumsum(0) - length)[pair]
    entry_row = row_ptr[sources.flatten()[pair]] + position
    per_class = counts[sources].sum(1)
    glob = torch.linalg.cholesky(torch.eye(D) * 0.01 + 0.001)
    return LowRankFactor(rows, torch.cat([torch.zeros(1, dtype=torch.int64), per_class.cumsum(0)]), entry_row,
                         torch.rand(entry_row.numel(), generator=gen) * 0.3, glob,
                         torch.rand(SOP_CLASSES, generator=gen) * 0.3, int(per_class.max()))


def problems(device: str):
    """(name, labels, factor object for the torch path, factor for the kernel) per form."""
    gen = torch.Generator().manual_seed(0)
    std = torch.rand(SOP_CLASSES, D, generator=gen) * 0.05
    a = torch.randn(CARS_CLASSES, D, D, generator=gen) / D
    chol = torch.linalg.cholesky(a @ a.transpose(1, 2) + 1e-3 * torch.eye(D))
    low = sop_lowrank(gen)
    yield "diag", batch_labels(SOP_CLASSES, gen).to(device), SamplingFactor("diag", std.to(device))
    yield "full", batch_labels(CARS_CLASSES, gen).to(device), SamplingFactor("full", chol.to(device))
    yield "low-rank", batch_labels(SOP_CLASSES, gen).to(device), low.to(device)


def draw(z, labels, factor, seed):
    if isinstance(factor, SamplingFactor):  # the global RNG, as a trainer without its own generator
        return synthesize(z, labels, factor, LAM, M)
    return kernels.synthesize(z, labels, factor, math.sqrt(LAM), M, seed)


def median_seconds(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up (and Triton compilation)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: str, backend: str, repeats: int) -> list[tuple[str, str, float, float]]:
    kernels.set_backend(backend)
    cuda = device == "cuda"
    out = []
    for name, labels, factor in problems(device):
        z = torch.randn(B, D, device=device, requires_grad=True)
        forward = median_seconds(lambda: draw(z.detach(), labels, factor, 1), repeats, cuda)
        both = median_seconds(lambda: draw(z, labels, factor, 1).sum().backward(), repeats, cuda)
        out.append((name, backend, forward, both))
    kernels.set_backend("auto")
    return out


def table(title: str, rows) -> None:
    print(f"\n| {title} | path | forward µs | forward + backward µs | torch / triton (forward) |")
    print("|---|---|---|---|---|")
    torch_fwd = {name: fwd for name, backend, fwd, _ in rows if backend == "torch"}
    for name, backend, fwd, both in rows:
        ratio = f"{torch_fwd[name] / fwd:.1f}" if backend == "triton" else "-"
        print(f"| {name} | {backend} | {fwd * 1e6:.0f} | {both * 1e6:.0f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    table(f"synthesis B={B} M={M} D={D}, CPU ({threads} threads)", measure("cpu", "torch", args.repeats))
    if torch.cuda.is_available():
        rows = measure("cuda", "torch", 10 * args.repeats) + measure("cuda", "triton", 10 * args.repeats)
        table(f"synthesis B={B} M={M} D={D}, {torch.cuda.get_device_name()}", rows)
    else:
        print("\nGPU: not measured (no CUDA device)")


if __name__ == "__main__":
    main()
