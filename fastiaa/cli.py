"""``fastiaa`` command line: ``train``, ``eval``, ``data`` (kanji demo, check, convert) and the way from
a trained model to a deployed retrieval index: ``embed``, ``index`` (build, eval), ``search``, ``export``.

``fastiaa train`` takes the flag names of the authors' ``run.py`` (both ``-`` and ``_``
spellings), so their published commands run with ``python run.py`` replaced by
``fastiaa train``; ``--preset DATASET`` applies the settings of their published command for
that dataset (docs/method.md §7) before the explicit flags. Every flag is a field of
``fastiaa.config.TrainConfig`` of the same name; the choices come from the registries.
"""
from __future__ import annotations

import argparse
import json
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
    from fastiaa.data.check import describe

    if args.what == "kanji":
        out = data.build_kanji(args.out, num_classes=args.classes, image_size=args.size, seed=args.seed,
                               install=not args.no_install, **({"fonts": args.fonts} if args.fonts else {}))
        print(f"kanji demo data ready in {out}")
        return 0
    dataset = data.load_dataset(args.dataset, args.data)
    if args.what == "convert":
        return _convert(dataset, args)
    print("\n".join(describe(dataset)))
    sets = [s for s in (dataset.train, dataset.test, dataset.query, dataset.gallery) if s is not None]
    bad = data.check_images([p for s in sets for p in s.paths])
    for path, error in bad:
        print(f"unreadable: {path}: {error}", file=sys.stderr)
    print(f"{sum(len(s) for s in sets)} images checked, {len(bad)} unreadable")
    return 1 if bad else 0


def _convert(dataset, args) -> int:
    from pathlib import Path

    from fastiaa.checkpoint import atomic_write_text
    from fastiaa.data.check import describe
    from fastiaa.data.convert import csv_text, first_classes, write_folders

    if args.classes is not None:
        dataset = first_classes(dataset, args.classes)
    out = Path(args.out).absolute()
    if args.to == "folder":
        write_folders(dataset, out)
    else:
        if out.suffix.lower() != ".csv":
            raise ValueError(f"--out {args.out}: a csv dataset is a file ending in .csv")
        if out.exists():
            raise FileExistsError(f"{out} already exists: remove it or choose another --out")
        atomic_write_text(out, csv_text(dataset, out.parent))
    print("\n".join(describe(dataset)))
    print(f"{args.dataset} written to {out}: train with --dataset {args.to} --data {args.out}")
    return 0


def _report_skipped(embeddings) -> None:
    for path, error in embeddings.skipped:
        print(f"skipped (unreadable): {path}: {error}", file=sys.stderr)


def _embedder(args):
    from fastiaa.embeddings import Embedder

    return Embedder(args.checkpoint, args.device, args.loader, args.batch, args.workers)


def _cmd_embed(args) -> int:
    from fastiaa.embeddings import image_inputs, sidecar

    if not args.out.endswith(".npy"):
        raise ValueError(f"--out {args.out}: embeddings are written as FILE.npy (and the sidecar FILE.json)")
    paths, labels = image_inputs(args.images)
    embeddings = _embedder(args).embed(paths, labels, strict=args.strict)
    embeddings.save(args.out, args.dtype)
    _report_skipped(embeddings)
    print(f"{len(embeddings.paths)} images embedded ({embeddings.dim}-d {args.dtype}) to {args.out} and "
          f"{sidecar(args.out)}; {len(embeddings.skipped)} unreadable skipped")
    return 0


def _cmd_index(args) -> int:
    from fastiaa.embeddings import Embeddings, require_same_model
    from fastiaa.index import IndexSettings, RetrievalIndex

    if args.action == "build":
        names = ("kind", "hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe")
        settings = IndexSettings(**{k: getattr(args, k) for k in names if getattr(args, k) is not None})
        index = RetrievalIndex.build(Embeddings.load(args.embeddings), settings)
        index.save(args.out)
        print(f"{settings.kind} index of {len(index)} {index.dim}-d embeddings written to {args.out}")
        return 0
    index, queries = RetrievalIndex.load(args.index), Embeddings.load(args.queries)
    require_same_model(index.model, f"index {args.index}", queries.model, f"embeddings {args.queries}")
    print(json.dumps(index.recall(queries, tuple(args.recall)), indent=2))
    return 0


PLOT_QUERIES = 16  # rows of `fastiaa search --plot`


def _cmd_search(args) -> int:
    from pathlib import Path

    from fastiaa.checkpoint import atomic_write_text
    from fastiaa.embeddings import image_inputs, require_same_model
    from fastiaa.index import RetrievalIndex, results_table
    from fastiaa.report import plot_retrievals

    fmt = {".json": "json", ".csv": "csv"}.get(Path(args.out).suffix.lower()) if args.out else "text"
    if fmt is None:
        raise ValueError(f"--out {args.out}: results are written as .json or .csv")
    index = RetrievalIndex.load(args.index)
    paths, labels = image_inputs(args.query)
    embedder = _embedder(args)
    require_same_model(index.model, f"index {args.index}", embedder.fingerprint, f"checkpoint {args.checkpoint}")
    queries = embedder.embed(paths, labels, strict=args.strict, desc="embed queries")
    _report_skipped(queries)
    retrievals = index.retrievals(queries.vectors, queries.paths, queries.labels, args.k)
    if args.out:
        atomic_write_text(args.out, results_table(retrievals, fmt))
        print(f"neighbours of {len(retrievals)} queries written to {args.out}")
    else:
        print(results_table(retrievals, "text"), end="")
    if args.plot:
        plot_retrievals(retrievals[:PLOT_QUERIES], args.plot)
        print(f"retrievals of the first {min(len(retrievals), PLOT_QUERIES)} queries drawn in {args.plot}")
    return 0


def _cmd_export(args) -> int:
    from fastiaa.export import export

    meta = export(args.checkpoint, args.format, args.out)
    print(f"{args.format} model written to {args.out}\n  input   {meta['input']} ({meta['preprocessing']})\n"
          f"  output  {meta['output']}\n  max |difference| from the PyTorch model on 3 random images: "
          f"{meta['max_abs_difference']:.1e}")
    return 0


def _checkpoint_flags(p, embeds: bool = True) -> None:
    """--checkpoint, and for the commands that embed images, where and how they are embedded."""
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by `fastiaa train`")
    if embeds:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--loader", type=_choice("torchvision", "dali"), default=None,
                       help="torchvision | dali (default: the checkpoint's)")
        p.add_argument("--batch", type=_positive(int), default=None,
                       help="images per batch (default: the run's eval_batch)")
        p.add_argument("--workers", type=_non_negative_int, default=None, help="loader threads (default: the run's)")
        p.add_argument("--strict", action="store_true",
                       help="stop at the first unreadable image (default: list and skip)")


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
    ck = dsub.add_parser("check", help="describe a dataset's splits, decode every image and list unreadable files")
    ck.add_argument("--dataset", required=True, choices=DATASETS)
    ck.add_argument("--data", required=True)
    cv = dsub.add_parser("convert", help="write a dataset as class folders or as a CSV (the layouts of your own data)")
    cv.add_argument("--dataset", required=True, choices=DATASETS)
    cv.add_argument("--data", required=True)
    cv.add_argument("--to", required=True, choices=["folder", "csv"],
                    help="folder: OUT/train|test/<class>/; csv: OUT.csv")
    cv.add_argument("--out", required=True, help="the new folder, or the .csv file")
    cv.add_argument("--classes", type=_positive(int), default=None,
                    help="keep only the first N classes of each split (a small copy to try things on)")

    em = sub.add_parser("embed", help="embed images with a trained model: FILE.npy + FILE.json (paths, labels)")
    _checkpoint_flags(em)
    em.add_argument("--images", nargs="+", required=True,
                    help="image files, folders of images (labelled by their class folder) or .csv lists")
    em.add_argument("--out", required=True, help="FILE.npy (its sidecar FILE.json is written beside)")
    em.add_argument("--dtype", type=_choice(*registry.EMBEDDING_DTYPES), default="float32",
                    help=" | ".join(registry.EMBEDDING_DTYPES))

    ix = sub.add_parser("index", help="build a faiss index from an embeddings file, or measure its Recall@K")
    isub = ix.add_subparsers(dest="action", required=True)
    ib = isub.add_parser("build", help="a faiss index (exact by default) of `fastiaa embed` output")
    ib.add_argument("--embeddings", required=True, help="FILE.npy written by `fastiaa embed`")
    ib.add_argument("--out", required=True, help="the index file (e.g. catalogue.index)")
    ib.add_argument("--kind", type=_choice(*registry.INDEX_KINDS), default=None,
                    help="flat (exact inner product, default) | hnsw (graph) | ivf (k-means cells)")
    ib.add_argument("--hnsw-m", dest="hnsw_m", type=_positive(int), default=None, help="hnsw: links per vector (32)")
    ib.add_argument("--ef-construction", dest="ef_construction", type=_positive(int), default=None,
                    help="hnsw: candidate list while building (80)")
    ib.add_argument("--ef-search", dest="ef_search", type=_positive(int), default=None,
                    help="hnsw: candidate list while searching (128)")
    ib.add_argument("--nlist", type=_positive(int), default=None, help="ivf: cells (default 4 sqrt(N), at most N / 39)")
    ib.add_argument("--nprobe", type=_positive(int), default=None, help="ivf: cells visited per query (16)")
    ie = isub.add_parser("eval", help="Recall@K of labelled embeddings searched in the index (itself excluded)")
    ie.add_argument("--index", required=True)
    ie.add_argument("--queries", required=True, help="FILE.npy of labelled images (the index's own: leave-one-out)")
    ie.add_argument("--recall", type=_positive(int), nargs="+", default=[1, 2, 4, 8], help="the K of Recall@K")

    se = sub.add_parser("search", help="embed query images and print (or write) their nearest indexed images")
    _checkpoint_flags(se)
    se.add_argument("--index", required=True, help="built by `fastiaa index build` from this checkpoint's embeddings")
    se.add_argument("--query", nargs="+", required=True, help="image files, folders of images or .csv lists")
    se.add_argument("--k", type=_positive(int), default=10, help="neighbours per query")
    se.add_argument("--out", default=None, help="write the neighbours to FILE.json or FILE.csv instead of printing")
    se.add_argument("--plot", default=None, help=f"draw the first {PLOT_QUERIES} queries and their top 5 in FILE.png")

    ex = sub.add_parser("export", help="the embedding model with its input normalisation as ONNX or TorchScript")
    _checkpoint_flags(ex, embeds=False)
    ex.add_argument("--format", required=True, type=_choice(*registry.EXPORT_FORMATS),
                    help=" | ".join(registry.EXPORT_FORMATS))
    ex.add_argument("--out", required=True, help="the model file (e.g. model.onnx, model.ts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors about the user's input print as one line (exit 2), not a traceback."""
    from fastiaa.data import DatasetError
    from fastiaa.errors import NonFiniteError, UnreadableImageError

    args = build_parser().parse_args(argv)
    handler = {"train": _cmd_train, "eval": _cmd_eval, "data": _cmd_data, "embed": _cmd_embed, "index": _cmd_index,
               "search": _cmd_search, "export": _cmd_export}[args.command]
    try:
        return handler(args)
    except (DatasetError, FileNotFoundError, FileExistsError, ValueError, NonFiniteError,
            UnreadableImageError) as error:
        print(f"fastiaa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastiaa {args.command}: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
