"""Find broken image files before training (``fastiaa data check`` decodes every file; a run reads the
headers of the splits it does not decode into its cache), and describe a dataset's splits."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import DatasetError


def check_images(paths: Sequence[str], decode: bool = True, threads: int = 4, desc: str = "checking images",
                 show: bool = True) -> list[tuple[str, str]]:
    """Open each image file with PIL, in ``threads`` threads, with a progress bar.

    Args:
        paths: image file paths (e.g. ``ImageSet.paths``).
        decode: decode the whole image (finds truncated files too); False reads the header only
            (missing, empty or non-image files), which is much faster.

    Returns:
        [(path, error message)] for every bad file, in input order; empty when all open.
    """
    def problem(path: str) -> str | None:
        try:
            with Image.open(path) as image:
                if decode:
                    image.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return f"{type(err).__name__}: {err}"
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(tqdm(pool.map(problem, paths, chunksize=64), total=len(paths), desc=desc, unit="img",
                            leave=False, disable=not show, dynamic_ncols=True))
    return [(path, error) for path, error in zip(paths, results) if error is not None]


def unreadable_images_error(bad: list[tuple[str, str]], dataset: str, root: str, shown: int = 5) -> DatasetError:
    """One error that lists the unreadable files at once and the command that lists them all."""
    listed = "; ".join(f"{path} ({error})" for path, error in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    error = DatasetError(f"{len(bad)} image(s) cannot be read: {listed}{more}. Replace or remove them from the split "
                         f"files (`fastiaa data check --dataset {dataset} --data {root}` lists every one)")
    error.bad = list(bad)
    return error


_SINGLE_IMAGE = {  # what a class with a single image means in each split (it is legal everywhere)
    "train": "legal: batches skip them (no positive pair), the statistics keep them and neighbour correction "
             "serves the classes with few images, docs/method.md §4",
    "test": "legal: as queries they have no positive, so Recall@K counts them as misses and MAP@R leaves them "
            "out, docs/method.md §8",
    "query": "legal", "gallery": "legal",
}


def describe(dataset) -> list[str]:
    """One line per split of a ``fastiaa.data.Dataset``: images, classes, images per class, and the
    classes with a single image (legal; the line says what they mean there); a last line when train
    and evaluation share class ids (zero-shot protocols keep them apart, docs/method.md §1)."""
    lines = []
    for name in ("train", "test", "query", "gallery"):
        images = getattr(dataset, name)
        if images is None:
            continue
        counts = np.bincount(images.labels, minlength=images.num_classes)
        sizes, lone = counts[counts > 0], [images.class_ids[k] for k in np.flatnonzero(counts == 1)]
        spread = (f"{sizes.min()}" if sizes.min() == sizes.max() else
                  f"{sizes.min()}-{sizes.max()} (median {np.median(sizes):g})")
        line = (f"{name}: {len(images)} images, {len(sizes)} classes, {spread} images per class, "
                f"{len(lone)} with a single image")
        if lone:
            shown = ", ".join(lone[:5]) + (", ..." if len(lone) > 5 else "")
            line += f" ({shown}; {_SINGLE_IMAGE[name]})"
        lines.append(line)
    held_out = {c for n in ("test", "query", "gallery") if getattr(dataset, n) is not None
                for c in getattr(dataset, n).class_ids}
    shared = sorted(set(dataset.train.class_ids) & held_out)
    if shared:
        shown = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        lines.append(f"{len(shared)} class ids are both in train and in the evaluation split ({shown}): "
                     "zero-shot retrieval keeps them apart (docs/method.md §1)")
    return lines
