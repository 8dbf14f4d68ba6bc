"""Decode every image of a dataset to find broken files before training (``fastiaa data check``)."""
from __future__ import annotations

from typing import Iterable

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
