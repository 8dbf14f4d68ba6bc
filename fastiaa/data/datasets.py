"""Readers for the deep-metric-learning datasets of docs/method.md §1 in their official on-disk layouts,
and for your own images (``folder``: one folder per class; ``csv``: one row per image).

Every official reader parses the dataset's own list files (plain line splitting, no image is opened
and no per-image file-system call is made), numbers the classes 0..C-1 and splits them into the
zero-shot train / test halves of docs/method.md §1 (train and test classes never overlap). The
``folder`` reader lists the class folders; the ``csv`` reader checks that every listed file exists.
Neither opens an image (``fastiaa data check`` decodes them) and neither drops anything: a file
or row it cannot place is an error naming the file, the line and what to fix.
"""
from __future__ import annotations

import csv
import io
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

    ``test`` is both query and reference set (cub200, cars196, stanford, kanji); In-Shop (and a
    csv dataset with is_query / is_gallery columns) has ``query`` and ``gallery`` instead, which
    share one label numbering keyed by class id. ``resize`` is "shorter" (CUB: shorter side to
    256) or "square" (256x256); ``recall_ks`` are the K of Recall@K reported for the dataset.
    ``split_seed`` is None when the dataset defines its split, else the seed of the class split
    fastiaa drew (a folder dataset without test/); the trainer then writes that split to the run.
    """

    name: str
    root: str
    train: ImageSet
    test: ImageSet | None
    query: ImageSet | None
    gallery: ImageSet | None
    resize: str
    recall_ks: tuple[int, ...]
    split_seed: int | None = None


@dataclass(frozen=True)
class _Info:
    """What a reader needs to find its files and to explain a failure."""

    title: str  # the dataset's name in messages
    folder: str | None  # dataset folder name under --data (None: --data is the dataset itself)
    marker: str  # a file that identifies the dataset folder ("" with folder None)
    layout: str  # expected layout, for messages
    source: str | None  # where the dataset is published (None: your own data)
    resize: str
    recall_ks: tuple[int, ...]

    def error(self, cls: type[DatasetError], path: Path, problem: str) -> DatasetError:
        published = f" Where to get it: {self.source}." if self.source else ""
        return cls(f"{self.title}: {problem} ({path}). Expected layout of --data: {self.layout}.{published}")


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _find_folder(root: str | os.PathLike, info: _Info) -> Path:
    """Return the dataset folder: ``root/<folder>`` or ``root`` itself, whichever holds the marker."""
    root = _absolute(root)
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


# ---------------------------------------------------------------- your own images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pbm", ".pgm", ".ppm", ".pnm")
"""File name endings (any case) of the images both loaders decode; hidden files (``.name``) are skipped."""

SPLIT_SEED = 0
"""Seed of the class split drawn for a folder dataset without test/."""

CSV_COLUMNS = ("path", "label", "split")
"""Required columns of a csv dataset (open-metric-learning's names); ``is_query`` and ``is_gallery``
are optional, together; other columns are ignored."""

CSV_SPLITS = {"train": "train", "test": "test", "validation": "test"}
"""Values of the csv ``split`` column ("validation" is open-metric-learning's name for test)."""

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


def _walk_images(folder: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) below ``folder``, recursively, sorted by path; hidden names skipped."""
    images, others = [], []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in (f for f in files if not f.startswith(".")):
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(top, name))
    return sorted(images), sorted(others)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Every image file below ``folder`` (recursively, sorted by path; hidden names skipped).

    Raises:
        DatasetNotFoundError: no such folder. MalformedDatasetError: a file that is not an image
        (its name does not end in one of ``IMAGE_EXTENSIONS``), or no image at all.
    """
    folder = _absolute(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no folder {folder}")
    images, others = _walk_images(folder)
    if others:
        raise MalformedDatasetError(f"{others[0]} is not an image (names end in {', '.join(IMAGE_EXTENSIONS)}): "
                                    "move it out of the image folder")
    if not images:
        raise MalformedDatasetError(f"no image in {folder} (names end in {', '.join(IMAGE_EXTENSIONS)})")
    return images


def _class_folders(split_dir: Path, info: _Info) -> dict[str, list[str]]:
    """{class folder name: its image files} of one split folder (train/ or test/)."""
    classes = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise info.error(MalformedDatasetError, Path(entry.path),
                             "a file directly in the split folder: put each image in its class folder")
        images, others = _walk_images(Path(entry.path))
        if others:
            raise info.error(MalformedDatasetError, Path(others[0]), f"not an image (names end in "
                             f"{', '.join(IMAGE_EXTENSIONS)}): move it out of the class folder")
        if not images:
            raise info.error(MalformedDatasetError, Path(entry.path), "empty class folder: add its images or remove it")
        classes[entry.name] = images
    if not classes:
        raise info.error(MalformedDatasetError, split_dir, "no class folder, so no image")
    return classes


def _from_classes(classes: dict[str, list[str]], names) -> ImageSet:
    paths = [p for name in names for p in classes[name]]
    return _image_set(paths, np.array([name for name in names for _ in classes[name]], dtype=str))


def _read_folder(root: Path, info: _Info) -> dict:
    if not (root / "train").is_dir():
        raise info.error(DatasetNotFoundError, root, "no train/ folder")
    train = _class_folders(root / "train", info)
    if (root / "test").exists():
        test = _class_folders(root / "test", info)
        return {"train": _from_classes(train, sorted(train)), "test": _from_classes(test, sorted(test))}
    names = sorted(train)
    if len(names) < 2:
        raise info.error(MalformedDatasetError, root / "train",
                         "without test/ the classes are split in two halves, which needs at least 2 classes")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    half = (len(names) + 1) // 2
    return {"train": _from_classes(train, sorted(names[i] for i in order[:half])),
            "test": _from_classes(train, sorted(names[i] for i in order[half:])), "split_seed": SPLIT_SEED}


@dataclass(frozen=True)
class CsvRow:
    """One image of a csv dataset: absolute ``path``, ``label`` (class id), ``split`` ("train" /
    "test"), ``is_query`` / ``is_gallery`` (None without those columns), ``line`` in the file."""

    path: str
    label: str
    split: str
    is_query: bool | None
    is_gallery: bool | None
    line: int


def read_csv_rows(csv_path: str | os.PathLike, required: tuple[str, ...] = CSV_COLUMNS) -> list[CsvRow]:
    """Parse an image CSV (docs/architecture.md, "Your own data"): a header naming the columns, then
    one row per image. Paths are relative to the CSV's folder (absolute ones are used as is) and
    must exist; columns not in ``required`` may be absent ("" label, "test" split).

    Raises:
        DatasetNotFoundError: no such file. MalformedDatasetError: a missing column, a row with
        the wrong number of fields, an empty path or label, an unknown split, a bad is_query /
        is_gallery value, a path listed twice, one that does not exist or that names no image
        (``IMAGE_EXTENSIONS``); the message names the file and the line.
    """
    info = _DATASETS["csv"][0]
    csv_path = _absolute(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet programs write a byte-order mark
    except FileNotFoundError:
        raise info.error(DatasetNotFoundError, csv_path, "file missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise info.error(MalformedDatasetError, csv_path, f"cannot read file: {err}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in required if name not in header]
    if missing:
        raise info.error(MalformedDatasetError, csv_path, f"line 1 (the header) has no column "
                         f"{', '.join(missing)}; it has {','.join(header) or 'nothing'}")
    protocol = [name for name in ("is_query", "is_gallery") if name in header]
    if len(protocol) == 1:
        raise info.error(MalformedDatasetError, csv_path,
                         f"the header has {protocol[0]} without its partner: give is_query and is_gallery, or neither")
    column = {name: header.index(name) for name in header}
    folder, rows, seen = csv_path.parent, [], {}

    def bad(problem: str) -> DatasetError:
        return info.error(MalformedDatasetError, csv_path, f"line {reader.line_num}: {problem}")

    def flag(fields, name) -> bool | None:
        if not protocol:
            return None
        value = fields[column[name]].strip().lower()
        if value not in _TRUE + _FALSE:
            raise bad(f"{name} {value!r} is not one of 1, 0, true, false")
        return value in _TRUE

    for fields in reader:
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            raise bad(f"{len(fields)} fields, expected {len(header)} ({','.join(header)})")
        rel, label, split = (fields[column[name]].strip() if name in column else default
                             for name, default in (("path", ""), ("label", ""), ("split", "test")))
        if not rel or ("label" in required and not label):
            raise bad("empty " + ("path" if not rel else "label"))
        if split.lower() not in CSV_SPLITS:
            raise bad(f"split {split!r} is not one of {', '.join(CSV_SPLITS)}")
        path = os.path.normpath(os.path.join(folder, rel))
        if path in seen:
            raise bad(f"{rel} is listed again (first on line {seen[path]}); list each image once")
        if not os.path.isfile(path):
            raise bad(f"image {rel} does not exist ({path}; relative paths start at the CSV's folder)")
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise bad(f"{rel} is not an image (names end in {', '.join(IMAGE_EXTENSIONS)}): list images only")
        seen[path] = reader.line_num
        rows.append(CsvRow(path, label, CSV_SPLITS[split.lower()], flag(fields, "is_query"),
                           flag(fields, "is_gallery"), reader.line_num))
    if not rows:
        raise info.error(MalformedDatasetError, csv_path, "no data rows after the header")
    return rows


def _read_csv(csv_path: Path, info: _Info) -> dict:
    rows = read_csv_rows(csv_path)

    def images(chosen, class_keys=None) -> ImageSet:
        return _image_set([r.path for r in chosen], np.array([r.label for r in chosen], dtype=str), class_keys)

    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    wrong = next((r for r in train if r.is_query or r.is_gallery), None)
    if wrong is not None:
        raise info.error(MalformedDatasetError, csv_path,
                         f"line {wrong.line}: a train row is marked query or gallery; only test rows are")
    sets = {"train": images(train)}
    if not test or test[0].is_query is None or all(r.is_query and r.is_gallery for r in test):
        sets["test"] = images(test)   # single-set protocol: every test image queries all the others
    else:
        for r in test:
            if r.is_query == r.is_gallery:
                raise info.error(MalformedDatasetError, csv_path, (
                    f"line {r.line}: a test row is {'both' if r.is_query else 'neither'} query and "
                    f"{'' if r.is_query else 'nor '}gallery; mark each one or the other "
                    "(or every test row both, for the single-set protocol)"))
        shared = np.unique(np.array([r.label for r in test], dtype=str))
        sets["query"] = images([r for r in test if r.is_query], shared)
        sets["gallery"] = images([r for r in test if r.is_gallery], shared)
    _require_nonempty(sets, csv_path, info, "split train / test")
    return sets


_SOP_LAYOUT = (
    "{folder}/Ebay_train.txt and {folder}/Ebay_test.txt "
    "(header 'image_id class_id super_class_id path', paths relative to {folder})"
)

# name -> (what it is, its reader); a reader returns Dataset fields: the split ImageSets (and split_seed)
_DATASETS: dict[str, tuple[_Info, Callable[[Path, _Info], dict]]] = {
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
        "`fastiaa data kanji --out DIR` renders it here (fastiaa.data.build_kanji)",
        "square", (1, 2, 4, 8)), _read_sop),
    "folder": (_Info(
        "Folder dataset", None, "",
        "DIR/train/<class>/<images> and optionally DIR/test/<class>/<images>, one folder per class "
        "(without test/ the classes are split in two halves)", None, "square", (1, 2, 4, 8)), _read_folder),
    "csv": (_Info(
        "CSV dataset", None, "",
        "a CSV file with the header path,label,split (optional is_query,is_gallery), one row per image, "
        "split train or test (or validation), paths relative to the CSV", None, "square", (1, 2, 4, 8)), _read_csv),
}

DATASETS: tuple[str, ...] = tuple(_DATASETS)
"""Names accepted by :func:`load_dataset`."""


def resize_mode(name: str) -> str:
    """The eval resize of a dataset (``Dataset.resize``) without reading it: "square" or "shorter".

    Raises:
        DatasetError: unknown name.
    """
    return _info(name)[0].resize


def _info(name: str) -> tuple[_Info, Callable[[Path, _Info], dict]]:
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _DATASETS[name]


def load_dataset(name: str, root: str | os.PathLike) -> Dataset:
    """Read a dataset's split lists from disk (docs/method.md §1); images are not opened.

    Args:
        name: one of ``DATASETS`` ("cub200", "cars196", "stanford", "inshop", "kanji", "folder", "csv").
        root: the folder holding the dataset folder (e.g. ``root/CUB_200_2011``) or the
            dataset folder itself; ``folder``: the folder holding train/ (and test/); ``csv``:
            the CSV file.

    Returns:
        Dataset with absolute image paths. Class splits (zero-shot): CUB classes 1-100 train,
        101-200 test; Cars196 classes 1-98 train, 99-196 test; SOP / kanji: Ebay_train.txt /
        Ebay_test.txt; In-Shop: evaluation_status train / query / gallery, query and gallery
        numbered together by item id; folder: train/ and test/ (without test/, the classes
        in two halves drawn with ``SPLIT_SEED``: ceil(C/2) train); csv: the split column, and
        query / gallery from is_query / is_gallery when given. Custom labels are class-folder
        names or the label column, numbered in sorted order.

    Raises:
        DatasetError: unknown name; DatasetNotFoundError: a list file, the image folder or a
        listed image is missing; MalformedDatasetError: a list file does not follow the
        format. The message names the file (and line), the expected layout and where the
        dataset is published.
    """
    info, read = _info(name)
    folder = _find_folder(root, info) if info.folder else _absolute(root)
    fields = read(folder, info)
    first = fields["train"].paths[0]
    if not os.path.isfile(first):
        raise info.error(DatasetNotFoundError, Path(first), "image listed in the split files is missing")
    return Dataset(**{"test": None, "query": None, "gallery": None, **fields}, name=name, root=str(folder),
                   resize=info.resize, recall_ks=info.recall_ks)
