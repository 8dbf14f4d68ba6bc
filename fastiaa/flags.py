"""The flags of ``fastiaa train``: the authors' ``run.py`` names (both ``-`` and ``_`` spellings),
each a field of ``fastiaa.config.TrainConfig`` of the same name, the choices from the registries.

``fastiaa train`` parses them from the command line and ``fastiaa sweep`` from the flags of a sweep
file (:func:`parse_train_flags`, :func:`train_flag`), so both validate and spell them alike.
``--preset DATASET`` applies the settings of the authors' published command for that dataset
(docs/method.md §7) before the explicit flags. No torch here: the command line starts fast.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import os

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


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def choice(*names):
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
    ("dataset", choice(*DATASETS), f"one of {', '.join(DATASETS)}"),
    ("data", str, "dataset root in its official layout (default ./MyDataset; kanji: data/kanji)"),
    ("backbone", choice(*registry.BACKBONES), f"one of {', '.join(registry.BACKBONES)}"),
    ("pretrained", _bool, "1: ImageNet weights from --weight_path; 0: from scratch"),
    ("weight_path", str, "ImageNet checkpoint file or folder (standard file names; default: torch hub cache)"),
    ("embedding-size", positive(int), "embedding dimension D"),
    ("image-size", positive(int), "crop size fed to the model"),
    ("resize-size", positive(int), "resize before cropping"),
    ("loader", choice("torchvision", "dali"), "torchvision | dali"),
    ("cache", choice("off", "auto", "ram", "device"),
     "decode once: off | auto (GPU memory if it fits, else host memory, else off) | ram | device"),
    ("cache-gib", positive(float), "memory budget of the cache (default: half of the free memory)"),
    ("cache-dir", str, "keep the decoded images in a file here, shared by later runs"),
    ("workers", non_negative_int, "data-loading threads / processes"),
    ("loss", _loss, "MS | Contrastive | Triplet"),
    ("lr", positive(float), "learning rate of the backbone"),
    ("head-lr-mult", positive(float), "embedding layer lr multiplier (paper: 10)"),
    ("weight_decay", float, "Adam weight decay"),
    ("epochs", positive(int), "number of epochs"),
    ("lr-decay-epochs", int, "epochs at which the lr is multiplied by --lr-decay-gamma"),
    ("lr-decay-gamma", float, "lr decay factor"),
    ("batch", positive(int), "global batch size B"),
    ("eval_batch", positive(int), "batch size of embedding passes"),
    ("num_image_per_class", positive(int), "images per class m in a batch"),
    ("iter-per-epoch", positive(int), "iterations per epoch (capped at len(train) // batch)"),
    ("intra", _bool, "1: IAA synthesis on; 0: the plain loss"),
    ("intra_lamda", float, "lambda of Eq. 17"),
    ("aug_num", positive(int), "synthetic samples per embedding (M)"),
    ("start_epoch", int, "first statistics refresh after this epoch"),
    ("warmup_epoch", int, "epochs between the first refresh and synthesis"),
    ("update_every_M_epoch", positive(int), "refresh period in epochs"),
    ("momentum", float, "estimator momentum (docs/method.md §3)"),
    ("covariance", choice(*COVARIANCES),
     "diag (the paper) | full (dense [C,D,D]) | lowrank (full, low-rank form) | auto (full: dense unless > 2 GiB)"),
    ("correction", choice("auto", "on", "off"), "neighbour correction: auto (train classes > 1000) | on | off"),
    ("num_neighbor", positive(int), "K neighbour classes (Eq. 11)"),
    ("beta", float, "beta of the alpha_k rule (Eq. 15)"),
    ("gamma", float, "share of the global covariance (Eq. 16)"),
    ("tau", float, "classes with n >= tau are not corrected"),
    ("official-uncorrected-sampling", _bool, "official quirk: sample from the uncorrected covariance"),
    ("official-repeated-sqrt", _bool, "official quirk: sample m uses Sigma^(1/2^m)"),
    ("official-zero-mean-singletons", _bool, "official quirk: single-sample classes keep a zero mean"),
    ("official-sentinel-normalization", _bool, "official quirk: min-max over rows holding the 1e12 sentinel"),
    ("recall", positive(int), "Recall@K values (default: the dataset's standard K)"),
    ("map", _bool, "1: compute MAP@R and R-Precision"),
    ("eval-every", non_negative_int, "evaluate every N epochs (0: never)"),
    ("device", str, "auto | cpu | cuda | cuda:N"),
    ("amp", choice("auto", "off", "bf16", "fp16"), "auto | off | bf16 | fp16 (torch.autocast)"),
    ("channels-last", _bool, "channels-last memory format"),
    ("kernels", choice("auto", "triton", "torch"), "auto | triton | torch"),
    ("work-memory-mib", positive(float), "memory budget of temporary blocks (class moments, correction, evaluation)"),
    ("log-every", positive(int), "steps between reads of the loss from the device (progress bar, NaN check)"),
    ("seed", int, "random seed"),
    ("save-dir", str, "folder of run directories"),
    ("name", str, "run directory name (default derived from the settings)"),
]


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Add every flag of ``fastiaa train`` to ``p`` (defaults ``None``: :func:`config_from_args` fills them)."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="apply the authors' settings for this dataset first")
    for name, kind, text in TRAIN_FLAGS:
        dest = name.replace("-", "_")
        p.add_argument(*_flag(name), dest=dest, type=kind, default=None, help=text,
                       nargs="+" if dest in TUPLE_FIELDS else None)
    p.add_argument("--allow-unusual", dest="allow_unusual", action="store_true",
                   help="accept settings outside the method's ranges (e.g. lambda > 1)")
    p.add_argument("--diag", dest="diag", type=_bool, default=None,
                   help="authors' flag: 1 = --covariance diag, 0 = --covariance auto")
    p.add_argument("--resume", action="store_true", help="continue the run in its directory from last.pt")
    p.add_argument("--gpu-id", dest="gpu_id", type=int, default=None, help="authors' flag: --device cuda:N")
    p.add_argument("--mode", choices=["train", "eval"], default="train", help="authors' flag (eval: see `fastiaa eval`)")
    p.add_argument("--save_models", action="store_true", help="authors' flag (checkpoints are always saved)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < preset < explicit flags, checked (:meth:`TrainConfig.check`).

    Raises:
        ValueError: a setting out of its range.
    """
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
    values["allow_unusual"] = args.allow_unusual
    dataset = values.get("dataset", TrainConfig().data.dataset)
    if "data" not in values:
        values["data"] = "data/kanji" if dataset == "kanji" else "MyDataset"
    values["data"] = os.path.abspath(values["data"])  # a checkpoint's config works from any folder
    return TrainConfig.build(**values).check()


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own one-line message ("argument --lr: must be > 0, got -1")
        raise ValueError(message)


@functools.cache
def _parser() -> argparse.ArgumentParser:
    parser = _RaisingParser(prog="fastiaa train", add_help=False)
    add_train_flags(parser)
    return parser


def train_flag(name: str) -> argparse.Action:
    """The ``fastiaa train`` flag ``name``: ``intra_lamda``, ``intra-lamda`` or ``--intra-lamda`` alike.

    Raises:
        ValueError: no such flag (the message names the nearest one).
    """
    options = _parser()._option_string_actions
    for option in _flag(str(name).lstrip("-")):
        if option in options:
            return options[option]
    near = difflib.get_close_matches("--" + str(name).lstrip("-"), list(options), n=1)
    raise ValueError(f"unknown flag {name!r} of `fastiaa train`" + (f" (did you mean {near[0]}?)" if near else ""))


def parse_train_flags(argv) -> TrainConfig:
    """The configuration of ``fastiaa train ARGV`` (a sequence of str), without exiting on an error.

    Raises:
        ValueError: an unknown flag or a bad value (argparse's message, e.g. "argument --lr: must be > 0").
    """
    return config_from_args(_parser().parse_args([str(a) for a in argv]))
