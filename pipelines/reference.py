"""The torchvision reference loader (the authors' transforms on PIL images; docs/method.md §2).

Workers decode with PIL and apply resize -> random resized crop -> flip (train) or
resize -> centre crop (eval) on uint8 images; the main process stacks the uint8 crops, moves them
to the device and normalises the whole batch at once into channels-last float.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .core import Batch, Normalization, centre_crop_origin, crop_windows, normalize_nhwc, unreadable


class _Images(torch.utils.data.Dataset):
    """Item ``(index, draws)`` -> (uint8 [crop, crop, 3] RGB or BGR, index, None), or (None, index, error
    text) for a file that cannot be decoded, which the main process raises (one line naming it).
    ``draws`` None = eval transform."""

    def __init__(self, paths, resize: str, resize_size: int, crop_size: int, bgr: bool):
        self.paths = paths
        self.bgr = bgr
        self.size = [resize_size, resize_size] if resize == "square" else resize_size
        self.crop = crop_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, draws = item
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return None, index, f"{type(err).__name__}: {err}"
        image = TF.resize(image, self.size, antialias=True)
        if draws is None:
            (top,), (left,) = centre_crop_origin([image.height], [image.width], self.crop)
            image = image.crop((left, top, left + self.crop, top + self.crop))
        else:
            (top,), (left,), (h,), (w,), (flip,) = crop_windows(draws[None], [image.height], [image.width])
            image = TF.resized_crop(image, int(top), int(left), int(h), int(w), [self.crop, self.crop], antialias=True)
            if flip:
                image = TF.hflip(image)
        pixels = np.asarray(image)
        return torch.from_numpy(np.ascontiguousarray(pixels[..., ::-1]) if self.bgr else pixels.copy()), index, None


def _collate(items):
    """-> (pixels [b, crop, crop, 3] uint8, indices [b] int64), or (None, (index, error)) of the first broken file."""
    broken = next(((index, error) for pixels, index, error in items if pixels is None), None)
    if broken is not None:
        return None, broken
    pixels = torch.stack([pixels for pixels, _, _ in items])
    indices = torch.tensor([index for _, index, _ in items], dtype=torch.int64)
    return pixels, indices  # pinned by the DataLoader on a GPU run: the copies below are asynchronous


class ReferenceLoader:
    """Iterates ``Batch``es through a torch DataLoader.

    plan: callable returning, per pass, a list of (indices [b] int64, draws [b, K] float64 or None);
    see ``loaders.TrainLoader.plan``.
    """

    def __init__(self, images, plan, normalization: Normalization, resize: str, resize_size: int,
                 crop_size: int, num_threads: int, device: str, dtype: torch.dtype):
        self.device = torch.device(device)
        self.paths = images.paths
        self.labels = torch.tensor(np.asarray(images.labels), dtype=torch.int64, device=self.device)
        self.normalization = normalization
        self.dtype = dtype
        workers = num_threads if num_threads > 1 else 0
        self.loader = torch.utils.data.DataLoader(
            _Images(images.paths, resize, resize_size, crop_size, normalization.bgr), batch_sampler=_Batches(plan),
            num_workers=workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
            # workers never fork a process that already runs DALI / OpenMP threads (a fork can deadlock)
            multiprocessing_context="forkserver" if workers else None)

    def __iter__(self):
        for pixels, indices in self.loader:
            if pixels is None:
                index, error = indices
                raise unreadable(self.paths[index], error)
            pixels = pixels.to(self.device, non_blocking=True)
            indices = indices.to(self.device, non_blocking=True)
            yield Batch(images=normalize_nhwc(pixels, self.normalization, self.dtype), labels=self.labels[indices],
                        indices=indices)


class _Batches:
    """Batch sampler: the plan of the current pass as lists of dataset items (index, draws row)."""

    def __init__(self, plan):
        self.plan = plan

    def __iter__(self):
        for indices, draws in self.plan():
            yield [(int(index), None if draws is None else draws[p]) for p, index in enumerate(indices)]
