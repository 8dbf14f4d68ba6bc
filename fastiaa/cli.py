"""``fastiaa`` command line: ``train``, ``eval`` and ``data`` (kanji demo, image check).

``fastiaa train`` takes the flag names of the authors' ``run.py`` (both ``-`` and ``_``
spellings), so their published commands run with ``python run.py`` replaced by
``fastiaa train``; ``--preset DATASET`` applies the settings of their published command for
that dataset (docs/method.md §7) before the explicit flags. Every flag is a field of
``fastiaa.config.TrainConfig`` of the same name; the choices come from the registries.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fastiaa import registry
from fastiaa.config import PRESETS, TUPLE_FIELDS, TrainConfig, preset_overrides
from fastiaa.data import DATASETS

COVARIANCES = ("diag", "full", "lowrank", "auto")


def _flag(name: str) -> list[str]:
    """``--lr-decay-epochs`` and ``--lr_decay_epochs`` alike (the authors mix both styles)."""
    dashed, under = "--" + name.replace("_", "-"), "--" + name.replace("-", "_")
    return [dashed] if dashed == under else [dashed, under]


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _choice(*names):
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"choose one of {', '.join(names)} (got {text!r})")
        return text
    return parse


def _loss(text: str) -> str:
    try:
        return registry.loss_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# (config field, type, help); nargs="+" for tuple fields. Defaults come from TrainConfig.
TRAIN_FLAGS = [
    ("dataset", _choice(*DATASETS), f"one of {', '.join(DATASETS)}"),
    ("data", str, "dataset root in its official layout (default ./MyDataset; kanji: data/kanji)"),
    ("backbone", _choice(*registry.BACKBONES), f"one of {', '.join(registry.BACKBONES)}"),
    ("pretrained", _bool, "1: ImageNet weights from --weight_path; 0: from scratch"),
    ("weight_path", str, "ImageNet checkpoint file or folder (standard file names; default: torch hub cache)"),
    ("embedding-size", _positive(int), "embedding dimension D"),
    ("image-size", _positive(int), "crop size fed to the model"),
    ("resize-size", _positive(int), "resize before cropping"),
    ("loader", _choice("torchvision", "dali"), "torchvision | dali"),
    ("workers", _non_negative_int, "data-loading threads / processes"),
    ("loss", _loss, "MS | Contrastive | Triplet"),
    ("lr", _positive(float), "learning rate of the backbone"),
    ("head-lr-mult", _positive(float), "embedding layer lr multiplier (paper: 10)"),
    ("weight_decay", float, "Adam weight decay"),
    ("epochs", _positive(int), "number of epochs"),
    ("lr-decay-epochs", int, "epochs at which the lr is multiplied by --lr-decay-gamma"),
    ("lr-decay-gamma", float, "lr decay factor"),
    ("batch", _positive(int), "global batch size B"),
    ("eval_batch", _positive(int), "batch size of embedding passes"),
    ("num_image_per_class", _positive(int), "images per class m in a batch"),
    ("iter-per-epoch", _positive(int), "iterations per epoch (capped at len(train) // batch)"),
    ("intra", _bool, "1: IAA synthesis on; 0: the plain loss"),
    ("intra_lamda", float, "lambda of Eq. 17"),
    ("aug_num", _positive(int), "synthetic samples per embedding (M)"),
    ("start_epoch", int, "first statistics refresh after this epoch"),
    ("warmup_epoch", int, "epochs between the first refresh and synthesis"),
    ("update_every_M_epoch", _positive(int), "refresh period in epochs"),
    ("momentum", float, "estimator momentum (docs/method.md §3)"),
    ("covariance", _choice(*COVARIANCES),
     "diag (the paper) | full (dense [C,D,D]) | lowrank (full, low-rank form) | auto (full: dense unless > 2 GiB)"),
    ("correction", _choice("auto", "on", "off"), "neighbour correction: auto (train classes > 1000) | on | off"),
    ("num_neighbor", _positive(int), "K neighbour classes (Eq. 11)"),
    ("beta", float, "beta of the alpha_k rule (Eq. 15)"),
    ("gamma", float, "share of the global covariance (Eq. 16)"),
    ("tau", float, "classes with n >= tau are not corrected"),
    ("official-uncorrected-sampling", _bool, "official quirk: sample from the uncorrected covariance"),
    ("official-repeated-sqrt", _bool, "official quirk: sample m uses Sigma^(1/2^m)"),
    ("official-zero-mean-singletons", _bool, "official quirk: single-sample classes keep a zero mean"),
    ("official-sentinel-normalization", _bool, "official quirk: min-max over rows holding the 1e12 sentinel"),
    ("recall", _positive(int), "Recall@K values (default: the dataset's standard K)"),
    ("map", _bool, "1: compute MAP@R and R-Precision"),
    ("eval-every", _non_negative_int, "evaluate every N epochs (0: never)"),
    ("device", str, "auto | cpu | cuda | cuda:N"),
    ("amp", _choice("auto", "off", "bf16", "fp16"), "auto | off | bf16 | fp16 (torch.autocast)"),
    ("channels-last", _bool, "channels-last memory format"),
    ("kernels", _choice("auto", "triton", "torch"), "auto | triton | torch"),
    ("work-memory-mib", _positive(float), "memory budget of temporary blocks (class moments, correction, evaluation)"),
    ("log-every", _positive(int), "steps between reads of the loss from the device (progress bar, NaN check)"),
    ("seed", int, "random seed"),
    ("save-dir", str, "folder of run directories"),
    ("name", str, "run directory name (default derived from the settings)"),
]


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an embedding with IAA", description=(
        "Train an embedding with IAA. Takes the flags of the authors' run.py (both - and _ spellings); "
        "--preset DATASET applies the settings of their published command for that dataset first."))
    p.add_argument("--preset", choices=sorted(PRESETS), help="apply the authors' settings for this dataset first")
    for name, kind, text in TRAIN_FLAGS:
        dest = name.replace("-", "_")
        p.add_argument(*_flag(name), dest=dest, type=kind, default=None, help=text,
                       nargs="+" if dest in TUPLE_FIELDS else None)
    p.add_argument("--diag", dest="diag", type=_bool, default=None,
                   help="authors' flag: 1 = --covariance diag, 0 = --covariance auto")
    p.add_argument("--resume", action="store_true", help="continue the run in its directory from last.pt")
    p.add_argument("--gpu-id", dest="gpu_id", type=int, default=None, help="authors' flag: --device cuda:N")
    p.add_argument("--mode", choices=["train", "eval"], default="train", help="authors' flag (eval: see `fastiaa eval`)")
    p.add_argument("--save_models", action="store_true", help="authors' flag (checkpoints are always saved)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < preset < explicit flags."""
    values: dict = {}
    if args.preset:
        values.update(preset_overrides(args.preset, args.backbone, args.loss))
    names = [name.replace("-", "_") for name, _, _ in TRAIN_FLAGS]
    values.update({name: getattr(args, name) for name in names if getattr(args, name) is not None})
    if args.diag is not None and args.covariance is None:
        values["covariance"] = "diag" if args.diag else "auto"
    if args.gpu_id is not None:
        values["device"] = f"cuda:{args.gpu_id}"
    values["resume"] = args.resume
    dataset = values.get("dataset", TrainConfig().data.dataset)
    if "data" not in values:
        values["data"] = "data/kanji" if dataset == "kanji" else "MyDataset"
    values["data"] = os.path.abspath(values["data"])  # a checkpoint's config works from any folder
    return TrainConfig.build(**values)


def _cmd_train(args) -> int:
    if args.mode == "eval":
        raise SystemExit("--mode eval: use `fastiaa eval --checkpoint RUN_DIR/best.pt`")
    from fastiaa.train import train

    cfg = config_from_args(args)
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


def _show_reports() -> None:
    """fastiaa's one-line reports (e.g. the evaluator's backend choice) on stderr."""
    log = logging.getLogger("fastiaa")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fastiaa: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors about the user's input print as one line (exit 2), not a traceback."""
    from fastiaa.data import DatasetError
    from fastiaa.errors import NonFiniteError

    args = build_parser().parse_args(argv)
    _show_reports()
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
