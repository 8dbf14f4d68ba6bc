"""Evaluator benchmark (issues 3 and 16): fastiaa.evaluation.retrieval_metrics against the
authors' algorithm, a faiss exact search, and the matrix product every exact method needs.

Data (bench.synthetic, class centre + noise, tuned so that Recall@1 is near a trained model's):
  single-set (default)  SOP-shaped: 60,502 x 512 float32 in 11,316 classes of 2-12 images
                        (the Stanford Online Products test split's shape); Recall@1,10,100,1000,
                        MAP@R, RP
  --gallery             In-Shop-shaped query/gallery: 14,218 queries and 12,612 gallery images
                        of 3,985 items; Recall@1,10,20,30, MAP@R, RP

Methods, each in its own process (bench/common.py: wall and CPU seconds, peak RSS above the
loaded embeddings):
  fastiaa            retrieval_metrics, backend="auto" (single-set on a CPU: the torch backend's
                     symmetric blocks; query/gallery: the measured rule of the module docstring)
  fastiaa torch      retrieval_metrics(backend="torch")
  fastiaa faiss      retrieval_metrics(backend="faiss")
  authors            (single-set) the official evaluation as docs/method.md §8 describes it:
                     chunks of 10,000 queries, the query's own similarity set to a big number,
                     torch top-k of 1 + max(class size, 1000), first column dropped, then a
                     Python loop per query (and per neighbour) for MAP@R, RP
  faiss k=1          faiss IndexFlatIP exact search, k = 1: the similarity products alone, the
                     floor of a full search
  full product       every similarity once by torch (its BLAS, in blocks of 2**26 similarities),
                     nothing else: the single-set symmetric blocks need half of it

--device moves the fastiaa methods and the full product; the authors and faiss k=1 stay on the CPU.

Usage: python -m bench.bench_eval [--small] [--gallery] [--methods NAME ...] [--repeat N] [--threads N]
                                  [--device cuda]
(from the repository root; --repeat: N rounds over the methods, each method's fastest round is
kept, for a busy machine).
Prints the metric values of every method (they must agree) and a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from bench.baselines import authors_retrieval
from bench.common import measure_in_child
from bench.synthetic import inshop_like, sop_like

SOP = dict(n=60502, classes=11316, dim=512)
SMALL = dict(n=6050, classes=1132, dim=512)
INSHOP = dict(queries=14218, gallery=12612, items=3985, dim=512)
SMALL_INSHOP = dict(queries=1422, gallery=1261, items=399, dim=512)
KS = {"single": (1, 10, 100, 1000), "gallery": (1, 10, 20, 30)}


def load(path: str, device: str = "cpu", threads: int | None = None) -> tuple[np.ndarray, ...]:
    """The embeddings and labels (x, labels, or q, ql, g, gl). The libraries are imported, the
    thread count set (default: every core) and a CUDA context made here, outside the timed call."""
    import faiss
    import torch

    import fastiaa.evaluation  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    if device != "cpu":
        torch.zeros(1, device=device)
    data = np.load(path)
    return tuple(data[name] for name in ("x", "labels", "q", "ql", "g", "gl") if name in data)


def ks_of(arrays) -> tuple[int, ...]:
    return KS["single" if len(arrays) == 2 else "gallery"]


def fastiaa(*arrays, device="cpu", backend="auto"):
    from fastiaa.evaluation import retrieval_metrics

    return retrieval_metrics(*arrays, ks=ks_of(arrays), device=device, backend=backend)


def fastiaa_torch(*arrays, device="cpu"):
    return fastiaa(*arrays, device=device, backend="torch")


def fastiaa_faiss(*arrays, device="cpu"):
    return fastiaa(*arrays, device=device, backend="faiss")


def authors(x, labels):
    """The official evaluation as docs/method.md §8 describes it (bench.baselines.authors_retrieval)."""
    import torch

    return authors_retrieval(torch.from_numpy(x), torch.from_numpy(labels), KS["single"])


def faiss_k1(*arrays):
    import faiss

    query, reference = (arrays[0], arrays[0]) if len(arrays) == 2 else (arrays[0], arrays[2])
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    index = faiss.IndexFlatIP(query.shape[1])
    index.add(unit(reference))
    index.search(unit(query), 1)
    return {}


def full_product(*arrays, device="cpu"):
    """Every query-reference similarity once (torch.mm in blocks of rows), nothing else."""
    import torch
    import torch.nn.functional as F

    query = F.normalize(torch.from_numpy(arrays[0]).to(device), dim=1)
    reference = query if len(arrays) == 2 else F.normalize(torch.from_numpy(arrays[2]).to(device), dim=1)
    rows = max(1, (1 << 26) // len(reference))  # the block of fastiaa's query chunks, reused
    block = query.new_empty((rows, len(reference)))
    for start in range(0, len(query), rows):
        part = query[start : start + rows]
        torch.mm(part, reference.T, out=block[: len(part)])
    if device != "cpu":
        torch.cuda.synchronize(device)
    return {}


METHODS = {
    "fastiaa": fastiaa,
    "fastiaa torch": fastiaa_torch,
    "fastiaa faiss": fastiaa_faiss,
    "authors": authors,
    "faiss k=1": faiss_k1,
    "full product": full_product,
}
ON_DEVICE = {"fastiaa", "fastiaa torch", "fastiaa faiss", "full product"}  # what --device moves
SINGLE_DEFAULT = ["fastiaa", "fastiaa faiss", "authors", "faiss k=1", "full product"]
GALLERY_DEFAULT = ["fastiaa", "fastiaa torch", "fastiaa faiss", "faiss k=1", "full product"]


def ratio(over, under, field: str) -> str:
    return f"{getattr(over, field) / getattr(under, field):.2f}" if over and under else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tenth of the size, for a quick run")
    parser.add_argument("--gallery", action="store_true", help="In-Shop-shaped query/gallery instead of SOP")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the fastest of each method is kept")
    parser.add_argument("--device", default="cpu", help="device of the fastiaa methods (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and faiss threads per method (default: every core; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    methods = args.methods or (GALLERY_DEFAULT if args.gallery else SINGLE_DEFAULT)
    if args.gallery and "authors" in methods:
        parser.error("the authors' method is single-set only (their In-Shop path breaks with --map 1)")
    cores = args.threads or len(os.sched_getaffinity(0))
    if args.gallery:
        arrays = inshop_like(**(SMALL_INSHOP if args.small else INSHOP))
        sizes = np.bincount(arrays[3])
        print(f"data: {len(arrays[0]):,} queries, {len(arrays[2]):,} gallery x {arrays[0].shape[1]} float32, "
              f"{np.count_nonzero(sizes):,} items, {cores} cores", flush=True)
        names = ("q", "ql", "g", "gl")
    else:
        arrays = sop_like(**(SMALL if args.small else SOP))
        sizes = np.bincount(arrays[1])
        print(f"data: {len(arrays[0]):,} x {arrays[0].shape[1]} float32, {len(sizes):,} classes of "
              f"{sizes.min()}-{sizes.max()} (mean {sizes.mean():.2f}), {cores} cores", flush=True)
        names = ("x", "labels")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, **dict(zip(names, arrays)))
        del arrays
        for _ in range(args.repeat):
            for name in methods:
                on_device = name in ON_DEVICE
                kwargs = {"device": args.device} if on_device else {}
                m = measure_in_child(load, (path, args.device if on_device else "cpu", args.threads), METHODS[name],
                                     **kwargs)
                values = ", ".join(f"{k} {v:.6f}" for k, v in m.result.items() if k != "num_queries")
                print(f"{name}: {m.seconds:.1f} s ({m.cpu_seconds:.1f} CPU s), +{m.peak_mib:.0f} MiB  {values}",
                      flush=True)
                if name not in results or m.seconds < results[name].seconds:
                    results[name] = m

    reference = results.get("fastiaa")
    for name, m in results.items():
        if reference is not None and m.result and name != "fastiaa":
            worst = max(abs(m.result[k] - reference.result[k]) for k in reference.result)
            print(f"largest metric difference fastiaa vs {name}: {worst:.2e}")

    baseline, floor, product = results.get("authors"), results.get("faiss k=1"), results.get("full product")
    where = f"{cores} CPU {'core' if cores == 1 else 'cores'}" + (f", best of {args.repeat}" if args.repeat > 1 else "")
    if args.device != "cpu":
        where += f", fastiaa on {args.device}"
    print(f"\n| method ({'In-Shop' if args.gallery else 'SOP'}-sized{', small' if args.small else ''}, {where}) "
          "| wall s | CPU s | authors / this (wall) | authors / this (CPU) | this / faiss k=1 (wall) "
          "| this / faiss k=1 (CPU) | this / full product (CPU) | peak MiB above embeddings |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in results.items():
        cells = [f"{m.seconds:.1f}", f"{m.cpu_seconds:.1f}", ratio(baseline, m, "seconds"),
                 ratio(baseline, m, "cpu_seconds"), ratio(m, floor, "seconds"), ratio(m, floor, "cpu_seconds"),
                 ratio(m, product, "cpu_seconds")]
        print(f"| {name} | {' | '.join(cells)} | {m.peak_mib:.0f} |")
    if product is not None and not args.gallery:
        print(f"\nthe symmetric blocks' floor, half the full product: {product.seconds / 2:.1f} s "
              f"({product.cpu_seconds / 2:.1f} CPU s)")


if __name__ == "__main__":
    main()
