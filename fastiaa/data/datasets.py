"""Readers for the deep-metric-learning datasets of docs/method.md §1 in their official on-disk layouts.

Every reader parses the dataset's own list files (plain line splitting, no image is opened and no
per-image file-system call is made), numbers the classes 0..C-1 and splits them into the
zero-shot train / test halves of docs/method.md §1 (train and test classes never overlap).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


class DatasetError(ValueError):
    """A dataset is missing, incomplete or malformed on disk.

    The message names the file, the expected layout and where the dataset is published.
    """


class DatasetNotFoundError(DatasetError):
    """A file or folder the dataset layout requires does not exist."""


class MalformedDatasetError(DatasetError):
    """A dataset file exists but its content does not follow the official format."""


@dataclass(frozen=True, eq=False)
class ImageSet:
    """One split of a dataset: image paths with integer class labels.

    Attributes:
        paths: [N] absolute paths of the image files (str).
        labels: [N] int64 class indices in 0..C-1 (read-only array).
        class_ids: [C] the dataset's own class id (or In-Shop item id) of each label index.

    Raises:
        ValueError: lengths differ or a label lies outside 0..C-1.
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    class_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)
        paths, class_ids = tuple(self.paths), tuple(self.class_ids)
        if labels.ndim != 1 or len(labels) != len(paths):
            raise ValueError(f"ImageSet: labels shape {labels.shape} does not match {len(paths)} paths")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_ids)):
            raise ValueError(f"ImageSet: labels must lie in 0..{len(class_ids) - 1}")
        labels.setflags(write=False)
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_ids", class_ids)

    @property
    def num_classes(self) -> int:
        """C, the number of classes (label indices 0..C-1)."""
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset with its zero-shot splits and evaluation protocol (docs/method.md §1, §2, §8).

    ``test`` is both query and reference set (cub200, cars196, stanford, kanji); In-Shop has
    ``query`` and ``gallery`` instead, which share one label numbering keyed by item id.
    ``resize`` is "shorter" (CUB: shorter side to 256) or "square" (256x256); ``recall_ks``
    are the K of Recall@K reported for the dataset.
    """

    name: str
    root: str
    train: ImageSet
    test: ImageSet | None
    query: ImageSet | None
    gallery: ImageSet | None
    resize: str
    recall_ks: tuple[int, ...]


@dataclass(frozen=True)
class _Info:
    """What a reader needs to find its files and to explain a failure."""

    title: str  # the dataset's name in messages
    folder: str  # dataset folder name under --data
    marker: str  # a file that identifies the dataset folder
    layout: str  # expected layout, for messages
    source: str  # where the dataset is published
    resize: str
    recall_ks: tuple[int, ...]

    def error(self, cls: type[DatasetError], path: Path, problem: str) -> DatasetError:
        return cls(
            f"{self.title}: {problem} ({path}). Expected layout under --data: {self.layout}. "
            f"{self.title} is published at {self.source}."
        )


def _find_folder(root: str | os.PathLike, info: _Info) -> Path:
    """Return the dataset folder: ``root/<folder>`` or ``root`` itself, whichever holds the marker."""
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    for folder in (root / info.folder, root):
        if (folder / info.marker).is_file():
            return folder
    raise info.error(DatasetNotFoundError, root, f"{info.marker} found neither in {root / info.folder} nor in {root}")


def _read_rows(path: Path, info: _Info, columns: tuple[str, ...], skip: int) -> tuple[list[str], list[tuple[str, ...]]]:
    """Read a whitespace-separated list file: ``skip`` header lines, then rows of len(columns) fields.

    Returns (header lines, columns as tuples of str). Trailing blank lines are ignored.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise info.error(DatasetNotFoundError, path, "file missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise info.error(MalformedDatasetError, path, f"cannot read file: {err}") from None
    lines = text.rstrip().splitlines()
    if len(lines) <= skip:
        raise info.error(MalformedDatasetError, path, f"no data rows after {skip} header line(s)")
    rows = [line.split() for line in lines[skip:]]
    bad = next((i for i, row in enumerate(rows) if len(row) != len(columns)), None)
    if bad is not None:
        raise info.error(
            MalformedDatasetError, path,
            f"line {bad + skip + 1} has {len(rows[bad])} fields, expected {len(columns)} ({' '.join(columns)}): "
            f"{lines[bad + skip]!r}",
        )
    return lines[:skip], list(zip(*rows))


def _integers(values: tuple[str, ...], path: Path, info: _Info, column: str, first_line: int) -> np.ndarray:
    """Parse a column of decimal integers; a bad entry is reported with its line number."""
    try:
        return np.array(values).astype(np.int64)
    except ValueError:
        bad = next(i for i, v in enumerate(values) if not v.lstrip("+-").isdigit())
        raise info.error(
            MalformedDatasetError, path, f"line {bad + first_line}: {column} {values[bad]!r} is not an integer"
        ) from None


def _image_set(paths: list[str], keys: np.ndarray, class_keys: np.ndarray | None = None) -> ImageSet:
    """Number the classes of ``keys`` [N] as 0..C-1 in sorted key order (or in ``class_keys`` order)."""
    if class_keys is None:
        class_keys, labels = np.unique(keys, return_inverse=True)
    else:
        labels = np.searchsorted(class_keys, keys)
    return ImageSet(tuple(paths), labels.astype(np.int64), tuple(str(k) for k in class_keys))


def _split(
    folder: Path, rel_paths: tuple[str, ...], keys: np.ndarray, masks: dict[str, np.ndarray]
) -> dict[str, ImageSet]:
    """Absolute paths + per-split ImageSets from row masks."""
    prefix = str(folder) + os.sep
    return {
        name: _image_set([prefix + rel_paths[i] for i in np.flatnonzero(mask)], keys[mask])
        for name, mask in masks.items()
    }


def _require_nonempty(sets: dict[str, ImageSet], path: Path, info: _Info, rule: str) -> None:
    for name, images in sets.items():
        if len(images) == 0:
            raise info.error(MalformedDatasetError, path, f"the {name} split is empty ({rule})")


def _read_cub(folder: Path, info: _Info) -> dict[str, ImageSet]:
    images_txt, labels_txt = folder / "images.txt", folder / "image_class_labels.txt"
    _, (image_ids, rel_paths) = _read_rows(images_txt, info, ("image_id", "path"), 0)
    _, (label_ids, class_ids) = _read_rows(labels_txt, info, ("image_id", "class_id"), 0)
    image_ids = _integers(image_ids, images_txt, info, "image_id", 1)
    label_ids = _integers(label_ids, labels_txt, info, "image_id", 1)
    classes = _integers(class_ids, labels_txt, info, "class_id", 1)
    by_image, by_label = np.argsort(image_ids, kind="stable"), np.argsort(label_ids, kind="stable")
    if len(image_ids) != len(label_ids) or not np.array_equal(image_ids[by_image], label_ids[by_label]):
        raise info.error(MalformedDatasetError, labels_txt, f"its image ids differ from those of {images_txt.name}")
    classes_of_images = np.empty_like(classes)
    classes_of_images[by_image] = classes[by_label]
    rel_paths = tuple("images/" + p for p in rel_paths)
    is_train = classes_of_images <= 100
    sets = _split(folder, rel_paths, classes_of_images, {"train": is_train, "test": ~is_train})
    _require_nonempty(sets, labels_txt, info, "classes 1-100 train, 101-200 test")
    return sets


def _read_cars(folder: Path, info: _Info) -> dict[str, ImageSet]:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    mat_path = folder / "cars_annos.mat"
    try:
        annotations = np.atleast_1d(loadmat(mat_path, squeeze_me=True)["annotations"])
        rel_paths = tuple(str(p) for p in annotations["relative_im_path"])
        classes = annotations["class"].astype(np.int64)
    except FileNotFoundError:
        raise info.error(DatasetNotFoundError, mat_path, "file missing") from None
    except (KeyError, ValueError, TypeError, OSError, MatReadError) as err:
        raise info.error(
            MalformedDatasetError, mat_path,
            "expected a struct array 'annotations' with fields relative_im_path and class "
            f"({type(err).__name__}: {err})",
        ) from None
    if len(classes) and (classes.min() < 1 or classes.max() > 196):
        raise info.error(MalformedDatasetError, mat_path, "annotation classes must lie in 1..196")
    is_train = classes <= 98
    sets = _split(folder, rel_paths, classes, {"train": is_train, "test": ~is_train})
    _require_nonempty(sets, mat_path, info, "classes 1-98 train, 99-196 test")
    return sets


_SOP_COLUMNS = ("image_id", "class_id", "super_class_id", "path")


def _read_sop(folder: Path, info: _Info) -> dict[str, ImageSet]:
    sets = {}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = folder / name
        (header,), (_, class_ids, _, rel_paths) = _read_rows(path, info, _SOP_COLUMNS, 1)
        if tuple(header.split()) != _SOP_COLUMNS:
            expected = " ".join(_SOP_COLUMNS)
            raise info.error(MalformedDatasetError, path, f"header line is {header!r}, expected {expected!r}")
        classes = _integers(class_ids, path, info, "class_id", 2)
        sets.update(_split(folder, rel_paths, classes, {split: np.ones(len(classes), bool)}))
    return sets


_INSHOP_SPLITS = ("train", "query", "gallery")


def _read_inshop(folder: Path, info: _Info) -> dict[str, ImageSet]:
    path = folder / "list_eval_partition.txt"
    (count, _), (rel_paths, items, splits) = _read_rows(path, info, ("image_name", "item_id", "evaluation_status"), 2)
    if count.strip() != str(len(items)):
        raise info.error(
            MalformedDatasetError, path, f"line 1 announces {count.strip()!r} images but {len(items)} rows follow"
        )
    items, splits = np.array(items), np.array(splits)
    unknown = np.flatnonzero(~np.isin(splits, _INSHOP_SPLITS))
    if len(unknown):
        raise info.error(
            MalformedDatasetError, path,
            f"line {unknown[0] + 3}: evaluation_status {str(splits[unknown[0]])!r} "
            f"is not one of {', '.join(_INSHOP_SPLITS)}",
        )
    masks = {name: splits == name for name in _INSHOP_SPLITS}
    prefix = str(folder) + os.sep
    # query and gallery share one numbering keyed by item id, whatever order each split lists them in
    eval_items = np.unique(items[masks["query"] | masks["gallery"]])
    sets = {
        name: _image_set(
            [prefix + rel_paths[i] for i in np.flatnonzero(masks[name])], items[masks[name]],
            None if name == "train" else eval_items,
        )
        for name in _INSHOP_SPLITS
    }
    _require_nonempty(sets, path, info, "evaluation_status train / query / gallery")
    return sets


_SOP_LAYOUT = (
    "{folder}/Ebay_train.txt and {folder}/Ebay_test.txt "
    "(header 'image_id class_id super_class_id path', paths relative to {folder})"
)

_DATASETS: dict[str, tuple[_Info, Callable[[Path, _Info], dict[str, ImageSet]]]] = {
    "cub200": (_Info(
        "CUB-200-2011", "CUB_200_2011", "images.txt",
        "CUB_200_2011/images.txt ('image_id path'), CUB_200_2011/image_class_labels.txt ('image_id class_id'), "
        "CUB_200_2011/images/<NNN.name>/*.jpg",
        "the Caltech vision site, https://www.vision.caltech.edu/datasets/cub_200_2011/",
        "shorter", (1, 2, 4, 8)), _read_cub),
    "cars196": (_Info(
        "Cars196", "Cars196", "cars_annos.mat",
        "Cars196/cars_annos.mat (struct 'annotations' with relative_im_path and class 1..196), Cars196/car_ims/*.jpg",
        "the Stanford AI Lab Cars dataset page, https://ai.stanford.edu/~jkrause/cars/car_dataset.html "
        "(car_ims.tgz and cars_annos.mat)",
        "square", (1, 2, 4, 8)), _read_cars),
    "stanford": (_Info(
        "Stanford Online Products", "Stanford_Online_Products", "Ebay_train.txt",
        _SOP_LAYOUT.format(folder="Stanford_Online_Products"),
        "the Stanford CVGL Online Products page, https://cvgl.stanford.edu/projects/lifted_struct/",
        "square", (1, 10, 100, 1000)), _read_sop),
    "inshop": (_Info(
        "In-Shop Clothes", "In_Shop", "list_eval_partition.txt",
        "In_Shop/list_eval_partition.txt (line 1: image count, line 2: column names, then "
        "'image_name item_id evaluation_status' with status train/query/gallery), In_Shop/img/...",
        "the DeepFashion In-shop Clothes Retrieval Benchmark page, "
        "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        "square", (1, 10, 20, 30)), _read_inshop),
    "kanji": (_Info(
        "Kanji demo", "kanji", "Ebay_train.txt", _SOP_LAYOUT.format(folder="kanji"),
        "no web site: build it locally with `fastiaa data kanji --out DIR` (fastiaa.data.build_kanji)",
        "square", (1, 2, 4, 8)), _read_sop),
}

DATASETS: tuple[str, ...] = tuple(_DATASETS)
"""Names accepted by :func:`load_dataset`."""


def load_dataset(name: str, root: str | os.PathLike) -> Dataset:
    """Read a dataset's split lists from disk (docs/method.md §1); images are not opened.

    Args:
        name: one of ``DATASETS`` ("cub200", "cars196", "stanford", "inshop", "kanji").
        root: the folder holding the dataset folder (e.g. ``root/CUB_200_2011``) or the
            dataset folder itself.

    Returns:
        Dataset with absolute image paths. Class splits (zero-shot): CUB classes 1-100 train,
        101-200 test; Cars196 classes 1-98 train, 99-196 test; SOP / kanji: Ebay_train.txt /
        Ebay_test.txt; In-Shop: evaluation_status train / query / gallery, query and gallery
        numbered together by item id.

    Raises:
        DatasetError: unknown name; DatasetNotFoundError: a list file or the image folder is
        missing; MalformedDatasetError: a list file does not follow the official format. The
        message names the file, the expected layout and where the dataset is published.
    """
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info, read = _DATASETS[name]
    folder = _find_folder(root, info)
    sets = read(folder, info)
    first = next(iter(sets.values())).paths[0]
    if not os.path.isfile(first):
        raise info.error(DatasetNotFoundError, Path(first), "image listed in the split files is missing")
    return Dataset(
        name=name, root=str(folder), train=sets["train"], test=sets.get("test"),
        query=sets.get("query"), gallery=sets.get("gallery"), resize=info.resize, recall_ks=info.recall_ks,
    )
