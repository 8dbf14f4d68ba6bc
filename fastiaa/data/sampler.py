"""Balanced m-per-class batch sampler (docs/method.md §2: m images of each of B/m classes per batch)."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class BalancedBatchSampler:
    """Yields batches of ``ceil(batch_size / images_per_class)`` distinct classes x ``images_per_class`` images.

    Args:
        labels: [N] integer class label of each dataset index (any integer values).
        batch_size: B, images per batch. When B is not a multiple of m, the last class of each
            batch contributes only the remaining ``B mod m`` images, as the official sampler does
            (the published SOP / In-Shop BN-Inception and ResNet-50 commands use B = 256, m = 3).
        images_per_class: m (docs/method.md §2: 4; 3 for SOP and In-Shop).
        iterations: batches per epoch (docs/method.md §2: min(len(train) // B, 300)).
        seed: non-negative int; the batches of an epoch are a function of (seed, epoch) only.

    Each batch lists its classes one after the other, m dataset indices each. Classes with a
    single image are never chosen (they have no positive). A class with at least m images gives
    m distinct images; a smaller class gives all its images, then repeats drawn with
    replacement. Classes are drawn uniformly without replacement within a batch.

    Raises:
        ValueError: non-positive sizes, or fewer than ceil(B/m) classes with two or more images.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, images_per_class: int, iterations: int, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-d integer array, got shape {labels.shape} dtype {labels.dtype}")
        if images_per_class < 1 or batch_size < 1 or iterations < 0:
            raise ValueError("batch_size and images_per_class must be positive and iterations non-negative")
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        eligible = np.flatnonzero(counts >= 2)
        classes_per_batch = -(-batch_size // images_per_class)
        if len(eligible) < classes_per_batch:
            raise ValueError(
                f"a batch needs {classes_per_batch} classes with two or more images, "
                f"the labels have only {len(eligible)}; lower the batch size (--batch) or raise the images "
                f"per class (--num_image_per_class)"
            )
        # dataset indices grouped by class: class k owns order[starts[k] : starts[k] + counts[k]]
        self._order = np.argsort(inverse, kind="stable")
        self._starts = (np.cumsum(counts) - counts)[eligible]
        self._counts = counts[eligible]
        self.batch_size = batch_size
        self.images_per_class = images_per_class
        self.classes_per_batch = classes_per_batch
        self.iterations = iterations
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.iterations

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        m = self.images_per_class
        for _ in range(self.iterations):
            chosen = rng.choice(len(self._counts), self.classes_per_batch, replace=False)
            counts = self._counts[chosen][:, None]  # [P, 1]
            width = max(int(counts.max()), m)
            # a random permutation of each class's positions: padding keys (>= 1) sort last
            keys = rng.random((len(chosen), width)) + (np.arange(width) >= counts)
            distinct = np.argsort(keys, axis=1)[:, :m]  # [P, m]
            repeats = (rng.random((len(chosen), m)) * counts).astype(np.int64)
            positions = np.where(distinct < counts, distinct, repeats)
            yield self._order[self._starts[chosen][:, None] + positions].ravel()[: self.batch_size].tolist()
