"""A dataset in the layouts of your own data (``fastiaa data convert``; the trainer's ``split.csv``):
the csv format and class folders that ``load_dataset("csv" | "folder", ...)`` read back."""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path

from .datasets import Dataset, DatasetError, ImageSet


def first_classes(dataset: Dataset, count: int) -> Dataset:
    """The dataset restricted to the label indices ``0..count-1`` of each split (a small copy to try
    things on); query and gallery keep their shared numbering.

    Raises:
        ValueError: ``count`` < 1.
    """
    if count < 1:
        raise ValueError(f"--classes must be >= 1, got {count}")

    def cut(images: ImageSet | None) -> ImageSet | None:
        if images is None:
            return None
        keep = images.labels < count
        return ImageSet(tuple(p for p, k in zip(images.paths, keep) if k), images.labels[keep],
                        images.class_ids[:count])

    return dataclasses.replace(dataset, **{name: cut(getattr(dataset, name))
                                           for name in ("train", "test", "query", "gallery")})


def csv_text(dataset: Dataset, folder: str | os.PathLike | None = None) -> str:
    """The dataset in the csv format (``fastiaa.data.CSV_COLUMNS``; is_query / is_gallery for a
    query / gallery protocol), image paths relative to ``folder``, where the CSV will be written
    (None: absolute paths)."""
    if dataset.query is None:
        header, parts = [], [("train", dataset.train, ()), ("test", dataset.test, ())]
    else:
        header = ["is_query", "is_gallery"]
        parts = [("train", dataset.train, (0, 0)), ("test", dataset.query, (1, 0)), ("test", dataset.gallery, (0, 1))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "split", *header])
    for split, images, flags in parts:
        for path, label in zip(images.paths, images.labels):
            rel = path if folder is None else os.path.relpath(path, folder)
            writer.writerow([rel, images.class_ids[label], split, *flags])
    return out.getvalue()


def write_folders(dataset: Dataset, out: str | os.PathLike) -> Path:
    """The dataset as class folders, ``out/train/<class>/<image>`` and ``out/test/<class>/<image>``,
    with hard links to the images (copies across file systems). The tree is built beside ``out``
    and renamed into place, so an interrupted conversion leaves nothing at ``out``.

    Raises:
        FileExistsError: ``out`` exists. DatasetError: a query / gallery dataset (the folder
        layout has no such protocol: convert it to csv), or a class id that cannot be a folder name.
    """
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} already exists: remove it or choose another --out")
    if dataset.query is not None:
        raise DatasetError(f"{dataset.name} has a query / gallery protocol, which class folders cannot hold: "
                           "convert it to csv instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, images in (("train", dataset.train), ("test", dataset.test)):
            for path, label in zip(images.paths, images.labels):
                name = images.class_ids[label]
                if name in ("", ".", "..") or os.sep in name:
                    raise DatasetError(f"class id {name!r} of {path} cannot be a folder name")
                target = tmp / split / name / os.path.basename(path)
                stem, n = target.stem, 1
                while target.exists():  # two images of one class with the same file name
                    target, n = target.with_name(f"{stem}_{n}{target.suffix}"), n + 1
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copyfile(path, target)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
