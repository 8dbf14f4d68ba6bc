"""NVIDIA DALI pipelines: decode and augment into NHWC batches (docs/method.md §2).

One graph for both devices; only the placement differs: on a GPU the decoder is ``mixed`` and the
operators run on ``gpu``, without one (``device_id=None``) everything runs on the CPU backend.

    encoded bytes ──decoders.image──▶ uint8 HWC (RGB, or BGR for BN-Inception)
      ──resize (per-sample size: 256×256, or shorter side 256)──▶
      train: ──resize of the crop window (roi_start/roi_end) to crop×crop──▶ crop_mirror_normalize(mirror)
      eval:  ──crop_mirror_normalize(centre crop)
    ──▶ float32/float16 NHWC, viewed by torch (DLPack, no copy) as channels-last NCHW

The file bytes and every geometric parameter come from one batch callback
(``fn.external_source``), computed in Python from the loader's plan: the exact sampler indices in
order, the crop windows and flips of ``core.crop_windows``. The graph itself draws no random numbers,
so the stream depends only on (seed, epoch) and ``set_epoch`` costs nothing.

With an ``ImageCache`` (pipelines.cache) the callback hands the cached uint8 images to the same
graph without its decoder and first resize (a cache in GPU memory goes in as GPU tensors), so a
cached batch equals an uncached one bit for bit; :func:`fill` is the decode pass that fills a cache
(the graph up to the first resize, or to the centre crop).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from .cache import ImageCache
from .core import (Batch, Normalization, centre_crop_origin, crop_windows, image_size, read_bytes,
                   resized_shape, unreadable)

try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError as _err:  # DALI wheels exist for Linux x86_64/aarch64 only
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

PREFETCH = 2   # batches DALI prepares ahead of the consumer


def require_dali() -> None:
    """Raise ImportError with the way out when NVIDIA DALI cannot be imported."""
    if _IMPORT_ERROR is not None:
        raise ImportError(
            f"the DALI loader needs NVIDIA DALI ({_IMPORT_ERROR}); install it with "
            "`pip install nvidia-dali-cuda120` (Linux only) or run with `--loader torchvision`") from _IMPORT_ERROR


class DaliLoader:
    """Iterates ``Batch``es of a plan through a DALI pipeline.

    plan: callable returning, per pass, a list of (indices [b] int64, draws [b, K] float64 or None);
    ``draws`` None selects the eval transform (resize, centre crop). batch_size: the largest b.
    cache: stage 1 from this ``ImageCache`` instead of the files. fill_kind: ``"resized"`` or
    ``"crop"`` to yield stage 1 itself, uint8 (the decode pass of :func:`fill`).
    The pipeline is built once and reused for every pass; a pass abandoned half-way (or broken by
    an unreadable image) rebuilds it, since DALI has already prepared the next batches.
    """

    def __init__(self, images, plan, train: bool, batch_size: int, normalization: Normalization, resize: str,
                 resize_size: int, crop_size: int, num_threads: int, device: str, dtype: torch.dtype, seed: int,
                 cache: ImageCache | None = None, fill_kind: str | None = None):
        require_dali()
        self.cache, self.fill_kind = cache, fill_kind
        self.paths = images.paths
        self.plan_fn = plan
        self.train = train
        self.batch_size = batch_size
        self.normalization = normalization
        self.resize, self.resize_size, self.crop = resize, resize_size, crop_size
        self.num_threads = max(1, num_threads)
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.labels = torch.tensor(np.asarray(images.labels), dtype=torch.int64, device=self.device)
        self.dtype = dtype
        self.seed = seed
        # (height, width) of every file, filled from the headers as images are first read ("shorter" only)
        self.shapes = np.full((len(self.paths), 2), -1, np.int64)
        self.pipe = None
        self.exhausted = False   # the pipeline reported the end of a pass and can be reset
        self.plan: list = []

    # -- the batch callback -------------------------------------------------------------------
    def _geometry(self, indices: np.ndarray, data: list) -> tuple[np.ndarray, np.ndarray]:
        if self.resize == "shorter":
            for k in np.flatnonzero(self.shapes[indices, 0] < 0):   # first sight of a file only
                self.shapes[indices[k]] = image_size(self.paths[indices[k]], data[k])
        shapes = self.shapes[indices]
        return resized_shape(shapes[:, 0], shapes[:, 1], self.resize, self.resize_size)

    def _source(self, info):
        if info.iteration >= len(self.plan):
            raise StopIteration
        indices, draws = self.plan[info.iteration]
        if self.cache is None:
            data = [read_bytes(self.paths[i]) for i in indices]
            height, width = self._geometry(indices, data)
        else:   # stage 1 from the cache: the images the first resize (or the centre crop) made
            data = [self.cache.image(int(i)) for i in indices]
            data = data if self.cache.device.type == "cuda" else [d.numpy() for d in data]
            height, width = self.cache.layout.shapes[indices].T
        size = np.stack([height, width], 1).astype(np.float32)
        if self.train:
            top, left, h, w, flip = crop_windows(draws, height, width)
            start = np.stack([top, left], 1).astype(np.float32)
            end = np.stack([top + h, left + w], 1).astype(np.float32)
            return data, size, start, end, flip.astype(np.int32)
        top, left = centre_crop_origin(height, width, self.crop)
        # crop_mirror_normalize places the window at round(pos * (extent - crop)): exact for these pos
        pos_y = np.where(height > self.crop, top / np.maximum(height - self.crop, 1), 0.5).astype(np.float32)
        pos_x = np.where(width > self.crop, left / np.maximum(width - self.crop, 1), 0.5).astype(np.float32)
        return data, size, pos_x, pos_y, np.zeros(len(indices), np.int32)

    # -- the graph ----------------------------------------------------------------------------
    def _build(self):
        mean, std = self.normalization.pixel_mean_std()
        decoder = "mixed" if self.gpu else "cpu"
        crop = self.crop

        # exec_dynamic: every batch gets its own output buffer, kept alive by the torch tensors
        # that view it (zero-copy DLPack), so a Batch stays valid however long it is kept
        cached = self.cache is not None
        on_gpu = cached and self.cache.device.type == "cuda"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, seed=self.seed,
                      device_id=(self.device.index or 0) if self.gpu else None, prefetch_queue_depth=PREFETCH,
                      exec_dynamic=True)
        def graph():
            encoded, size, first, second, mirror = fn.external_source(
                source=self._source, num_outputs=5, batch=True, batch_info=True, device="gpu" if on_gpu else "cpu",
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32],
                **({"layout": ["HWC", "", "", "", ""]} if cached else {}))
            if cached:     # stage 1 done already: the cached uint8 images
                images = encoded.gpu() if self.gpu and not on_gpu else encoded
            else:
                images = fn.decoders.image(encoded, device=decoder,
                                           output_type=types.BGR if self.normalization.bgr else types.RGB,
                                           adjust_orientation=False, jpeg_fancy_upsampling=True)
                images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            if self.fill_kind == "resized":
                return images
            if self.fill_kind == "crop":
                return fn.crop(images, crop=(crop, crop), crop_pos_x=first, crop_pos_y=second)
            if self.train:   # first/second: window start/end (y, x) in the resized image
                images = fn.resize(images, size=(crop, crop), roi_start=first, roi_end=second,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                window = {}
            else:            # first/second: relative x/y position of the centre crop
                window = dict(crop=(crop, crop), crop_pos_x=first, crop_pos_y=second)
            return fn.crop_mirror_normalize(images, mirror=mirror, mean=mean.tolist(), std=std.tolist(),
                                            dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
                                            output_layout="HWC", **window)

        pipe = graph()
        with warnings.catch_warnings():  # from a cache, or filling one, some geometry outputs go unused
            warnings.filterwarnings("ignore", message="The external source node")
            pipe.build()
        return pipe

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self):
        self.plan = self.plan_fn()
        if self.pipe is not None and self.exhausted:
            self.pipe.reset()
        else:
            self.pipe = self._build()
        self.exhausted = False
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        for step, (indices, _) in enumerate(self.plan):
            try:   # on a GPU the outputs are ready on torch's current stream
                (images,) = self.pipe.run(stream) if self.gpu else self.pipe.run()
            except OSError:      # raised by the callback: a file that cannot be read, already named
                self.pipe = None
                raise
            except RuntimeError as err:
                self.pipe = None
                raise self._explain(err, step) from err
            if self.fill_kind is not None:   # stage 1 itself: one uint8 HWC array per image
                host = images.as_cpu() if self.gpu else images
                yield indices, [np.array(host[k]) for k in range(len(indices))]
                continue
            # NHWC in DALI's buffer = NCHW channels-last for torch, without a copy
            nhwc = torch.from_dlpack(images.as_tensor())
            index = torch.from_numpy(np.asarray(indices, np.int64))
            if self.gpu:  # from pinned memory, so that the copy is asynchronous
                index = index.pin_memory().to(self.device, non_blocking=True)
            yield Batch(images=nhwc.to(self.dtype).permute(0, 3, 1, 2), labels=self.labels[index], indices=index)
        try:
            self.pipe.run()
        except StopIteration:
            self.exhausted = True

    def _explain(self, err: RuntimeError, step: int) -> Exception:
        """Name the file behind a DALI failure: check the batches in flight with PIL."""
        suspects = [int(i) for indices, _ in self.plan[step:step + PREFETCH + 1] for i in indices]
        for index in suspects:
            path = self.paths[index]
            try:
                with Image.open(path) as im:
                    im.convert("RGB")
            except Exception as pil_err:
                return unreadable(path, pil_err)
        first = ", ".join(self.paths[i] for i in suspects[:3])
        return RuntimeError(f"DALI failed on one of the images of batch {step} ({first}, ...): {err}")


def fill(cache: ImageCache, images, normalization: Normalization, resize: str, resize_size: int, crop_size: int,
         num_threads: int, device: str, progress=None) -> list[tuple[str, str]]:
    """The decode pass of the DALI loader: stage 1 of every image into ``cache`` (``"resized"``: the
    first resize's output; ``"crop"``: its centre crop), uint8 in the model's channel order.

    Returns:
        [(path, error)] of every file that cannot be read or decoded: when a batch fails, the files
        not yet decoded are checked with PIL (a pipeline that failed cannot go on).
    """
    from fastiaa.data import check_images

    steps = [np.arange(s, min(s + 64, len(images)), dtype=np.int64) for s in range(0, len(images), 64)]
    loader = DaliLoader(images, lambda: [(i, None) for i in steps], False, 64, normalization, resize, resize_size,
                        crop_size, num_threads, device, torch.float32, 0, fill_kind=cache.kind)
    done = 0
    try:
        for indices, arrays in loader:
            for i, pixels in zip(indices, arrays):
                cache.write(int(i), pixels)
            done += len(indices)
            if progress is not None:
                progress(len(indices))
    except (OSError, RuntimeError) as err:
        bad = check_images(images.paths[done:], decode=True, desc="finding the unreadable images")
        return bad or [(images.paths[done], str(err))]
    return []
