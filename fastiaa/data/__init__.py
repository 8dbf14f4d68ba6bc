"""Datasets (docs/method.md §1; your own images as class folders or a CSV), the balanced batch sampler
(docs/method.md §2) and the kanji demo data."""
from .check import check_images, unreadable_images_error
from .datasets import (
    DATASETS, IMAGE_EXTENSIONS, Dataset, DatasetError, DatasetNotFoundError, ImageSet, MalformedDatasetError,
    list_images, load_dataset, read_csv_rows, resize_mode,
)
from .kanji import build_kanji
from .sampler import BalancedBatchSampler

__all__ = [
    "BalancedBatchSampler", "DATASETS", "Dataset", "DatasetError", "DatasetNotFoundError", "IMAGE_EXTENSIONS",
    "ImageSet", "MalformedDatasetError", "build_kanji", "check_images", "list_images", "load_dataset",
    "read_csv_rows", "resize_mode", "unreadable_images_error",
]
