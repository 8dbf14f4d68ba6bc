"""Estimator benchmark (issue 4): class statistics refresh and neighbour correction, fastiaa
against the authors' algorithm re-implemented from docs/method.md §3-4 as they wrote it.

Data: two refreshes of class-centre + noise embeddings (the second drifted from the first);
the first is folded untimed, the second is the timed refresh (so the momentum fold runs).
  Cars scale: 8,054 x 512, 98 classes of 59-97 images (mean 82.2).
  SOP scale:  59,551 x 512, 11,318 classes of 2-12 images (mean 5.26; bench.synthetic.sop_like).

Methods, each in its own process (bench/common.py: wall time, peak RSS above its inputs):
  authors dense     (Cars) bench.baselines.AuthorsDense, the official small-dataset estimator:
                    one-hot expansion of the embeddings to [N, C, D], sums over N,
                    parallel-variance fold (diagonal)
  authors loops     (SOP) bench.baselines.AuthorsLoops, the official large-dataset path: a
                    Python loop over classes for the statistics; the two class-by-class distance
                    matrices (torch.cdist), then a Python loop over classes for top-K, weights
                    and weighted sums. That last loop is slow at SOP scale (bench/RESULTS.md):
                    by default it runs on every 10th class and its time is scaled by 10 (the row
                    is marked ~; --full-baseline runs all classes)
  fastiaa           DenseStatistics(covariance="diag").update (+ .corrected() at SOP scale)
  fastiaa full      DenseStatistics(covariance="full").update at Cars scale (dense [C, D, D])
  fastiaa low-rank  LowRankStatistics(max_history=1).update + .corrected() at SOP scale:
                    full covariances in low-rank form (dense would be 12 GB) and the
                    sampling factor. Its covariance distances cost R² D for R kept rows
                    (R = N + C here; ~H (N + C) with max_history = H): a GPU job at H = 4
  full products     the two full C x C x D products behind the distance matrices, alone; fastiaa's
                    symmetric blocks compute each unordered pair of class blocks once, so their
                    floor is half of this (printed)

Both sides follow fastiaa's (paper) conventions so results can be compared: min-max over
the candidate classes (docs/method.md §4, official-code difference (c) off). The authors' code also loops over classes
for the distances themselves (one row per class); that variant is timed on a sample of
classes and extrapolated ("authors, row distances", marked ~).

Usage: python -m bench.bench_estimator [--small] [--sections cars sop] [--threads N]
                                       [--skip-lowrank] [--full-baseline] [--gpu-only]
(from the repository root)
Prints result differences (must be < 1e-6 relative) and Markdown tables. With CUDA present
it also times the GPU paths (Triton vs PyTorch) in this process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from bench.baselines import BETA, GAMMA, MOMENTUM, NEIGHBORS, TAU, AuthorsDense, AuthorsLoops
from bench.common import measure_in_child
from bench.synthetic import cars_like, sop_like
from fastiaa.iaa import DenseStatistics, LowRankStatistics

CARS = dict(n=8054, classes=98, dim=512)
SOP = dict(n=59551, classes=11318, dim=512)
SMALL_CARS = dict(n=2000, classes=25, dim=512)
SMALL_SOP = dict(n=5955, classes=1132, dim=512)


# ------------------------------------------------------------------ loaders (untimed) and methods

def load(path: str, kind: str, threads: int | None = None):
    """Inputs of one method: its estimator after the first refresh, the second refresh's data.
    ``threads`` overrides the child's torch thread count (default: every core)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    data = np.load(path)
    x0, x1 = torch.from_numpy(data["x0"]), torch.from_numpy(data["x1"])
    labels = torch.from_numpy(data["labels"])
    c, d = int(labels.max()) + 1, x0.shape[1]
    if kind == "full products":
        stats = DenseStatistics(c, d)
        stats.update(x1, labels)
        return stats.mean**2, stats.covariance()
    if kind == "authors dense":
        est = AuthorsDense(c, d)
    elif kind == "authors loops":
        est = AuthorsLoops(c, d)
    elif kind == "fastiaa low-rank":
        est = LowRankStatistics(c, d, momentum=MOMENTUM, max_history=1)
    else:
        est = DenseStatistics(c, d, covariance="full" if kind == "fastiaa full" else "diag", momentum=MOMENTUM)
    est.update(x0, labels)
    _release_free_heap()
    return est, x1, labels


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim) so that the timed call's own
    allocations raise the resident set and show in its peak, instead of reusing the pages
    the untimed first refresh left resident."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: peaks may then read low
        pass


def _authors(est) -> bool:
    return isinstance(est, (AuthorsDense, AuthorsLoops))


def refresh(est, x, labels):
    est.update(x, labels)
    if _authors(est):
        return {"mean": est.ave, "cov": est.cov}
    return {"mean": est.mean, "cov": est.covariance()}


def refresh_correct(est, x, labels):
    est.update(x, labels)
    if _authors(est):
        return {"mean": est.ave, "cov": est.corrected()}
    return {"mean": est.mean, "cov": est.corrected(num_neighbors=NEIGHBORS, beta=BETA, gamma=GAMMA, tau=TAU)}


SAMPLE_STEP = 10


def refresh_correct_sampled(est, x, labels):
    """The authors' refresh and distances in full, their correction loop on every
    SAMPLE_STEP-th class; the loop's time is reported for scaling."""
    est.update(x, labels)
    classes = list(range(0, est.ave.shape[0], SAMPLE_STEP))
    cov = est.corrected(classes=classes)
    return {"mean": est.ave, "cov": cov, "classes": classes, "loop_seconds": est.loop_seconds,
            "loop_cpu_seconds": est.loop_cpu_seconds}


def refresh_correct_lowrank(est, x, labels):
    est.update(x, labels)
    factor = est.corrected(num_neighbors=NEIGHBORS, beta=BETA, gamma=GAMMA, tau=TAU)
    return {"rows": factor.rows.shape[0], "entries": factor.entry_row.numel(), "factor_bytes": factor.nbytes(),
            "history_bytes": est.memory_bytes()}


def full_products(a, b):
    """The two full C x C x D Gram products behind the distance matrices (D_m, D_cv): the
    symmetric blocks need half of them."""
    a @ a.T
    b @ b.T
    return {}


def row_distance_sample(est, x, labels, sample: int = 100):
    """The authors' refresh, then their correction loop with per-class distance rows on
    ``sample`` classes: seconds of the refresh and per corrected class (for extrapolation)."""
    start = time.perf_counter()
    est.update(x, labels)
    update_seconds = time.perf_counter() - start
    est.corrected(row_distances=True, classes=range(sample))
    return {"update": update_seconds, "per_class": est.loop_seconds / sample}


# ------------------------------------------------------------------ main

def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run(name, path, kind, method, results, threads=None):
    m = measure_in_child(load, (path, kind, threads), method)
    results[name] = m
    print(f"  {name}: {m.seconds:.2f} s ({m.cpu_seconds:.2f} CPU s), peak +{m.peak_mib:.0f} MiB", flush=True)
    return m


def save(tmp: str, tag: str, x, labels) -> str:
    rng = np.random.default_rng(1)
    x1 = x + 0.3 * rng.standard_normal(x.shape, dtype=np.float32)
    path = os.path.join(tmp, f"{tag}.npz")
    np.savez(path, x0=x, x1=x1, labels=labels)
    return path


def describe(x, labels, name):
    sizes = np.bincount(labels)
    print(f"{name}: {len(x):,} x {x.shape[1]} float32, {len(sizes):,} classes of {sizes.min()}-{sizes.max()} "
          f"(mean {sizes.mean():.2f})", flush=True)


def cpu_section(args, tmp):
    cores = args.threads or len(os.sched_getaffinity(0))
    cars = SMALL_CARS if args.small else CARS
    sop = SMALL_SOP if args.small else SOP

    if "cars" in args.sections:
        cars_section(cars, cores, args, tmp)
    if "sop" in args.sections:
        sop_section(sop, cores, args, tmp)


def cars_section(cars, cores, args, tmp):
    x, labels = cars_like(**cars)
    describe(x, labels, "Cars-like")
    path = save(tmp, "cars", x, labels)
    res = {}
    run("authors dense", path, "authors dense", refresh, res, args.threads)
    run("fastiaa", path, "fastiaa", refresh, res, args.threads)
    run("fastiaa full", path, "fastiaa full", refresh, res, args.threads)
    a, f = res["authors dense"].result, res["fastiaa"].result
    print(f"  max relative difference fastiaa vs authors: mean {rel(f['mean'], a['mean']):.1e}, "
          f"covariance {rel(f['cov'], a['cov']):.1e}")
    diag_of_full = res["fastiaa full"].result["cov"].diagonal(dim1=1, dim2=2)
    print(f"  full vs diagonal (diag of full): {rel(diag_of_full, f['cov']):.1e}")
    base = res["authors dense"]
    print(f"\n| one refresh, Cars-like ({len(x):,} x {x.shape[1]}, {cores} CPU cores) | seconds | "
          "authors' time / time | peak MiB | authors' peak / peak |")
    print("|---|---|---|---|---|")
    for name, m in res.items():
        print(f"| {name} | {m.seconds:.3f} | {base.seconds / m.seconds:.1f} | {m.peak_mib:.0f} | "
              f"{base.peak_mib / max(m.peak_mib, 1):.1f} |")


def sop_section(sop, cores, args, tmp):
    x, labels = sop_like(**sop)
    describe(x, labels, "\nSOP-like")
    path = save(tmp, "sop", x, labels)
    res = {}
    baseline = refresh_correct if args.full_baseline else refresh_correct_sampled
    run("authors loops", path, "authors loops", baseline, res, args.threads)
    run("fastiaa", path, "fastiaa", refresh_correct, res, args.threads)
    run("full products: two C x C x D", path, "full products", full_products, res, args.threads)
    if not args.skip_lowrank:
        run("fastiaa low-rank full", path, "fastiaa low-rank", refresh_correct_lowrank, res, args.threads)
    rows = measure_in_child(load, (path, "authors loops", args.threads), row_distance_sample)
    a, f = res["authors loops"].result, res["fastiaa"].result
    base, base_cpu = res["authors loops"].seconds, res["authors loops"].cpu_seconds
    compared = slice(None)
    if not args.full_baseline:
        base += (SAMPLE_STEP - 1) * a["loop_seconds"]
        base_cpu += (SAMPLE_STEP - 1) * a["loop_cpu_seconds"]
        compared = a["classes"]
        print(f"  authors' correction loop: {a['loop_seconds']:.1f} s ({a['loop_cpu_seconds']:.1f} CPU s) for "
              f"{len(compared):,} classes; scaled total {base:.1f} s ({base_cpu:.1f} CPU s)")
    err = (f["cov"][compared].double() - a["cov"][compared].double()).abs().amax(1) / a["cov"].double().abs().max()
    print(f"  max relative difference fastiaa vs authors: mean {rel(f['mean'], a['mean']):.1e}, corrected "
          f"covariance {float(err.max()):.1e} over {err.numel():,} classes ({int((err > 1e-6).sum())} above 1e-6)")
    floor = res["full products: two C x C x D"]
    num_classes = len(np.bincount(labels))
    print(f"\n| refresh + neighbour correction, SOP-like ({len(x):,} x {x.shape[1]}, {num_classes:,} "
          f"classes, {cores} CPU {'core' if cores == 1 else 'cores'}) | seconds | CPU s | authors' time / time "
          "| authors' CPU / CPU | CPU / full products | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, m in res.items():
        seconds, cpu = (base, base_cpu) if name == "authors loops" else (m.seconds, m.cpu_seconds)
        mark = "" if args.full_baseline or name != "authors loops" else "~ "
        print(f"| {mark}{name} | {seconds:.2f} | {cpu:.2f} | {base / seconds:.1f} | {base_cpu / cpu:.1f} | "
              f"{cpu / floor.cpu_seconds:.2f} | {m.peak_mib:.0f} |")
    estimate = rows.result["update"] + rows.result["per_class"] * int(np.sum(np.bincount(labels) < TAU))
    print(f"| ~ authors, row distances (correction loop extrapolated from 100 classes) | ~{estimate:.0f} | - | "
          f"~{estimate / res['fastiaa'].seconds:.0f} | - | - | - |")

    print(f"\nthe symmetric blocks' floor, half the full products: {floor.seconds / 2:.2f} s "
          f"({floor.cpu_seconds / 2:.2f} CPU s)")
    if "fastiaa low-rank full" in res:
        lr = res["fastiaa low-rank full"].result
        print(f"\nlow-rank full covariance: {lr['rows']:,} rows, {lr['entries']:,} factor entries, factor "
              f"{lr['factor_bytes'] / 2**20:.0f} MiB, running rows {lr['history_bytes'] / 2**20:.0f} MiB "
              f"(dense [C, D, D] float32 would be {len(np.bincount(labels)) * x.shape[1]**2 * 4 / 2**30:.1f} GiB)")


def gpu_section(args):
    """Triton kernels vs the PyTorch path on CUDA (time per call, peak CUDA memory)."""
    import torch

    from fastiaa import kernels

    dev = "cuda"

    def timed(fn, repeat=5):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeat):
            out = fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeat, torch.cuda.max_memory_allocated() / 2**20, out

    print(f"\nGPU: {torch.cuda.get_device_name()}")
    print("| GPU | backend | seconds | peak MiB |")
    print("|---|---|---|---|")
    for tag, maker, shape in (("Cars", cars_like, SMALL_CARS if args.small else CARS),
                              ("SOP", sop_like, SMALL_SOP if args.small else SOP)):
        x, labels = maker(**shape)
        x, labels = torch.from_numpy(x).to(dev), torch.from_numpy(labels).to(dev)
        c = int(labels.max()) + 1
        outs = {}
        for backend in ("torch", "triton"):
            for full in ((False, True) if tag == "Cars" else (False,)):
                sec, peak, out = timed(lambda: kernels.class_moments(x, labels, c, full, backend=backend))
                outs[(backend, full)] = out
                print(f"| class_moments {tag} {'full' if full else 'diag'} | {backend} | {sec:.5f} | {peak:.0f} |")
            if tag == "SOP":
                def diag_refresh():
                    stats = DenseStatistics(c, x.shape[1], device=dev)
                    stats.update(x, labels, backend=backend)
                    return stats.corrected()
                sec, peak, _ = timed(diag_refresh, repeat=2)
                print(f"| refresh + correction SOP diag | {backend} | {sec:.3f} | {peak:.0f} |")
                if not args.skip_lowrank:
                    def lowrank_refresh():
                        stats = LowRankStatistics(c, x.shape[1], device=dev)
                        stats.update(x, labels, backend=backend)
                        return stats.corrected()
                    sec, peak, _ = timed(lowrank_refresh, repeat=1)
                    print(f"| refresh + correction SOP low-rank full | {backend} | {sec:.3f} | {peak:.0f} |")
        for key in outs:
            if key[0] == "triton":
                ref = outs[("torch", key[1])]
                print(f"  {tag} {'full' if key[1] else 'diag'}: Triton vs torch relative difference "
                      f"mean {rel(outs[key][1], ref[1]):.1e}, m2 {rel(outs[key][2], ref[2]):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a quarter of Cars and a tenth of SOP, for a quick run")
    parser.add_argument("--skip-lowrank", action="store_true", help="leave out the low-rank full covariance runs")
    parser.add_argument("--gpu-only", action="store_true", help="only the CUDA section")
    parser.add_argument("--sections", nargs="+", choices=("cars", "sop"), default=("cars", "sop"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per method (default: every core; 1 is steadier on a shared machine)")
    parser.add_argument("--full-baseline", action="store_true",
                        help="run the authors' correction loop over all classes (minutes) instead of a sample")
    args = parser.parse_args()
    if not args.gpu_only:
        with tempfile.TemporaryDirectory() as tmp:
            cpu_section(args, tmp)
    import torch

    if torch.cuda.is_available():
        gpu_section(args)
    else:
        print("\nGPU: not measured (no CUDA device)")


if __name__ == "__main__":
    main()
