"""The torchvision reference loader (the authors' transforms on PIL images; docs/method.md §2).

Workers decode with PIL and apply stage 1 (resize; for eval the centre crop) and stage 2 (train:
the random resized crop and the flip) on uint8 images; the main process stacks the uint8 crops,
moves them to the device and normalises the whole batch at once into channels-last float. With an
``ImageCache`` (pipelines.cache) stage 1 is read from the cache and stage 2 runs on the very same
PIL operations in a thread pool of the main process, so a cached batch equals an uncached one
bit for bit; a cache in GPU memory crops and resizes on the GPU instead (torch, antialiased
bilinear: close to PIL, not equal).
"""
from __future__ import annotations

import functools
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from .cache import ImageCache
from .core import Batch, Normalization, centre_crop_origin, crop_windows, normalize_nhwc, unreadable


def _decode_resized(path: str, size) -> Image.Image:
    """Stage 1: the file decoded to RGB and resized (``size``: [s, s], or the shorter side s)."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    return TF.resize(image, size, antialias=True)


def _crop(image: Image.Image, draws, crop: int) -> np.ndarray:
    """Stage 2 on a resized PIL image: the centre crop (``draws`` None) or the random resized crop
    of the ``draws`` row and its flip. Returns uint8 [crop, crop, 3] RGB."""
    if draws is None:
        (top,), (left,) = centre_crop_origin([image.height], [image.width], crop)
        image = image.crop((left, top, left + crop, top + crop))
    else:
        (top,), (left,), (h,), (w,), (flip,) = crop_windows(draws[None], [image.height], [image.width])
        image = TF.resized_crop(image, int(top), int(left), int(h), int(w), [crop, crop], antialias=True)
        if flip:
            image = TF.hflip(image)
    return np.asarray(image)


class _Images(torch.utils.data.Dataset):
    """Item ``(index, draws)`` -> (uint8 [crop, crop, 3] in the model's channel order, index, None),
    or (None, index, what is wrong) for a file that cannot be decoded: the main process raises it (one
    line naming the file, not a worker's traceback) or, filling a cache, lists every such file.
    ``draws`` None = eval transform; filling a cache, ``draws`` is its kind: ``"resized"`` gives
    stage 1 only (RGB), ``"crop"`` the eval crop."""

    def __init__(self, paths, resize: str, resize_size: int, crop_size: int, bgr: bool):
        self.paths = paths
        self.bgr = bgr
        self.size = [resize_size, resize_size] if resize == "square" else resize_size
        self.crop = crop_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, draws = item
        try:
            image = _decode_resized(self.paths[index], self.size)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return None, index, f"{type(err).__name__}: {err}"
        if isinstance(draws, str) and draws == "resized":
            return torch.from_numpy(np.asarray(image).copy()), index, None
        pixels = _crop(image, None if isinstance(draws, str) else draws, self.crop)
        return torch.from_numpy(_channels(pixels, self.bgr)), index, None


def _channels(pixels: np.ndarray, bgr: bool) -> np.ndarray:
    return np.ascontiguousarray(pixels[..., ::-1]) if bgr else pixels.copy()


def _collate(items):
    """-> (pixels: [b, h, w, 3] uint8, or a list where shapes differ or a file is broken (None),
    indices [b] int64, [(index, what is wrong)] of the broken files)."""
    indices = torch.tensor([index for _, index, _ in items], dtype=torch.int64)
    broken = [(index, error) for _, index, error in items if error is not None]
    shapes = {tuple(pixels.shape) for pixels, _, _ in items if pixels is not None}
    pixels = [p for p, _, _ in items]
    return (torch.stack(pixels) if len(shapes) == 1 and not broken else pixels), indices, broken
    # pinned by the DataLoader on a GPU run: the copies in ReferenceLoader are asynchronous


def _die_with_parent(parent: int, worker_id: int) -> None:
    """Loader workers end with the process that started them, however it ends (SIGKILL included):
    Linux's parent-death signal (prctl PR_SET_PDEATHSIG), and an exit at once when the parent died
    while the worker was starting; elsewhere torch's own watchdog."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(0)


def _data_loader(images, plan, resize, resize_size, crop_size, bgr, num_threads, device, persistent=True):
    workers = num_threads if num_threads > 1 else 0
    return torch.utils.data.DataLoader(
        _Images(images.paths, resize, resize_size, crop_size, bgr), batch_sampler=_Batches(plan),
        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0, prefetch_factor=2 if workers else None,
        # spawned workers: never a fork of a process that runs DALI / OpenMP threads (a fork can
        # deadlock), and their parent is this process, whose death ends them (_die_with_parent)
        multiprocessing_context="spawn" if workers else None,
        worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if workers else None)


class ReferenceLoader:
    """Iterates ``Batch``es through a torch DataLoader, or from an ``ImageCache``.

    plan: callable returning, per pass, a list of (indices [b] int64, draws [b, K] float64 or None);
    see ``loaders.TrainLoader.plan``.
    """

    def __init__(self, images, plan, normalization: Normalization, resize: str, resize_size: int,
                 crop_size: int, num_threads: int, device: str, dtype: torch.dtype, cache: ImageCache | None = None):
        self.device = torch.device(device)
        self.paths = images.paths
        self.labels = torch.tensor(np.asarray(images.labels), dtype=torch.int64, device=self.device)
        self.normalization, self.dtype, self.crop, self.plan, self.cache = normalization, dtype, crop_size, plan, cache
        if cache is None:
            self.loader = _data_loader(images, plan, resize, resize_size, crop_size, normalization.bgr, num_threads,
                                       self.device)
        else:
            self.pool = ThreadPoolExecutor(max(1, num_threads))  # PIL releases the GIL while it resamples

    def __iter__(self):
        batches = self.loader if self.cache is None else ((self._from_cache(i, d), torch.from_numpy(i), [])
                                                           for i, d in self.plan())
        pin = self.device.type == "cuda"
        for pixels, indices, broken in batches:
            if broken:
                raise unreadable(self.paths[broken[0][0]], broken[0][1])
            if pin and not pixels.is_cuda and not pixels.is_pinned():  # cached batches: asynchronous copies too
                pixels, indices = pixels.pin_memory(), indices.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
            indices = indices.to(self.device, non_blocking=True)
            yield Batch(images=normalize_nhwc(pixels, self.normalization, self.dtype), labels=self.labels[indices],
                        indices=indices)

    def _from_cache(self, indices: np.ndarray, draws) -> torch.Tensor:
        """Stage 2 of one batch from the cache: uint8 [b, crop, crop, 3] in the model's channel order."""
        cache, crop, bgr = self.cache, self.crop, self.normalization.bgr
        if cache.kind == "crop":     # the final crops (in the model's channel order already)
            return torch.stack([cache.image(int(i)) for i in indices])
        if cache.device.type == "cuda":
            return _crop_on_device(cache, indices, draws, crop, bgr)
        if draws is None:            # a refresh: centre crops of the resized images are slices
            shapes = cache.layout.shapes[indices]
            top, left = centre_crop_origin(shapes[:, 0], shapes[:, 1], crop)
            pixels = cache.crops(indices, top, left, crop)
            return pixels.flip(-1) if bgr else pixels

        def one(p):
            image = Image.fromarray(cache.image(int(indices[p])).numpy())
            return torch.from_numpy(_channels(_crop(image, draws[p], crop), bgr))

        return torch.stack(list(self.pool.map(one, range(len(indices)))))


def _crop_on_device(cache: ImageCache, indices, draws, crop: int, bgr: bool) -> torch.Tensor:
    """Stage 2 on the GPU from a cache in GPU memory: the windows of ``core.crop_windows`` (or the
    centre crops) resized by torch's antialiased bilinear interpolation, flipped, channel-ordered."""
    shapes = cache.layout.shapes[indices]
    if draws is None:
        top, left = centre_crop_origin(shapes[:, 0], shapes[:, 1], crop)
        pixels = cache.crops(indices, top, left, crop)
    else:
        top, left, h, w, flip = crop_windows(draws, shapes[:, 0], shapes[:, 1])
        out = []
        for k, i in enumerate(indices):
            window = cache.image(int(i))[top[k]:top[k] + h[k], left[k]:left[k] + w[k]].permute(2, 0, 1)[None].float()
            image = F.interpolate(window, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
            image = image[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
            out.append(image.flip(1) if flip[k] else image)
        pixels = torch.stack(out)
    return pixels.flip(-1) if bgr else pixels


def fill(cache: ImageCache, images, resize: str, resize_size: int, crop_size: int, bgr: bool, num_threads: int,
         progress=None) -> list[tuple[str, str]]:
    """The decode pass of the torchvision loader: stage 1 of every image into ``cache``
    (``"resized"``: RGB resized images; ``"crop"``: the eval crops in the model's channel order).

    Returns:
        [(path, error)] of every file that could not be read or decoded (their slots stay unset).
    """
    steps = [np.arange(s, min(s + 64, len(images))) for s in range(0, len(images), 64)]
    loader = _data_loader(images, lambda: [(i, np.array([cache.kind] * len(i))) for i in steps], resize, resize_size,
                          crop_size, bgr, num_threads, torch.device("cpu"), persistent=False)
    bad = []
    for pixels, indices, broken in loader:
        bad += [(images.paths[i], error) for i, error in broken]
        for p, i in enumerate(indices.tolist()):
            if pixels[p] is not None:
                cache.write(i, pixels[p])
        if progress is not None:
            progress(len(indices))
    return bad


class _Batches:
    """Batch sampler: the plan of the current pass as lists of dataset items (index, draws row)."""

    def __init__(self, plan):
        self.plan = plan

    def __iter__(self):
        for indices, draws in self.plan():
            yield [(int(index), None if draws is None else draws[p]) for p, index in enumerate(indices)]
