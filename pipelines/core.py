"""What both loaders share: normalisation, the batch record, image geometry and the seeded
augmentation draws (docs/method.md §2).

Every random number of the train transform is drawn here, in the main process, from
``(seed, epoch, batch index)``; the torchvision and the DALI loaders only *apply* the crop windows
and flips that these functions return. The same ``(seed, epoch)`` therefore gives the same
augmentations whatever the loader, the number of worker threads or their scheduling, and a resumed
run (``set_epoch(e)``) continues the stream exactly.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fastiaa.errors import UnreadableImageError

CROP_SCALE = (0.16, 1.0)      # docs/method.md §2: random resized crop, area fraction of the resized image
CROP_RATIO = (0.75, 1.33)     # docs/method.md §2: width / height of the crop window
CROP_TRIES = 10               # torchvision RandomResizedCrop: tries before the centre-crop fallback
RESIZE_MODES = ("square", "shorter")
# uniform draws per sample: CROP_TRIES scales, CROP_TRIES log-ratios, top, left, flip
DRAWS_PER_SAMPLE = 2 * CROP_TRIES + 3


@dataclass(frozen=True)
class Normalization:
    """Input space of a backbone (docs/method.md §2).

    ``out[c] = (pixel[c] / 255 * scale - mean[c]) / std[c]`` with ``pixel`` the uint8 value of
    channel ``c`` in RGB order, or in BGR order when ``bgr`` is true; ``mean``/``std`` are given in
    that output channel order and in the units of ``pixel / 255 * scale``.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool
    scale: float

    def pixel_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """The same affine map on raw uint8 pixels: ``out = (pixel - m) / s``; float64 [3] each."""
        factor = 255.0 / self.scale
        return np.asarray(self.mean) * factor, np.asarray(self.std) * factor


NORMALIZATIONS = {
    "imagenet": Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bgr=False, scale=1.0),
    "bninception": Normalization(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), bgr=True, scale=255.0),
}


@dataclass
class Batch:
    """One batch for the model.

    images: [B, 3, H, W] float32 (or the loader's dtype), channels-last memory (NHWC underneath).
    labels: [B] int64 class indices. indices: [B] int64 positions in the ImageSet.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def check_geometry(resize: str, resize_size: int, crop_size: int) -> None:
    """Raise ValueError unless ``resize`` is a known mode and ``crop_size <= resize_size``."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES} (the Dataset's .resize), got {resize!r}")
    if not 0 < crop_size <= resize_size:
        raise ValueError(f"need 0 < crop_size <= resize_size, got crop_size={crop_size}, resize_size={resize_size}")


def resized_shape(heights: np.ndarray, widths: np.ndarray, resize: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image size after the first resize of docs/method.md §2, as torchvision computes it.

    "square": (size, size). "shorter": the shorter side becomes ``size`` and the longer one
    ``int(size * long / short)`` (truncated, like ``torchvision.transforms.Resize(size)``).
    heights, widths: [N] int original sizes (ignored for "square"). Returns two [N] int64 arrays.
    """
    heights = np.asarray(heights, np.int64)
    widths = np.asarray(widths, np.int64)
    if resize == "square":
        full = np.full(heights.shape, size, np.int64)
        return full, full.copy()
    short = np.minimum(heights, widths)
    long = (size * np.maximum(heights, widths)) // short
    tall = heights > widths
    return np.where(tall, long, size), np.where(tall, size, long)


def centre_crop_origin(heights: np.ndarray, widths: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corner of the centred ``crop`` window: ``round((extent - crop) / 2)``, halves to even
    (``torchvision.transforms.CenterCrop``). [N] int64 each."""
    top = np.rint((np.asarray(heights) - crop) / 2.0).astype(np.int64)
    left = np.rint((np.asarray(widths) - crop) / 2.0).astype(np.int64)
    return top, left


def augment_draws(seed: int, epoch: int, batch_index: int, batch_size: int) -> np.ndarray:
    """The uniform [0, 1) numbers that decide one train batch's crops and flips.

    A pure function of (seed, epoch, batch_index); row ``p`` belongs to position ``p`` of the batch.
    Returns [batch_size, DRAWS_PER_SAMPLE] float64.
    """
    rng = np.random.default_rng([int(seed), int(epoch), int(batch_index)])
    return rng.random((batch_size, DRAWS_PER_SAMPLE))


def crop_windows(draws: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                 scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO):
    """Random-resized-crop windows and flips from ``augment_draws`` rows (docs/method.md §2).

    The sampling rule of ``torchvision.transforms.RandomResizedCrop.get_params``: up to
    CROP_TRIES tries of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the first
    window that fits is placed uniformly; if none fits, the whole image clamped to ``ratio``,
    centred. The horizontal flip has probability 1/2.

    draws: [N, DRAWS_PER_SAMPLE]; heights, widths: [N] sizes of the (resized) image the crop is
    taken from. Returns (top, left, height, width) [N] int64 each, in pixels, and flip [N] bool.
    """
    heights = np.asarray(heights, np.int64)
    widths = np.asarray(widths, np.int64)
    t = CROP_TRIES
    area = (heights * widths)[:, None]
    target = area * (scale[0] + draws[:, :t] * (scale[1] - scale[0]))
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(log_lo + draws[:, t:2 * t] * (log_hi - log_lo))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(draws))
    w, h, found = w[rows, first], h[rows, first], fits[rows, first]
    # fallback: the whole image with its aspect ratio clamped into `ratio`, centred
    in_ratio = widths / heights
    fw = np.where(in_ratio < ratio[0], widths, np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]), widths))
    fh = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]), heights)
    w = np.where(found, w, fw.astype(np.int64))
    h = np.where(found, h, fh.astype(np.int64))
    top = np.where(found, (draws[:, 2 * t] * (heights - h + 1)).astype(np.int64), (heights - h) // 2)
    left = np.where(found, (draws[:, 2 * t + 1] * (widths - w + 1)).astype(np.int64), (widths - w) // 2)
    flip = draws[:, 2 * t + 2] < 0.5
    return top, left, h, w, flip


def unreadable(path: str, error: BaseException | str) -> UnreadableImageError:
    """The error every loader raises for an image it cannot read or decode (names the file)."""
    return UnreadableImageError(f"cannot read or decode image {path!r}: {error}. Replace or remove the file "
                                f"(`fastiaa data check` lists every unreadable image of a dataset).", path)


def read_bytes(path: str) -> np.ndarray:
    """The encoded file as [nbytes] uint8; raises ``unreadable`` for a missing or empty file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise unreadable(path, err) from err
    if data.size == 0:
        raise unreadable(path, ValueError("empty file"))
    return data


def image_size(path: str, data: np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image from its header (PIL, no decoding)."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return im.height, im.width
    except Exception as err:  # PIL raises several types for bad headers
        raise unreadable(path, err) from err


def normalize_nhwc(pixels: torch.Tensor, normalization: Normalization, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, H, W, 3] pixels, already in the normalisation's channel order (BGR when
    ``normalization.bgr``) -> normalised [B, 3, H, W] ``dtype`` with channels-last memory (a new
    tensor on ``pixels.device``; the arithmetic is float32, then cast to ``dtype``)."""
    mul, add = _affine(normalization, pixels.device)
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device).copy_(pixels)
    torch.addcmul(add, out, mul, out=out)   # in place: a promoting addcmul is much slower on the CPU
    return out.to(dtype).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _affine(normalization: Normalization, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 / s, −m / s)`` of :meth:`Normalization.pixel_mean_std` on ``device``, made once (a copy
    to a GPU for every batch would wait for the device)."""
    mean, std = normalization.pixel_mean_std()
    return (torch.tensor(1.0 / std, dtype=torch.float32, device=device),
            torch.tensor(-mean / std, dtype=torch.float32, device=device))
