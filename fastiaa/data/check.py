"""Find broken image files before training: every file of a dataset opened (``fastiaa data check``
decodes each one; a run checks the headers of the splits it does not decode into its cache)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

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
