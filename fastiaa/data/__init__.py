"""Datasets (docs/method.md §1), the balanced batch sampler (docs/method.md §2) and the kanji demo data."""
from .check import check_images, unreadable_images_error
from .datasets import (
    DATASETS, Dataset, DatasetError, DatasetNotFoundError, ImageSet, MalformedDatasetError, load_dataset,
)
from .kanji import build_kanji
from .sampler import BalancedBatchSampler

__all__ = [
    "BalancedBatchSampler", "DATASETS", "Dataset", "DatasetError", "DatasetNotFoundError", "ImageSet",
    "MalformedDatasetError", "build_kanji", "check_images", "load_dataset", "unreadable_images_error",
]
