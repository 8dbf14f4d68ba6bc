"""Retrieval index benchmark (issue 12): fastiaa.index's approximate kinds (HNSW, IVF) against the
exact flat index, on a synthetic catalogue of clustered 512-d embeddings (bench.synthetic.catalogue).

For each index, in one process and one run: the build time (fastiaa.index.RetrievalIndex.build:
normalisation, IVF training, adding), the queries answered per second (one batched search of
``--queries`` queries, k = 10, every core) and Recall@10 against the exact answer: the share of the
flat index's 10 nearest that the index also returns, averaged over the queries.

Goal: an approximate index with Recall@10 >= 0.95 of the exact answer answering >= 10x more queries
per second than the flat index.

Each kind is built once and searched at several widths (WIDTHS: HNSW ef_search, IVF nprobe).

Usage: python -m bench.bench_index [--n 200000] [--queries 10000] [--dim 512] [--repeat N] [--kinds ...]
       python -m bench.bench_index --small      (20,000 vectors, 2,000 queries: a quick check)
(from the repository root; --repeat: the fastest of N searches is kept, for a busy machine).
Prints one line per index and a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import measure, use_all_cores
from bench.synthetic import catalogue
from fastiaa.embeddings import Embeddings
from fastiaa.index import IndexSettings, RetrievalIndex

K = 10
KINDS = {"flat": IndexSettings("flat"), "hnsw": IndexSettings("hnsw", hnsw_m=32), "ivf": IndexSettings("ivf")}
WIDTHS = {"flat": [None], "hnsw": [16, 32, 64, 128], "ivf": [4, 16, 64]}
"""Search widths tried on each built index: HNSW ef_search, IVF nprobe (RetrievalIndex.set_search_width)."""


def recall_vs_exact(ids: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |ids ∩ exact| / k (ids [n, k] from one index, exact [n, k] from the flat one)."""
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, exact)]) / exact.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="indexed vectors")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="searches per index; the fastest is kept")
    parser.add_argument("--small", action="store_true", help="20,000 vectors and 2,000 queries")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    args = parser.parse_args()
    if args.small:
        args.n, args.queries = 20_000, 2_000
    cores = use_all_cores()
    x, q = catalogue(args.n, args.queries, args.dim)
    data = Embeddings(x, ("",) * len(x), ("",) * len(x), {})
    print(f"catalogue: {len(x):,} x {args.dim} float32 ({x.nbytes / 2**20:.0f} MiB), {len(q):,} queries, "
          f"k = {K}, {cores} cores", flush=True)
    rows, exact = {}, None
    for kind in ["flat"] + [k for k in args.kinds if k != "flat"]:
        built = measure(RetrievalIndex.build, data, KINDS[kind])
        index = built.result
        for width in WIDTHS[kind]:
            index.set_search_width(ef_search=width, nprobe=width)
            seconds = []
            for _ in range(max(1, args.repeat)):
                start = time.perf_counter()
                _, ids = index.search(q, K)
                seconds.append(time.perf_counter() - start)
            exact = ids if exact is None else exact
            name = {"flat": "flat (exact)", "hnsw": f"hnsw M=32 ef_search={width}",
                    "ivf": f"ivf nlist={getattr(index.index, 'nlist', 0)} nprobe={width}"}[kind]
            rows[name] = (built.seconds, built.peak_mib, len(q) / min(seconds), recall_vs_exact(ids, exact))
            print(f"{name}: build {built.seconds:.1f} s (+{built.peak_mib:.0f} MiB), {rows[name][2]:,.0f} queries/s, "
                  f"Recall@{K} vs exact {rows[name][3]:.4f}", flush=True)
        del index

    flat_qps = rows["flat (exact)"][2]
    print(f"\n| index ({len(x):,} x {args.dim}, {len(q):,} queries, {cores} cores) | build s | build MiB "
          f"| queries/s | × flat | Recall@{K} vs exact |")
    print("|---|---|---|---|---|---|")
    for name, (build, mib, qps, recall) in rows.items():
        print(f"| {name} | {build:.1f} | {mib:.0f} | {qps:,.0f} | {qps / flat_qps:.1f} | {recall:.4f} |")
    met = [n for n, (_, _, qps, r) in rows.items() if n != "flat (exact)" and r >= 0.95 and qps >= 10 * flat_qps]
    print(f"\ngoal (Recall@{K} >= 0.95 and >= 10x the flat index's queries/s): "
          + (f"met by {', '.join(met)}" if met else "not met"))


if __name__ == "__main__":
    main()
