"""Synthesis benchmark (issue 4): one training step's draw of M synthetic embeddings per
original (docs/method.md §5, Eq. 17), B = 180, M = 3, D = 512, per factor form.

Factor forms and tables:
  diag      standard deviations [C, D], C = 11,318 (SOP)
  full      dense lower Cholesky factors [C, D, D], C = 98 (Cars; SOP would be 12 GB)
  low-rank  SOP-shaped LowRankFactor: 59,551 rows, each class drawing on its own rows and
            on 25 neighbours' (≈ 140 rank-one terms) plus a 512 x 512 global factor
Batches are balanced as in training: 60 classes x 3 images.

Paths: fastiaa.kernels.synthesize(z, labels, factor, sqrt(λ), M, generator, backend=path), with the
factor precomputed (standard deviations, fastiaa.iaa.cholesky_factor, or the LowRankFactor) and
one CPU torch.Generator per form:
  torch     backend="torch": the PyTorch implementation
  triton    backend="triton": one Triton launch (CUDA only)
Times: median over repeats of the forward draw, and of forward + backward (gradient to z).

Usage: python -m bench.bench_synthesis [--repeats N] [--threads N]   (from the repository root)
Prints a Markdown table. Without CUDA only the CPU PyTorch path is measured
("GPU: not measured").
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from bench.synthetic import balanced_labels, sop_lowrank_factor
from fastiaa import kernels
from fastiaa.iaa import cholesky_factor

B, M, D, LAM = 180, 3, 512, 0.6
SOP_CLASSES, CARS_CLASSES, SOP_ROWS, NEIGHBORS = 11318, 98, 59551, 25


def problems(device: str):
    """(name, labels, factor) per form, on ``device``: standard deviations [C, D], lower
    Cholesky factors [C, D, D] or a LowRankFactor (what fastiaa.kernels.synthesize takes)."""
    gen = torch.Generator().manual_seed(0)
    std = torch.rand(SOP_CLASSES, D, generator=gen) * 0.05
    a = torch.randn(CARS_CLASSES, D, D, generator=gen) / D
    chol, _ = cholesky_factor(a @ a.transpose(1, 2) + 1e-3 * torch.eye(D))
    low = sop_lowrank_factor(gen, SOP_CLASSES, SOP_ROWS, D, NEIGHBORS)
    yield "diag", balanced_labels(SOP_CLASSES, B, 3, gen).to(device), std.to(device)
    yield "full", balanced_labels(CARS_CLASSES, B, 3, gen).to(device), chol.to(device)
    yield "low-rank", balanced_labels(SOP_CLASSES, B, 3, gen).to(device), low.to(device)


def draw(z, labels, factor, generator, backend):
    """M synthetic embeddings per row of z (docs/method.md §5, Eq. 17), noise from ``generator``."""
    return kernels.synthesize(z, labels, factor, math.sqrt(LAM), M, generator, backend=backend)


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
    cuda = device == "cuda"
    out = []
    for name, labels, factor in problems(device):
        z = torch.randn(B, D, device=device, requires_grad=True)
        gen = torch.Generator().manual_seed(1)   # the noise generator: CPU, whatever the device
        forward = median_seconds(lambda: draw(z.detach(), labels, factor, gen, backend), repeats, cuda)
        both = median_seconds(lambda: draw(z, labels, factor, gen, backend).sum().backward(), repeats, cuda)
        out.append((name, backend, forward, both))
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
