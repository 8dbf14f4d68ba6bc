"""Train-pipeline benchmark (issue 5): images/s of fastiaa.pipelines, DALI against torchvision,
with the same number of CPU threads, on two kinds of JPEGs, in one run.

Data:
  kanji    the demo set's train split (data/kanji, or a small one built into a temp folder;
           bench.synthetic.kanji_root): small 96 px glyph JPEGs, so per-image overheads dominate.
  photos   500x500 JPEGs (quality 90, the size of SOP photos) cut from scikit-image's bundled
           colour photographs (random crops, flips and colour scaling; bench.synthetic.make_photos),
           so decoding is realistic.

Loaders, each in its own process (bench/common.py), built and run for one untimed warm-up epoch,
then timed over one epoch (docs/method.md §2 train transform: resize 256x256, random resized crop 224, flip,
ImageNet normalisation, float32 channels-last batches on the CPU). The loaders take turns for
--rounds rounds and each reports its best round (other load on a shared machine only slows a
run down), with the CPU time per image of all its processes (DataLoader workers included):
  dali          build_train_loader("dali"): DALI CPU pipeline, --threads threads
  torchvision   build_train_loader("torchvision"): PIL in --threads DataLoader workers
  authors       the authors' style (bench.baselines.AuthorsImages with the ImageNet 256/224 train
                AuthorsTransform): torchvision Resize, RandomResizedCrop, RandomHorizontalFlip,
                ToTensor, Normalize per sample in --threads workers, default collate

With CUDA present, a GPU section times the DALI GPU pipeline (mixed decode, fp16 output) on photos.

Usage: python -m bench.bench_pipeline [--threads 2] [--batch 64] [--iterations 8] [--rounds 3]
(from the repository root)
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.baselines import AuthorsImages, AuthorsTransform
from bench.common import measure_in_child
from bench.synthetic import kanji_root, make_photos

KINDS = ("dali", "torchvision", "authors")
LABELS = {"dali": "fastiaa DALI (CPU)", "torchvision": "fastiaa torchvision", "authors": "authors' loader"}


def load(kind: str, root: str, threads: int, batch: int, iterations: int, device: str):
    """Build the loader of ``kind`` on the train split of ``root`` and run one warm-up epoch."""
    import torch

    from fastiaa.data import BalancedBatchSampler, load_dataset
    from fastiaa.pipelines import NORMALIZATIONS, build_train_loader

    images = load_dataset("kanji", root).train
    for path in images.paths:   # page cache: time the pipeline, not the disk
        Path(path).read_bytes()
    sampler = BalancedBatchSampler(images.labels, batch, 4, iterations, seed=0)
    if kind == "authors":
        transform = AuthorsTransform(NORMALIZATIONS["imagenet"], True, resize_size=256, crop_size=224)
        loader = torch.utils.data.DataLoader(AuthorsImages(images, transform), batch_sampler=sampler,
                                             num_workers=threads, persistent_workers=threads > 0)
    else:
        dtype = torch.float16 if device == "cuda" else torch.float32
        loader = build_train_loader(kind, images, sampler, NORMALIZATIONS["imagenet"], "square",
                                    num_threads=threads, device=device, dtype=dtype)
    epoch(loader, 0)
    return (loader,)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (DataLoader workers), s."""
    import multiprocessing
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime
    return total


def epoch(loader, number: int = 1) -> tuple[int, float]:
    """One pass over ``loader`` (epoch ``number``): (images, CPU seconds of all its processes)."""
    import torch

    for obj in (loader, getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(number)
    start, count = cpu_seconds(), 0
    for batch in loader:
        images = batch.images if hasattr(batch, "images") else batch[0]
        count += images.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count, cpu_seconds() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=8, help="timed batches per loader")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        roots = {"kanji (96 px)": kanji_root(Path(tmp)), "photos (500x500)": make_photos(Path(tmp) / "photos")}
        rows = []
        for data, root in roots.items():
            speed, cost = {}, {}
            for _ in range(args.rounds):   # interleaved rounds, best of each: other load on the machine only slows
                for kind in KINDS:
                    m = measure_in_child(load, (kind, str(root), args.threads, args.batch, args.iterations, "cpu"),
                                         epoch)
                    (count, cpu) = m.result
                    speed[kind] = max(speed.get(kind, 0.0), count / m.seconds)
                    cost[kind] = min(cost.get(kind, float("inf")), 1000 * cpu / count)
                    print(f"{data:18s} {kind:12s} {count / m.seconds:8.0f} images/s "
                          f"{1000 * cpu / count:6.2f} CPU ms/image", flush=True)
            rows.append((data, speed, cost))

        print(f"\n### Train pipeline, CPU, {args.threads} threads, batch {args.batch}, 224 px float32 channels-last "
              f"(best of {args.rounds} rounds)\n")
        print("| data | loader | images/s | CPU ms / image (all processes) "
              "| DALI speed-up (images/s) | DALI speed-up (CPU / image) |")
        print("|---|---|---:|---:|---:|---:|")
        for data, speed, cost in rows:
            for kind in KINDS:
                print(f"| {data} | {LABELS[kind]} | {speed[kind]:.0f} | {cost[kind]:.2f} "
                      f"| {speed['dali'] / speed[kind]:.2f}x | {cost[kind] / cost['dali']:.2f}x |")

        import torch
        if torch.cuda.is_available():
            gpu_batch, gpu_iters = 256, 40
            m = measure_in_child(load, ("dali", str(roots["photos (500x500)"]), 8, gpu_batch, gpu_iters, "cuda"), epoch)
            print(f"\n### GPU ({torch.cuda.get_device_name()}): DALI mixed decode + augment, fp16, batch {gpu_batch}\n")
            print(f"| data | DALI GPU img/s |\n|---|---:|\n| photos (500x500) | {m.result[0] / m.seconds:.0f} |")
        else:
            print("\nGPU: not measured")


if __name__ == "__main__":
    main()
