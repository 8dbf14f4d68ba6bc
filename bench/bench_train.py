"""End-to-end training benchmark (issue 6): images/s of fastiaa's real trainer against the
authors' loop re-implemented from docs/method.md (bench.baselines.AuthorsTrainer), in the same run.

fastiaa rows run ``fastiaa.train.Trainer`` through its public methods: a warm-up
``train_epoch`` (loader workers or DALI pipeline, allocator, kernel compilation), then a timed
one: sampler -> pipeline -> model -> IAA synthesis -> loss -> optimiser step, with the loss read
back every step as the trainer does. With IAA on, the class statistics are filled from random
embeddings instead of a refresh (bench.synthetic.random_statistics, ``Trainer.iaa.fold``; a
step's cost does not depend on their values). Then, per backbone in ``--stage-backbones``, one
statistics refresh over the train set (``Trainer.refresh``: embed + class moments + neighbour
correction + sampling factor) and one evaluation (``Trainer.evaluate``: embed + Recall@K /
MAP@R / RP), each timed after a warm-up pass, as images/s.

Configurations per backbone: IAA on / off x "fast" on / off, where fast = AMP (bf16, or fp16
on GPUs without bf16) + channels-last, and off = float32 channels-first; the authors' loop is
float32 channels-first with PIL per-sample transforms, per-class estimator loops, a per-sample
synthesis loop and a per-anchor Multi-Similarity loop. "x authors" divides by the authors' row
of the same backbone and IAA setting.

Sizes:
  CPU (default when no GPU): GoogLeNet (--full: all three), batch 60 (20 classes x 3), 96 px
    crops of 112 px resizes, 3 timed steps; data: the first 48 train and 48 test classes of
    the kanji demo (data/kanji, or a small build in a temp folder; bench.synthetic.kanji_subset),
    768 images each; the
    authors' refresh and evaluation on the first 30 classes (480 images).
  CUDA: GoogLeNet (batch 180), BN-Inception and ResNet-50 (batch 256) at 224 px crops of 256 px
    resizes, M = 3, 512-d (the authors' SOP settings, docs/method.md §7), 10 timed steps; data: Stanford
    Online Products-shaped lists (bench.synthetic.sop_shaped: 59,551 train images in 11,318
    classes, 60,502 test images in 11,316 classes, 2-12 per class) over a pool of 256 generated
    500x500 JPEGs
    (bench.synthetic.make_photos), so decoding costs what a SOP photo costs. fastiaa's refresh
    and evaluation run over the whole sets; the authors' on the first classes holding
    --authors-images (6,000) images (their images/s barely depends on the count), and their
    correction loop on every n-th class with its time scaled by n (marked ~).
Configurations run in priority order (GoogLeNet's IAA rows first); --budget-s skips the rest
once spent, and --out is rewritten after every configuration.
With CUDA, the full-size GoogLeNet rows also give a projected wall time of a 100-epoch SOP
reproduction (``make reproduce DATASET=stanford``).

Usage: python -m bench.bench_train [--device auto|cpu|cuda] [--full] [--backbones ...]
       [--steps N] [--batch B] [--image-size PX] [--loader torchvision|dali] [--budget-s S]
       [--out FILE.md]   (from the repository root)
Prints Markdown tables (and writes them to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.baselines import AuthorsTrainer
from bench.common import use_all_cores
from bench.synthetic import SOP_TEST, SOP_TRAIN, kanji_subset, random_covariance, random_statistics, sop_shaped

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("googlenet", "bninception", "resnet50")
RECALL_KS = (1, 10, 100, 1000)                          # SOP's K, docs/method.md §8
KANJI_KS = (1, 2, 4, 8)
KANJI_CLASSES = 48                                      # CPU: 768 train and 768 test images


# ------------------------------------------------------------------ data

def head_classes(images, max_images: int | None):
    """The ImageSet restricted to its first classes (label order) holding at most ``max_images``
    images (all of it when None or larger), labels renumbered from 0."""
    from fastiaa.data import ImageSet

    if max_images is None or max_images >= len(images):
        return images
    counts = np.bincount(images.labels, minlength=images.num_classes)
    keep = max(1, int(np.searchsorted(np.cumsum(counts), max_images, side="right")))
    rows = np.flatnonzero(images.labels < keep)
    return ImageSet(tuple(images.paths[i] for i in rows), images.labels[rows], images.class_ids[:keep])


# ------------------------------------------------------------------ settings

@dataclasses.dataclass
class Scale:
    device: str
    crop: int
    resize: int
    steps: int
    workers: int
    eval_batch: int
    loader: str
    batch: int | None             # None: the authors' SOP batch of each backbone
    authors_images: int | None    # cap on the authors' refresh / evaluation sets
    ks: tuple[int, ...]           # Recall@K
    full_size: bool               # SOP-sized data and settings (projection allowed)


def make_scale(args) -> Scale:
    cuda = args.device == "cuda"
    loader = args.loader or ("dali" if cuda and _dali_importable() else "torchvision")
    return Scale(device=args.device, crop=args.image_size or (224 if cuda else 96),
                 resize=args.resize_size or (256 if cuda else 112), steps=args.steps or (10 if cuda else 3),
                 workers=args.workers or (min(16, os.cpu_count() or 1) if cuda else 2),
                 eval_batch=256 if cuda else 128, loader=loader, batch=args.batch or (None if cuda else 60),
                 authors_images=args.authors_images or (6000 if cuda else 480), ks=RECALL_KS if cuda else KANJI_KS,
                 full_size=cuda and not (args.image_size or args.resize_size or args.batch))


def _dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def train_config(scale: Scale, root: Path, backbone: str, intra: bool, fast: bool, workdir: str):
    """TrainConfig of the authors' SOP command for ``backbone`` (docs/method.md §7) at ``scale``."""
    from fastiaa.config import TrainConfig, preset_overrides

    values = preset_overrides("stanford", backbone)
    values.update(data=str(root), pretrained=False, image_size=scale.crop, resize_size=scale.resize,
                  loader=scale.loader, workers=scale.workers, eval_batch=scale.eval_batch,
                  iter_per_epoch=scale.steps, start_epoch=0, warmup_epoch=0, intra=intra, correction="on",
                  recall=scale.ks, eval_every=0, device=scale.device, amp="auto" if fast else "off",
                  channels_last=fast, save_dir=workdir, name=f"{backbone}_{intra}_{fast}")
    if scale.batch:
        values["batch"] = scale.batch
    return TrainConfig.build(**values)


# ------------------------------------------------------------------ measurements

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fastiaa_train(cfg) -> dict:
    """Images/s of one timed ``train_epoch`` after a warm-up epoch."""
    from fastiaa.train import Trainer

    trainer = Trainer(cfg)
    if cfg.iaa.intra:
        random_statistics(trainer)
    trainer.train_epoch(1)
    record = trainer.train_epoch(2)
    _sync(cfg.runtime.device)
    out = {"images_per_s": record["images_per_s"], "batch": cfg.optim.batch, "amp": str(trainer.amp or "float32")}
    del trainer
    _release()
    return out


def fastiaa_stages(cfg) -> dict:
    """Seconds of one statistics refresh over the train set and one evaluation, each after a
    warm-up pass of the same call."""
    from fastiaa.train import Trainer

    trainer = Trainer(cfg)
    out = {}
    for stage, call, images in (("refresh", lambda: trainer.refresh(1), len(trainer.dataset.train)),
                                ("evaluate", trainer.evaluate, len(trainer.dataset.test))):
        call()
        _sync(cfg.runtime.device)
        start = time.perf_counter()
        call()
        _sync(cfg.runtime.device)
        out[stage] = {"seconds": time.perf_counter() - start, "images": images, "extrapolated": False}
    del trainer
    _release()
    return out


def authors_trainer(cfg, scale: Scale, intra: bool, stages: bool = False) -> AuthorsTrainer:
    """The authors' loop with the settings of ``cfg`` (a TrainConfig) on the same data."""
    from fastiaa.data import load_dataset

    f = cfg.flat()
    dataset = load_dataset(f["dataset"], f["data"])
    train, test = dataset.train, dataset.test
    if stages:
        train, test = head_classes(train, scale.authors_images), head_classes(test, scale.authors_images)
    iterations = min(len(train) // f["batch"], f["iter_per_epoch"])
    return AuthorsTrainer(f["backbone"], train, test, batch=f["batch"], images_per_class=f["num_image_per_class"],
                          iterations=iterations, resize_size=f["resize_size"], crop_size=f["image_size"],
                          workers=f["workers"], device=f["device"], eval_batch=f["eval_batch"], intra=intra,
                          lam=f["intra_lamda"], aug_num=f["aug_num"], lr=f["lr"], weight_decay=f["weight_decay"],
                          embedding_size=f["embedding_size"], seed=f["seed"])


def authors_train(cfg, scale: Scale) -> dict:
    trainer = authors_trainer(cfg, scale, cfg.iaa.intra)
    if cfg.iaa.intra:   # stands in for a refresh, as random_statistics does for fastiaa's rows
        train = trainer.train_set
        trainer.covariance = random_covariance(train.labels, train.num_classes, cfg.model.embedding_size,
                                               trainer.device)
    trainer.train_epoch(1)
    record = trainer.train_epoch(2)
    del trainer
    _release()
    return {"images_per_s": record["images_per_s"], "batch": cfg.optim.batch, "amp": "float32"}


def authors_stages(cfg, scale: Scale) -> dict:
    trainer = authors_trainer(cfg, scale, True, stages=True)
    every = max(1, round(trainer.train_set.num_classes / 500)) if scale.device == "cuda" else 1
    trainer.refresh(every)            # warm-up (loader workers, allocator)
    refresh = trainer.refresh(every)
    trainer.evaluate(scale.ks)
    evaluate = trainer.evaluate(scale.ks)
    del trainer
    _release()
    return {"refresh": refresh, "evaluate": {"seconds": evaluate["seconds"], "images": evaluate["images"],
                                             "extrapolated": False}}


# ------------------------------------------------------------------ report

def environment(device: str) -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
        try:
            model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
            hardware = f"{model}, {len(os.sched_getaffinity(0))} cores"
        except (OSError, StopIteration):
            pass
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{datetime.date.today().isoformat()}, {hardware}{load}, torch {torch.__version__}, "
            f"commit {commit}")


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def rate(value: float | None, approx: bool = False) -> str:
    return "not run" if value is None else f"{'~' if approx else ''}{value:,.1f}"


def image_count(stage: dict | None) -> str:
    return f"{stage['images']:,}" if stage else "-"


def projection(train_off: float, train_on: float, refresh: float, evaluate: float) -> str:
    """Wall time of ``make reproduce DATASET=stanford`` from measured images/s (docs/method.md §2, §3, §7):
    100 epochs of min(59,551 // 180, 300) = 300 steps of 180 images, IAA from epoch 31 on, a
    refresh over the train set every 2nd epoch from 31 (35 refreshes), an evaluation before
    training and after every epoch (101)."""
    from fastiaa.config import PRESETS, TrainConfig

    cfg = TrainConfig.build(**PRESETS["stanford"])
    optim, iaa = cfg.optim, cfg.iaa
    per_epoch = min(SOP_TRAIN[0] // optim.batch, optim.iter_per_epoch) * optim.batch
    epochs_on = optim.epochs - iaa.start_epoch
    refreshes = len(range(iaa.start_epoch + 1, optim.epochs + 1, iaa.update_every_M_epoch))
    seconds = {"train": per_epoch * (iaa.start_epoch / train_off + epochs_on / train_on),
               "refresh": refreshes * SOP_TRAIN[0] / refresh,
               "evaluate": (optim.epochs + 1) * SOP_TEST[0] / evaluate}
    total = sum(seconds.values())
    parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
    return (f"Projected 100-epoch SOP reproduction (GoogLeNet MS + IAA, preset stanford), from the rows above: "
            f"{total / 60:.1f} min ({parts}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--full", action="store_true", help="all three backbones on the CPU too")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES)
    parser.add_argument("--stage-backbones", nargs="+", choices=BACKBONES,
                        help="backbones whose refresh and evaluation are timed (default: the first)")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (after as many warm-up steps)")
    parser.add_argument("--batch", type=int, help="batch size for every backbone (default: CPU 60, CUDA the "
                                                  "authors' 180 / 256)")
    parser.add_argument("--image-size", type=int, help="crop size in px (CPU 96, CUDA 224)")
    parser.add_argument("--resize-size", type=int, help="resize before the crop (CPU 112, CUDA 256)")
    parser.add_argument("--workers", type=int, help="loader workers / DALI threads (CPU 2, CUDA min(16, cores))")
    parser.add_argument("--loader", choices=["torchvision", "dali"], help="fastiaa's loader (CUDA: dali if importable)")
    parser.add_argument("--authors-images", type=int,
                        help="images of the authors' refresh and evaluation sets (CPU 480, CUDA 6,000)")
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' loop")
    parser.add_argument("--budget-s", type=float, help="skip the remaining configurations after this many seconds")
    parser.add_argument("--data", type=Path, help="folder for the generated data (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="also write the Markdown tables here")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    use_all_cores()
    scale = make_scale(args)
    backbones = args.backbones or (BACKBONES if args.device == "cuda" or args.full else BACKBONES[:1])
    stage_backbones = args.stage_backbones or backbones[:1]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data_dir = args.data or Path(tmp)
        root = sop_shaped(data_dir) if args.device == "cuda" else kanji_subset(data_dir, KANJI_CLASSES)
        runs = tempfile.mkdtemp(dir=tmp)
        jobs = []   # (priority, backbone, method, intra, fast); authors rows never use the fast path
        for rank, backbone in enumerate(backbones):
            jobs += [(2 * rank, backbone, "fastiaa", True, True), (2 * rank + 1, backbone, "fastiaa", False, True),
                     (2 * rank + 1, backbone, "fastiaa", True, False), (2 * rank + 2, backbone, "fastiaa", False, False)]
            if not args.no_authors:
                jobs += [(2 * rank, backbone, "authors", True, False), (2 * rank + 2, backbone, "authors", False, False)]
            if backbone in stage_backbones:
                jobs += [(2 * rank, backbone, "fastiaa stages", True, True)]
                if not args.no_authors:
                    jobs += [(2 * rank, backbone, "authors stages", True, False)]
        results = {}
        for _, backbone, method, intra, fast in sorted(jobs, key=lambda j: j[0]):
            key = (backbone, method, intra, fast)
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                print(f"skipped (time budget): {key}", flush=True)
                continue
            cfg = train_config(scale, root, backbone, intra, fast, runs)
            run = {"fastiaa": fastiaa_train, "fastiaa stages": fastiaa_stages}.get(method)
            t = time.perf_counter()
            try:
                if run is not None:
                    results[key] = run(cfg)
                else:
                    results[key] = (authors_train if method == "authors" else authors_stages)(cfg, scale)
            except Exception as err:  # report and go on: one broken configuration must not hide the others
                print(f"FAILED {key}: {type(err).__name__}: {err}", flush=True)
                _release()
                continue
            print(f"done {key} in {time.perf_counter() - t:.1f} s: {results[key]}", flush=True)
            if args.out:   # after every configuration, so a run stopped from outside leaves its rows
                write(args.out, report(results, backbones, stage_backbones, scale, args))

    text = report(results, backbones, stage_backbones, scale, args)
    print("\n" + text)
    if args.out:
        write(args.out, text)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def report(results: dict, backbones, stage_backbones, scale: Scale, args) -> str:
    data = ("SOP-shaped lists (59,551 train / 60,502 test images) over 256 generated 500x500 JPEGs"
            if scale.device == "cuda" else
            f"kanji demo, first {KANJI_CLASSES} train / {KANJI_CLASSES} test classes of 16 images")
    lines = [f"### Training throughput, end to end (bench_train.py, {scale.device})", "",
             f"{environment(scale.device)}. Data: {data}; {scale.crop} px crops of {scale.resize} px resizes, "
             f"M = 3, 512-d, m = 3 per class; {scale.steps} timed steps after {scale.steps} warm-up steps; "
             f"fastiaa loader {scale.loader}, {scale.workers} workers (the authors' DataLoader as many). "
             f"Command: `python -m bench.bench_train {' '.join(sys.argv[1:])}`.", "",
             "| backbone | method | IAA | AMP + channels-last | batch | train images/s | x authors |",
             "|---|---|---|---|---|---|---|"]
    for backbone in backbones:
        base = {intra: results.get((backbone, "authors", intra, False), {}).get("images_per_s") for intra in (True, False)}
        for method, intra, fast in (("fastiaa", True, True), ("fastiaa", True, False), ("fastiaa", False, True),
                                    ("fastiaa", False, False), ("authors", True, False), ("authors", False, False)):
            if method == "authors" and args.no_authors:
                continue
            r = results.get((backbone, method, intra, fast), {})
            value = r.get("images_per_s")
            amp = f"on ({r['amp'].replace('torch.', '')})" if fast and r else ("on" if fast else "off (float32)")
            lines.append(f"| {backbone} | {'fastiaa Trainer' if method == 'fastiaa' else 'authors loop'} | "
                         f"{'on' if intra else 'off'} | {amp} | {r.get('batch', '-')} | {rate(value)} | "
                         f"{ratio(value, base[intra])} |")
    lines += ["", "| backbone | stage | fastiaa images | fastiaa images/s | authors images | authors images/s | x authors |",
              "|---|---|---|---|---|---|---|"]
    for backbone in stage_backbones:
        fast = results.get((backbone, "fastiaa stages", True, True), {})
        slow = results.get((backbone, "authors stages", True, False), {})
        for stage, title in (("refresh", "statistics refresh (train set)"), ("evaluate", "evaluation (test set)")):
            f, s = fast.get(stage), slow.get(stage)
            fv = f["images"] / f["seconds"] if f else None
            sv = s["images"] / s["seconds"] if s else None
            lines.append(f"| {backbone} | {title} | {image_count(f)} | {rate(fv)} | {image_count(s)} | "
                         f"{rate(sv, bool(s and s['extrapolated']))} | {ratio(fv, sv)} |")
    lines += ["", "~: the authors' correction loop ran on a sample of the classes and its time was scaled up."
              if any(r.get("refresh", {}).get("extrapolated") for r in results.values()) else
              "All rows measured in full (no extrapolation)."]
    g = "googlenet"
    parts = [results.get((g, "fastiaa", False, True), {}).get("images_per_s"),
             results.get((g, "fastiaa", True, True), {}).get("images_per_s"),
             results.get((g, "fastiaa stages", True, True), {})]
    if scale.full_size and parts[0] and parts[1] and parts[2]:
        st = parts[2]
        lines += ["", projection(parts[0], parts[1], st["refresh"]["images"] / st["refresh"]["seconds"],
                                 st["evaluate"]["images"] / st["evaluate"]["seconds"])]
    elif not scale.full_size:
        lines += ["", "Reduced size: no reproduction wall time is projected from these rows."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
