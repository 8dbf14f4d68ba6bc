"""Decode once: the kanji demo's passes with the cache off and on (warm), in one run.

For each setting, a ``fastiaa.train.Trainer`` of the kanji preset (data/kanji, the loader of
``--loader``) is built, which with the cache on decodes both splits once (timed, "decode pass"),
then one untimed warm-up of each pass and one timed run of: the evaluation (the 19,200 test
images), a statistics refresh (the 19,200 train images) and a training epoch (40 steps of 96).
The model's forward alone on one real evaluation batch, fed as many times as the evaluation has
batches ("forward floor", timed in the cached process) is what no cache can remove from a pass: the
share of a pass's time above it is the data work.
``--train-runs`` also times the whole ``fastiaa train --preset kanji`` both ways (two full runs,
in child processes, one after the other; the metrics must agree).

Usage: python -m bench.bench_cache [--loader torchvision|dali] [--device cpu|cuda] [--train-runs]
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.synthetic import REPO


def passes(cache: str, loader: str, device: str, out: str) -> dict:
    """Seconds of the decode pass and of one warm evaluation, refresh and training epoch."""
    from fastiaa.config import PRESETS, TrainConfig
    from fastiaa.train import Trainer

    cfg = TrainConfig.build(**{**PRESETS["kanji"], "data": str(REPO / "data" / "kanji"), "loader": loader,
                               "device": device, "cache": cache, "save_dir": out, "name": cache})
    start = time.perf_counter()
    trainer = Trainer(cfg)
    built = time.perf_counter() - start
    times = {"build (decode pass when cached)": built}
    for name, run in (("evaluation", trainer.evaluate), ("refresh", lambda: trainer.refresh(3)),
                      ("training epoch", lambda: trainer.train_epoch(3))):
        run()  # warm-up: workers, allocator, and the first statistics for the synthesis of the epoch
        start = time.perf_counter()
        run()
        times[name] = time.perf_counter() - start
    times["forward floor"] = forward_floor(trainer, len(trainer.dataset.test))
    images = {"evaluation": len(trainer.dataset.test), "refresh": len(trainer.dataset.train),
              "training epoch": len(trainer.train_loader) * cfg.optim.batch}
    return {"seconds": times, "images": images}


def forward_floor(trainer, n: int) -> float:
    """Seconds of the eval-mode forward over ``n`` images in evaluation-sized batches: one real batch
    of the evaluation loader (its dtype and memory format) fed again and again, no data work."""
    import torch

    model, batch = trainer.model, trainer.cfg.eval.eval_batch
    x = next(iter(trainer.eval_loaders["test"])).images
    model.eval()
    with torch.no_grad(), torch.autocast(trainer.device.type, dtype=trainer.amp or torch.float32,
                                         enabled=trainer.amp is not None):
        model(x)  # warm-up
        start = time.perf_counter()
        for first in range(0, n, batch):
            model(x[:min(batch, n - first)])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - start


def train_run(cache: str, out: str) -> dict:
    """Wall seconds and final record of ``fastiaa train --preset kanji`` in a child process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastiaa", "train", "--preset", "kanji", "--data",
                    str(REPO / "data" / "kanji"), "--cache", cache, "--save-dir", out, "--name", cache],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    last = json.loads((Path(out) / cache / "metrics.jsonl").read_text().splitlines()[-1])
    return {"seconds": seconds, "recall@1": last["recall@1"], "map@r": last["map@r"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", default="torchvision", choices=["torchvision", "dali"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-runs", action="store_true", help="also time two whole kanji runs (minutes each)")
    args = parser.parse_args()
    if not (REPO / "data" / "kanji" / "Ebay_train.txt").is_file():
        sys.exit("bench_cache needs the kanji demo: run `make data` first")
    with tempfile.TemporaryDirectory() as out:
        results = {cache: passes(cache, args.loader, args.device, out) for cache in ("off", "ram")}
        runs = {cache: train_run(cache, out) for cache in ("off", "auto")} if args.train_runs else {}
    off, on = results["off"], results["ram"]
    print(f"\n| pass ({args.loader} loader, {args.device}) | images | cache off s | images/s | cache on s | images/s "
          "| speed-up |\n|---|---|---|---|---|---|---|")
    for name in ("evaluation", "refresh", "training epoch"):
        n, a, b = off["images"][name], off["seconds"][name], on["seconds"][name]
        print(f"| {name} | {n} | {a:.1f} | {n / a:.0f} | {b:.1f} | {n / b:.0f} | {a / b:.2f}x |")
    n, floor = on["images"]["evaluation"], on["seconds"]["forward floor"]
    print(f"| model forward alone (no data), evaluation-sized | {n} | | | {floor:.1f} | {n / floor:.0f} | |")
    name = "build (decode pass when cached)"
    print(f"| trainer build (cache on: the decode pass of both splits) | | {off['seconds'][name]:.1f} | | "
          f"{on['seconds'][name]:.1f} | | |")
    if runs:
        a, b = runs["off"], runs["auto"]
        print(f"\n| `fastiaa train --preset kanji` | wall s | Recall@1 | MAP@R |\n|---|---|---|---|\n"
              f"| --cache off | {a['seconds']:.0f} | {a['recall@1']:.4f} | {a['map@r']:.4f} |\n"
              f"| --cache auto | {b['seconds']:.0f} | {b['recall@1']:.4f} | {b['map@r']:.4f} |\n"
              f"\nmake train with the cache: {a['seconds'] / b['seconds']:.2f}x faster")


if __name__ == "__main__":
    main()
