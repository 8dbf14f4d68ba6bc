"""``build_train_loader`` / ``build_eval_loader`` / ``build_cache``: one entry point for both loader kinds."""
from __future__ import annotations

import numpy as np
import torch

from . import cache as caching
from .cache import ImageCache
from .core import Normalization, augment_draws, check_geometry

KINDS = ("torchvision", "dali")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _make(kind, images, plan, train, batch_size, normalization, resize, resize_size, crop_size, num_threads,
          device, dtype, seed, cache=None):
    if kind not in KINDS:
        raise ValueError(f"loader kind must be one of {KINDS}, got {kind!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    if not isinstance(normalization, Normalization):
        raise TypeError(f"normalization must be a Normalization (see NORMALIZATIONS), got {normalization!r}")
    check_geometry(resize, resize_size, crop_size)
    if len(images) == 0:
        raise ValueError("the ImageSet is empty: nothing to load")
    if cache is not None and len(cache) != len(images):
        raise ValueError(f"the cache holds {len(cache)} images but the ImageSet {len(images)}: build it for this set")
    if cache is not None and train and cache.kind != "resized":
        raise ValueError("train batches crop from the resized images: give the train loader a 'resized' cache")
    if kind == "dali":
        from .dali import DaliLoader
        return DaliLoader(images, plan, train, batch_size, normalization, resize, resize_size, crop_size,
                          num_threads, device, dtype, seed, cache=cache)
    from .reference import ReferenceLoader
    return ReferenceLoader(images, plan, normalization, resize, resize_size, crop_size, num_threads, device, dtype,
                           cache=cache)


class TrainLoader:
    """Train batches: the sampler's exact index batches, in order, with the docs/method.md §2 train transform.

    ``set_epoch(e)`` selects the epoch (and calls ``sampler.set_epoch(e)``); the same (seed, epoch)
    gives the same batches and the same crops and flips, with either loader kind. Iterating yields
    ``len(self)`` ``Batch``es (images [B, 3, crop, crop] channels-last ``dtype``). With
    ``shard=(rank, world_size)`` each batch is this rank's contiguous share of the sampler's
    global batch, with the very crops and flips that share gets in a single-process run.
    """

    def __init__(self, kind, images, sampler, normalization, resize, resize_size, crop_size, seed, num_threads,
                 device, dtype, shard=(0, 1), cache=None):
        rank, world_size = shard
        if not 0 <= rank < world_size or sampler.batch_size % world_size:
            raise ValueError(f"shard {shard}: need 0 <= rank < world_size dividing the batch size "
                             f"{sampler.batch_size}")
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0
        per_rank = sampler.batch_size // world_size
        self.part = slice(rank * per_rank, (rank + 1) * per_rank)
        self.impl = _make(kind, images, self.plan, True, per_rank, normalization, resize, resize_size,
                          crop_size, num_threads, device, dtype, seed, cache)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(self.epoch)

    def plan(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This epoch's batches: (indices [B] int64, augment_draws [B, K] float64) per step."""
        return [(np.asarray(batch, np.int64)[self.part], augment_draws(self.seed, self.epoch, step, len(batch))[self.part])
                for step, batch in enumerate(self.sampler)]

    def __iter__(self):
        return iter(self.impl)

    def __len__(self) -> int:
        return len(self.sampler)


def build_train_loader(kind: str, images, sampler, normalization: Normalization, resize: str,
                       resize_size: int = 256, crop_size: int = 224, seed: int = 0, num_threads: int = 2,
                       device: str = "cpu", dtype: torch.dtype = torch.float32,
                       shard: tuple[int, int] = (0, 1), cache: ImageCache | None = None) -> TrainLoader:
    """Train loader over ``images`` (a fastiaa.data.ImageSet) in the order of ``sampler``.

    Transform (docs/method.md §2): decode -> RGB (BGR for BN-Inception) -> resize ("square": resize_size²,
    "shorter": shorter side resize_size) -> random resized crop to crop_size (area (0.16, 1) of the
    resized image, aspect (0.75, 1.33)) -> horizontal flip with p = 1/2 -> normalisation.
    kind: "torchvision" (PIL + DataLoader with ``num_threads`` workers, none if <= 1) or "dali"
    (DALI pipeline with ``num_threads`` CPU threads; GPU decode when ``device`` is CUDA).
    dtype: float32, float16 (DALI writes fp16 directly) or bfloat16 (converted after the pipeline).
    shard: (rank, world_size) for DistributedDataParallel: this rank's share of every global batch.
    cache: a ``"resized"`` :func:`build_cache` of ``images`` (same loader kind and geometry): the batches
    crop from it instead of decoding, and equal the uncached ones.
    Raises ValueError for a bad kind/geometry/dtype, ImportError for kind "dali" without DALI, and
    OSError naming the file when an image cannot be read or decoded (during iteration).
    """
    return TrainLoader(kind, images, sampler, normalization, resize, resize_size, crop_size, seed, num_threads,
                       device, dtype, shard, cache)


def build_eval_loader(kind: str, images, batch_size: int, normalization: Normalization, resize: str,
                      resize_size: int = 256, crop_size: int = 224, num_threads: int = 2, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, cache: ImageCache | None = None):
    """Eval loader: every image of ``images`` exactly once, in dataset order, in batches of
    ``batch_size`` with a smaller last batch (never padded). Transform (docs/method.md §2): resize ("square":
    resize_size², "shorter": shorter side resize_size) -> centre crop crop_size -> normalisation.
    cache: a :func:`build_cache` of ``images`` ("crop", or "resized" shared with the train loader).
    Returns an iterable of ``Batch`` (re-iterable); other arguments and errors as build_train_loader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = [np.arange(start, min(start + batch_size, len(images)), dtype=np.int64)
             for start in range(0, len(images), batch_size)]

    def plan():
        return [(indices, None) for indices in steps]

    return _make(kind, images, plan, False, batch_size, normalization, resize, resize_size, crop_size,
                 num_threads, device, dtype, 0, cache)


def build_cache(kind: str, images, cache_kind: str, normalization: Normalization, resize: str,
                resize_size: int = 256, crop_size: int = 224, num_threads: int = 2, device: str = "cpu",
                where: str = "ram", cache_dir=None, progress=None, say=print, layout=None, dataset: str = "DATASET",
                root: str = "DATA") -> ImageCache:
    """Decode ``images`` once, through the loader ``kind``'s own stage 1 (pipelines.cache), into a cache.

    Args:
        cache_kind: ``"resized"`` (train epochs and refreshes crop from it) or ``"crop"`` (the final
            centre crops, for a split that is only evaluated).
        where: ``"ram"`` (pinned when ``device`` is CUDA) or ``"device"`` (GPU memory).
        cache_dir: a folder for a persistent, memory-mapped cache shared by later runs (host memory).
        progress: called with the number of images of each decoded batch (a progress bar).
        layout: ``pipelines.cache.layout`` of ``images`` when already computed.
        dataset, root: the dataset's name and root, for the message about unreadable files.

    Raises:
        DatasetError: images that cannot be read or decoded (the message lists them at once).
    """
    from fastiaa.data import unreadable_images_error

    check_geometry(resize, resize_size, crop_size)
    device = torch.device(device)
    lay = layout or caching.layout(images.paths, cache_kind, resize, resize_size, crop_size)

    def fill(cache: ImageCache) -> None:
        if kind == "dali":
            from . import dali
            bad = dali.fill(cache, images, normalization, resize, resize_size, crop_size, num_threads, str(device),
                            progress)
        else:
            from . import reference
            bad = reference.fill(cache, images, resize, resize_size, crop_size, normalization.bgr, num_threads,
                                 progress)
        if bad:
            raise unreadable_images_error(bad, dataset, root)

    if kind not in KINDS:
        raise ValueError(f"loader kind must be one of {KINDS}, got {kind!r}")
    if cache_dir is not None:
        settings = dict(loader=kind, resize=resize, resize_size=resize_size, crop=crop_size, bgr=normalization.bgr)
        cache = caching.open_or_build(cache_dir, images.paths, cache_kind, settings, lay, fill, say)
        return cache if where != "device" else ImageCache(lay, cache.storage.to(device), cache_kind)
    cache = caching.allocate(lay, cache_kind, where, device)
    fill(cache)
    return cache
