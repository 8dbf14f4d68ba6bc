"""``fastiaa`` command line: ``train``, ``eval``, ``sweep``, ``report``, ``data`` (kanji demo, check,
convert) and the way from a trained model to a deployed retrieval index: ``embed``, ``index`` (build,
eval), ``search``, ``export``.

``fastiaa train`` takes the flag names of the authors' ``run.py`` (both ``-`` and ``_``
spellings; ``fastiaa.flags``), so their published commands run with ``python run.py`` replaced by
``fastiaa train``. ``fastiaa sweep`` trains the runs of a sweep file (``fastiaa.sweep``), whose
flags are spelt and checked alike; ``fastiaa report`` gives a sweep's mean ± standard deviation.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import signal
import sys

from fastiaa import flags, registry
from fastiaa.data import DATASETS
from fastiaa.flags import choice, non_negative_int, positive


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
                                  loader=args.loader, cache=args.cache, cache_dir=args.cache_dir)
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

    return Embedder(args.checkpoint, args.device, args.loader, args.batch, args.workers, args.cache, args.cache_dir)


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
        p.add_argument("--loader", type=choice("torchvision", "dali"), default=None,
                       help="torchvision | dali (default: the checkpoint's)")
        p.add_argument("--batch", type=positive(int), default=None,
                       help="images per batch (default: the run's eval_batch)")
        p.add_argument("--workers", type=non_negative_int, default=None, help="loader threads (default: the run's)")
        p.add_argument("--strict", action="store_true",
                       help="stop at the first unreadable image (default: list and skip)")
        p.add_argument("--cache", default="off", choices=("off", "ram", "device"),
                       help="decode once into a cache in host (ram) or GPU (device) memory")
        p.add_argument("--cache-dir", default=None,
                       help="a persistent cache folder (a training run's --cache-dir serves its test images)")



SWEEP_OPTIONS = ("--dir", "--seeds", "--gpus-per-run", "--dry-run")


def _cmd_sweep(args) -> int:
    from fastiaa import sweep
    from fastiaa.data import load_dataset

    misplaced = [a for a in args.train_flags if a.split("=")[0] in SWEEP_OPTIONS]
    if misplaced:
        raise ValueError(f"{misplaced[0]} is a sweep option: put it before the sweep file "
                         "(after it come `fastiaa train` flags)")
    plan = sweep.load(args.file, directory=args.dir, seeds=args.seeds, gpus_per_run=args.gpus_per_run,
                      train_flags=args.train_flags)
    sweep.check_settings(plan)
    todo = [run for run in plan.runs if not sweep.finished(run.dir)]
    print(f"sweep {plan.file}: {len(plan.runs)} runs in {plan.dir}; {len(plan.runs) - len(todo)} finished, "
          f"{len(todo)} to train ({plan.launcher} launcher)")
    if args.dry_run:
        for run in plan.runs:
            state = "finished" if run not in todo else "resume" if (run.dir / "last.pt").is_file() else "new"
            print(f"{state:8s} {run.name}: {shlex.join(run.command())}")
        return 0
    if plan.launcher == "slurm":
        sweep.write_manifest(plan)
        jobs = sweep.submit(plan, todo) if todo else []
        print(f"submitted {len(jobs)} runs ({', '.join(job.job_id for job in jobs)}); submitit's logs: "
              f"{plan.dir / 'submitit'}.\nWhen they have ended: `fastiaa report {plan.dir}`; "
              "re-run this sweep to resume the interrupted ones.")
        return 0
    for dataset, data in dict.fromkeys((run.config.data.dataset, run.config.data.data) for run in todo):
        load_dataset(dataset, data)  # a missing dataset stops the sweep here, not in every run
    sweep.write_manifest(plan)
    failed = sweep.run_local(todo, plan.gpus_per_run)
    print(sweep.report(plan.dir))
    for run, why in failed:
        lines = run.log.read_text(errors="replace").strip().splitlines() if run.log.is_file() else []
        print(f"fastiaa sweep: {run.name} failed ({why}); log {run.log}" + (f": {lines[-1]}" if lines else ""),
              file=sys.stderr)
    return 1 if failed else 0


def _cmd_report(args) -> int:
    from fastiaa import sweep

    print(sweep.report(args.sweep_dir, args.compare or ()))
    return 0


DEBUG_HELP = "show the full traceback of any error"


class _Parser(argparse.ArgumentParser):
    """argparse with the house's one-line errors (what is wrong, where the help is), not the usage block;
    every subcommand also takes ``--debug``, which a subcommand's default never turns off again."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_subparsers(self, **kwargs):
        sub = super().add_subparsers(**kwargs)
        add_parser = sub.add_parser

        def with_debug(*args, **kw):
            child = add_parser(*args, **kw)
            child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
            return child

        sub.add_parser = with_debug
        return sub


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastiaa", description="Fast IAA for deep metric learning")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    ev = sub.add_parser("eval", help="Recall@K / MAP@R / R-Precision of a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by `fastiaa train`")
    ev.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    ev.add_argument("--data", default=None, help="default: the checkpoint's data root")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--loader", default=None, help="torchvision | dali (default: the checkpoint's)")
    ev.add_argument("--cache", default="off", choices=("off", "auto", "ram", "device"),
                    help="decode once into a cache (worth it with --cache-dir, which later evaluations reuse)")
    ev.add_argument("--cache-dir", default=None, help="the persistent cache folder of a training run's --cache-dir")
    sw = sub.add_parser("sweep", help="train the runs of a sweep file (a grid of train flags, seeds)", description=(
        "Train every run of a sweep file (YAML: flags, arms, grid, compare, launcher; see the README) under one "
        "sweep directory; finished runs are skipped, interrupted ones resumed. The local launcher ends with "
        "`fastiaa report`. Sweep options go before the file; after it come `fastiaa train` flags for every run."))
    sw.add_argument("--dir", default=None,
                    help="sweep directory (default: the file's dir, else runs/sweeps/<file name>)")
    sw.add_argument("--seeds", type=int, default=None, help="N: the grid's seeds become 0 .. N-1")
    sw.add_argument("--gpus-per-run", type=int, default=None,
                    help="GPUs of one run (> 1: torchrun); default: the file's")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their commands; train nothing")
    sw.add_argument("file", help="the sweep file (YAML)")
    sw.add_argument("train_flags", nargs=argparse.REMAINDER, help="`fastiaa train` flags added to every run")
    rp = sub.add_parser("report",
                        help="mean ± std over seeds of a sweep's runs, the paper's numbers, paired differences")
    rp.add_argument("sweep_dir", help="a directory written by `fastiaa sweep` (it holds sweep.json)")
    rp.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"),
                    help="paired difference A - B of two configurations over their common seeds (repeatable)")
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
    cv.add_argument("--classes", type=positive(int), default=None,
                    help="keep only the first N classes of each split (a small copy to try things on)")

    em = sub.add_parser("embed", help="embed images with a trained model: FILE.npy + FILE.json (paths, labels)")
    _checkpoint_flags(em)
    em.add_argument("--images", nargs="+", required=True,
                    help="image files, folders of images (labelled by their class folder) or .csv lists")
    em.add_argument("--out", required=True, help="FILE.npy (its sidecar FILE.json is written beside)")
    em.add_argument("--dtype", type=choice(*registry.EMBEDDING_DTYPES), default="float32",
                    help=" | ".join(registry.EMBEDDING_DTYPES))

    ix = sub.add_parser("index", help="build a faiss index from an embeddings file, or measure its Recall@K")
    isub = ix.add_subparsers(dest="action", required=True)
    ib = isub.add_parser("build", help="a faiss index (exact by default) of `fastiaa embed` output")
    ib.add_argument("--embeddings", required=True, help="FILE.npy written by `fastiaa embed`")
    ib.add_argument("--out", required=True, help="the index file (e.g. catalogue.index)")
    ib.add_argument("--kind", type=choice(*registry.INDEX_KINDS), default=None,
                    help="flat (exact inner product, default) | hnsw (graph) | ivf (k-means cells)")
    ib.add_argument("--hnsw-m", dest="hnsw_m", type=positive(int), default=None, help="hnsw: links per vector (32)")
    ib.add_argument("--ef-construction", dest="ef_construction", type=positive(int), default=None,
                    help="hnsw: candidate list while building (80)")
    ib.add_argument("--ef-search", dest="ef_search", type=positive(int), default=None,
                    help="hnsw: candidate list while searching (128)")
    ib.add_argument("--nlist", type=positive(int), default=None, help="ivf: cells (default 4 sqrt(N), at most N / 39)")
    ib.add_argument("--nprobe", type=positive(int), default=None, help="ivf: cells visited per query (16)")
    ie = isub.add_parser("eval", help="Recall@K of labelled embeddings searched in the index (itself excluded)")
    ie.add_argument("--index", required=True)
    ie.add_argument("--queries", required=True, help="FILE.npy of labelled images (the index's own: leave-one-out)")
    ie.add_argument("--recall", type=positive(int), nargs="+", default=[1, 2, 4, 8], help="the K of Recall@K")

    se = sub.add_parser("search", help="embed query images and print (or write) their nearest indexed images")
    _checkpoint_flags(se)
    se.add_argument("--index", required=True, help="built by `fastiaa index build` from this checkpoint's embeddings")
    se.add_argument("--query", nargs="+", required=True, help="image files, folders of images or .csv lists")
    se.add_argument("--k", type=positive(int), default=10, help="neighbours per query")
    se.add_argument("--out", default=None, help="write the neighbours to FILE.json or FILE.csv instead of printing")
    se.add_argument("--plot", default=None, help=f"draw the first {PLOT_QUERIES} queries and their top 5 in FILE.png")

    ex = sub.add_parser("export", help="the embedding model with its input normalisation as ONNX or TorchScript")
    _checkpoint_flags(ex, embeds=False)
    ex.add_argument("--format", required=True, type=choice(*registry.EXPORT_FORMATS),
                    help=" | ".join(registry.EXPORT_FORMATS))
    ex.add_argument("--out", required=True, help="the model file (e.g. model.onnx, model.ts)")
    return parser


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each message (main may run again with another)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _show_reports() -> None:
    """fastiaa's one-line reports (e.g. the evaluator's backend choice) on stderr."""
    log = logging.getLogger("fastiaa")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("fastiaa: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error the user can act on (bad input, unreadable data, a full or
    read-only disk, a run that went non-finite) ends it with one line on stderr that says what went
    wrong and what to do, exit 2; Ctrl-C and SIGTERM end it with exit 130 / 143 (a training run then
    continues with --resume, a sweep when it is run again). A traceback means a bug in fastiaa; ``--debug`` shows it for everything."""
    args = build_parser().parse_args(argv)
    _show_reports()
    handler = {"train": _cmd_train, "eval": _cmd_eval, "sweep": _cmd_sweep, "report": _cmd_report,
               "data": _cmd_data, "embed": _cmd_embed, "index": _cmd_index, "search": _cmd_search,
               "export": _cmd_export}[args.command]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return handler(args)
    except (KeyboardInterrupt, _Terminated) as stop:
        if args.debug:
            raise
        how, code = ("terminated", 143) if isinstance(stop, _Terminated) else ("interrupted", 130)
        resume = ("re-run the sweep to resume its runs" if args.command == "sweep"
                  else "a training run continues with --resume")
        print(f"fastiaa {args.command}: {how}; {resume}", file=sys.stderr)
        return code
    except BrokenPipeError:  # the reader of the output left (`fastiaa ... | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and nothing to flush at exit
        return 141
    except Exception as error:
        if args.debug or not _user_error(error):
            raise
        print(f"fastiaa {args.command}: error: {_explain(error)}", file=sys.stderr)
        return 2


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run's clean-up (finally blocks) happens."""


def _terminate(signum, frame):
    raise _Terminated()


def _user_error(error: Exception) -> bool:
    """Errors that the input, the data or the machine cause and the user can fix; not fastiaa's bugs."""
    from fastiaa.errors import NonFiniteError

    return isinstance(error, (ValueError, OSError, ImportError, NonFiniteError))  # DatasetError is a ValueError


def _explain(error: Exception) -> str:
    """The one line for a user error: its message, with what to do for the disk's own errors."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{error.filename or 'a file'}: no space left on the device; nothing already written was lost "
                "(free some space, or choose another --save-dir, then continue with --resume)")
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{error.filename or 'a file'}: cannot write there ({error.strerror}); choose a writable --save-dir"
    if isinstance(error, NotADirectoryError) and error.filename:
        return f"{error.filename} is {error.strerror}: --save-dir must name a folder (or a path to create)"
    return str(error).replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
