"""``fastiaa data check``: decode every image of a dataset to find broken files before training, and
describe its splits."""
from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm


def check_images(paths: Iterable[str]) -> list[tuple[str, str]]:
    """Open and fully decode each image file with PIL.

    Args:
        paths: image file paths (e.g. ``ImageSet.paths``).

    Returns:
        [(path, error message)] for every file that is missing, truncated or not a decodable
        image, in input order; an empty list when all images decode.
    """
    failures = []
    for path in tqdm(paths, desc="checking images", unit="img"):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            failures.append((path, f"{type(err).__name__}: {err}"))
    return failures


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
