"""DistributedDataParallel scaling (issue 7): training steps/s with 1 and N processes.

Each configuration is a real ``torchrun --standalone --nproc-per-node N -m bench.bench_ddp
--worker ...`` launch of this module, from the repository root: every rank builds
``fastiaa.train.Trainer`` on the kanji demo data (global batch B split across the ranks, MS + IAA
with class statistics folded from random embeddings, bench.synthetic.random_statistics, as
bench_train does), runs one warm-up epoch, then times one epoch of ``--steps`` steps.
The CPU cores are divided evenly between the ranks (OMP_NUM_THREADS). On CUDA each rank drives
one GPU (NCCL); GPU numbers are printed only when measured.

Usage: python -m bench.bench_ddp [--data data/kanji] [--nproc 1 2] [--steps 6] [--batch 48]
       [--image-size 64] [--device cpu|cuda]   (from the repository root)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.synthetic import random_statistics

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from fastiaa.config import TrainConfig
    from fastiaa.train import Trainer

    cfg = TrainConfig.build(dataset="kanji", data=args.data, backbone="efficientnet_lite0",
                            image_size=args.image_size, resize_size=args.image_size + args.image_size // 8,
                            batch=args.batch, num_image_per_class=3, iter_per_epoch=args.steps, epochs=2,
                            start_epoch=0, eval_every=0, workers=1, device=args.device, save_dir=args.out,
                            name=f"ddp{args.nproc_label}")
    trainer = Trainer(cfg)
    random_statistics(trainer)
    trainer.train_epoch(1)  # warm-up: loader workers, allocator, first-touch
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_epoch(2)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if trainer.world.is_main:
        print(json.dumps({"nproc": trainer.world.world_size, "steps_per_s": args.steps / seconds,
                          "images_per_s": args.steps * args.batch / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/kanji")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="folder for the throwaway run directories")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nproc-label", default="1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import tempfile

    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench_ddp_"))
    torchrun = Path(sys.executable).with_name("torchrun")
    cores = os.cpu_count() or 1
    rows = []
    for nproc in args.nproc:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)), "PYTHONWARNINGS": "ignore"}
        if getattr(sys.flags, "safe_path", False):   # run with -P: the workers find bench as this process did
            env["PYTHONSAFEPATH"] = "1"
        command = [str(torchrun), "--standalone", f"--nproc-per-node={nproc}", "-m", "bench.bench_ddp", "--worker",
                   "--data", os.path.abspath(args.data), "--steps", str(args.steps), "--batch", str(args.batch),
                   "--image-size", str(args.image_size), "--device", args.device, "--out", out,
                   "--nproc-label", str(nproc)]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{nproc} process(es) failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]))
    base = rows[0]["steps_per_s"]
    print(f"\nDDP on {args.device}, global batch {args.batch}, {args.image_size} px, efficientnet_lite0, MS + IAA\n")
    print("| processes | steps/s | images/s | × 1 process |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['nproc']} | {row['steps_per_s']:.3f} | {row['images_per_s']:.1f} | "
              f"{row['steps_per_s'] / base:.2f}× |")


if __name__ == "__main__":
    main()
