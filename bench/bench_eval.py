"""Evaluator benchmark (issue 3): fastiaa.evaluation.retrieval_metrics on SOP-shaped data
against the authors' algorithm and against the floor of any exact method.

Data: 60,502 x 512 float32 embeddings in 11,316 classes of 2-12 images (mean 5.35, the
Stanford Online Products test split's shape), class centre + noise (bench.synthetic.sop_like),
tuned so that Recall@1 is near a trained model's (~0.75). Metric set: Recall@1,10,100,1000,
MAP@R, RP.

Methods, each in its own process (bench/common.py: wall time, peak RSS above the loaded
embeddings):
  fastiaa            retrieval_metrics, default backend (torch blocks on CPU)
  fastiaa faiss      retrieval_metrics(backend="faiss")
  authors            the official evaluation as docs/method.md §8 describes it (and as the authors' code
                     is structured): chunks of 10,000 queries, the query's own similarity set
                     to a big number, torch top-k of 1 + max(class size, 1000), first column
                     dropped, then a Python loop per query (and per neighbour) for MAP@R, RP
  floor: faiss k=1   faiss IndexFlatIP exact search, k = 1: the similarity products alone
  torch GEMM only    the same products by torch (its BLAS), no selection: for reference

Usage: python -m bench.bench_eval [--small] [--methods NAME ...] [--repeat N] [--device cuda]
(from the repository root;
--repeat: N rounds over the methods, each method's fastest round is kept, for a busy machine;
--device moves the fastiaa methods only, the others stay on the CPU.)
Prints the metric values of every method (they must agree) and a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from bench.baselines import authors_retrieval
from bench.common import measure_in_child
from bench.synthetic import sop_like

KS = (1, 10, 100, 1000)
SOP = dict(n=60502, classes=11316, dim=512)
SMALL = dict(n=6050, classes=1132, dim=512)


def load(path: str, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The embeddings and labels; a CUDA context is made here, outside the timed call."""
    if device != "cpu":
        import torch

        torch.zeros(1, device=device)
    data = np.load(path)
    return data["x"], data["labels"]


def fastiaa_default(x, labels, device="cpu"):
    from fastiaa.evaluation import retrieval_metrics

    return retrieval_metrics(x, labels, ks=KS, device=device)


def fastiaa_faiss(x, labels, device="cpu"):
    from fastiaa.evaluation import retrieval_metrics

    return retrieval_metrics(x, labels, ks=KS, device=device, backend="faiss")


def authors(x, labels):
    """The official evaluation as docs/method.md §8 describes it (bench.baselines.authors_retrieval)."""
    import torch

    return authors_retrieval(torch.from_numpy(x), torch.from_numpy(labels), KS)


def floor_faiss(x, labels):
    import faiss

    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    index.search(x, 1)
    return {}


def torch_gemm(x, labels):
    import torch
    import torch.nn.functional as F

    x = F.normalize(torch.from_numpy(x), dim=1)
    rows = (1 << 26) // len(x)  # the block fastiaa uses on CPU, reused as fastiaa does
    block = x.new_empty((rows, len(x)))
    for start in range(0, len(x), rows):
        torch.mm(x[start : start + rows], x.T, out=block[: len(x[start : start + rows])])
    return {}


METHODS = {
    "fastiaa": fastiaa_default,
    "fastiaa faiss": fastiaa_faiss,
    "authors": authors,
    "floor: faiss k=1": floor_faiss,
    "torch GEMM only": torch_gemm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tenth of SOP (6,050 x 512), for a quick run")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the fastest of each method is kept")
    parser.add_argument("--device", default="cpu", help="device of the fastiaa methods (cpu, cuda)")
    args = parser.parse_args()
    shape = SMALL if args.small else SOP
    x, labels = sop_like(**shape)
    sizes = np.bincount(labels)
    print(f"data: {len(x):,} x {x.shape[1]} float32, {len(sizes):,} classes of {sizes.min()}-{sizes.max()} "
          f"(mean {sizes.mean():.2f}), {len(os.sched_getaffinity(0))} cores", flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, x=x, labels=labels)
        del x
        for _ in range(args.repeat):
            for name in args.methods:
                on_device = name.startswith("fastiaa")
                kwargs = {"device": args.device} if on_device else {}
                m = measure_in_child(load, (path, args.device if on_device else "cpu"), METHODS[name], **kwargs)
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

    baseline = results.get("authors")
    floor = results.get("floor: faiss k=1")
    where = f"{len(os.sched_getaffinity(0))} CPU cores" + (f", best of {args.repeat}" if args.repeat > 1 else "")
    if args.device != "cpu":
        where += f", fastiaa on {args.device}"
    print(f"\n| method ({'small' if args.small else 'SOP'}-sized, {where}) | wall s | CPU s "
          "| authors / this (wall) | authors / this (CPU) | this / floor (wall) | this / floor (CPU) "
          "| peak MiB above embeddings |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in results.items():
        cells = [f"{m.seconds:.1f}", f"{m.cpu_seconds:.1f}"]
        for over, under in ((baseline, m), (m, floor)):
            cells += [f"{over.seconds / under.seconds:.2f}", f"{over.cpu_seconds / under.cpu_seconds:.2f}"] \
                if over and under else ["-", "-"]
        print(f"| {name} | {' | '.join(cells)} | {m.peak_mib:.0f} |")


if __name__ == "__main__":
    main()
