"""``fastiaa`` command line: ``train``, ``eval`` and ``data`` (kanji demo, image check).

``fastiaa train`` takes the flag names of the authors' ``run.py`` (both ``-`` and ``_``
spellings; ``fastiaa.flags``), so their published commands run with ``python run.py`` replaced by
``fastiaa train``.
"""
from __future__ import annotations

import argparse
import json
import sys

from fastiaa import flags
from fastiaa.data import DATASETS

def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an embedding with IAA", description=(
        "Train an embedding with IAA. Takes the flags of the authors' run.py (both - and _ spellings); "
        "--preset DATASET applies the settings of their published command for that dataset first."))
    flags.add_train_flags(p)


def _cmd_train(args) -> int:
    if args.mode == "eval":
        raise SystemExit("--mode eval: use `fastiaa eval --checkpoint RUN_DIR/best.pt`")
    from fastiaa.train import train

    cfg = flags.config_from_args(args)
    best = train(cfg)
    comparison = cfg.run_dir() / "paper_comparison.md"
    if best and comparison.is_file():
        print(f"\nbest epoch {best['epoch']} ({comparison}):\n{comparison.read_text()}")
    return 0


def _cmd_eval(args) -> int:
    from fastiaa.train import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data=args.data, device=args.device,
                                  loader=args.loader)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_data(args) -> int:
    from fastiaa import data

    if args.what == "kanji":
        out = data.build_kanji(args.out, num_classes=args.classes, image_size=args.size, seed=args.seed,
                               install=not args.no_install, **({"fonts": args.fonts} if args.fonts else {}))
        print(f"kanji demo data ready in {out}")
        return 0
    dataset = data.load_dataset(args.dataset, args.data)
    sets = [s for s in (dataset.train, dataset.test, dataset.query, dataset.gallery) if s is not None]
    bad = data.check_images([p for s in sets for p in s.paths])
    for path, error in bad:
        print(f"unreadable: {path}: {error}", file=sys.stderr)
    print(f"{sum(len(s) for s in sets)} images checked, {len(bad)} unreadable")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastiaa", description="Fast IAA for deep metric learning")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    ev = sub.add_parser("eval", help="Recall@K / MAP@R / R-Precision of a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by `fastiaa train`")
    ev.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    ev.add_argument("--data", default=None, help="default: the checkpoint's data root")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--loader", default=None, help="torchvision | dali (default: the checkpoint's)")
    dp = sub.add_parser("data", help="prepare or check data")
    dsub = dp.add_subparsers(dest="what", required=True)
    kj = dsub.add_parser("kanji", help="render the kanji demo dataset (SOP on-disk format)")
    kj.add_argument("--out", default="data/kanji")
    kj.add_argument("--classes", type=int, default=2400, help="characters (classes), split in half train/test")
    kj.add_argument("--size", type=int, default=96, help="image side in pixels")
    kj.add_argument("--seed", type=int, default=0)
    kj.add_argument("--fonts", nargs="+", default=None, help="font names (default: the built-in 16)")
    kj.add_argument("--no-install", action="store_true", help="never apt-get install missing font packages")
    ck = dsub.add_parser("check", help="decode every image of a dataset and list unreadable files")
    ck.add_argument("--dataset", required=True, choices=DATASETS)
    ck.add_argument("--data", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors about the user's input print as one line (exit 2), not a traceback."""
    from fastiaa.data import DatasetError
    from fastiaa.errors import NonFiniteError

    args = build_parser().parse_args(argv)
    handler = {"train": _cmd_train, "eval": _cmd_eval, "data": _cmd_data}[args.command]
    try:
        return handler(args)
    except (DatasetError, FileNotFoundError, FileExistsError, ValueError, NonFiniteError) as error:
        print(f"fastiaa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastiaa {args.command}: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
