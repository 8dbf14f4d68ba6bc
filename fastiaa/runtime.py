"""Where and how a run computes: the device, the autocast dtype and the evaluation loaders, shared
by the trainer and ``fastiaa eval``."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from fastiaa import distributed
from fastiaa.config import TrainConfig
from fastiaa.data import Dataset, DatasetError, ImageSet, check_images, unreadable_images_error
from fastiaa.distributed import World
from fastiaa.models import EmbeddingNet, create_model
from fastiaa.pipelines import NORMALIZATIONS, ImageCache, build_cache, build_eval_loader
from fastiaa.pipelines import cache as caching


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda:N`` also becomes the current CUDA device,
    so that every kernel, loader and evaluation of the run lands on it.

    Raises:
        ValueError: not a device name, or a CUDA device on a machine without it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: fastiaa runs on cpu or cuda devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``: ``auto`` is bf16 (fp16 on CUDA cards without bf16)."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or device.type == "cpu":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def loader_geometry(cfg: TrainConfig, resize: str, input_space: str, device: torch.device) -> dict:
    """The keyword arguments every loader of the run shares (normalisation, resize mode ``resize``
    of the dataset, crop, threads, device)."""
    return dict(normalization=NORMALIZATIONS[input_space], resize=resize, resize_size=cfg.data.resize_size,
                crop_size=cfg.data.image_size, num_threads=cfg.data.workers, device=str(device))


def shard_images(images: ImageSet, world: World) -> ImageSet:
    """This rank's contiguous share of ``images`` (the whole set in one process)."""
    part = distributed.shard(len(images), world)
    return dataclasses.replace(images, paths=images.paths[part], labels=images.labels[part])


def eval_loader(cfg: TrainConfig, images: ImageSet, resize: str, input_space: str, device: torch.device,
                cache: ImageCache | None = None):
    """The evaluation pipeline of a run (docs/method.md §2: resize, centre crop) over ``images``, in
    order, from ``cache`` where given."""
    return build_eval_loader(cfg.data.loader, images, cfg.eval.eval_batch, cache=cache,
                             **loader_geometry(cfg, resize, input_space, device))


def eval_loaders(cfg: TrainConfig, dataset: Dataset, input_space: str, device: torch.device,
                 world: World, splits=("test", "query", "gallery"), caches: dict | None = None) -> dict:
    """Eval loaders (resize, centre crop) of this rank's share of each split in ``splits`` that the
    dataset has: ``{"test": ...}`` or ``{"query": ..., "gallery": ...}`` (plus ``"train"`` if asked),
    reading the :func:`build_caches` of those splits where there is one."""
    caches = caches or {}
    loaders = {}
    for name in splits:
        images = getattr(dataset, name)
        if images is None:
            continue
        cache = caches.get(name)
        if cache is not None and name == "train":  # the whole split is cached; a refresh reads this rank's shard
            cache = cache.part(distributed.shard(len(images), world))
        loaders[name] = eval_loader(cfg, shard_images(images, world), dataset.resize, input_space, device, cache)
    return loaders


def checkpoint_model(state: dict, cfg: TrainConfig, device: torch.device) -> EmbeddingNet:
    """The model of a checkpoint ``state`` (``fastiaa.checkpoint.load``, its configuration ``cfg``)
    on ``device``, in eval mode and the run's memory format.

    Raises:
        ValueError: unknown backbone, or weights that do not fit it.
    """
    model = create_model(cfg.model.backbone, cfg.model.embedding_size, pretrained=False)
    model.load_state_dict(state["model"])
    fmt = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt).eval()


def _check_headers(sets: dict[str, ImageSet], dataset: Dataset, world: World) -> bool:
    """Read the header of every image of ``sets`` (threads, a progress bar on the main rank).

    Raises:
        DatasetError: listing the unreadable files and the command that lists all of them.
    """
    paths = sorted({p for images in sets.values() for p in images.paths})
    bad = check_images(paths, decode=False, threads=8, desc="checking image headers", show=world.is_main)
    if bad:
        raise unreadable_images_error(bad, dataset.name, dataset.root)
    return True


def build_caches(cfg: TrainConfig, dataset: Dataset, input_space: str, device: torch.device, world: World,
                 splits=("train", "test", "query", "gallery"), where: str | None = None) -> dict[str, ImageCache]:
    """Decode once (docs/architecture.md, "Cache"): the train split as resized images (train epochs
    crop from them, refreshes take their centre crops), each evaluated split (this rank's shard) as
    its final centre crops, where ``--cache`` says (``where`` overrides it); ``{}`` when off.

    Says where the cache went in one line (main rank). Under DDP without ``--cache-dir`` the train
    split goes to a node-local file that one process per node builds and all map (one copy per node).
    Every image is opened before anything trains: decoded into the cache, or, where nothing is
    cached (and for the headers the shorter-side resize needs), its header read.

    Raises:
        ValueError: ``--cache device`` without a CUDA device; DatasetError: unreadable images (all listed).
    """
    data = cfg.data
    norm = NORMALIZATIONS[input_space]
    sets = {name: getattr(dataset, name) if name == "train" else shard_images(getattr(dataset, name), world)
            for name in splits if getattr(dataset, name) is not None}
    checked = dataset.resize == "shorter" and _check_headers(sets, dataset, world)
    wanted = {name: (images, "resized" if name == "train" else "crop") for name, images in sets.items()}
    layouts = {name: caching.layout(images.paths, kind, dataset.resize, data.resize_size, data.image_size)
               for name, (images, kind) in wanted.items()}
    place, note = caching.choose(where or data.cache, sum(lay.nbytes for lay in layouts.values()), device,
                                 data.cache_gib)
    if world.is_main:
        tqdm.write(note)
    if place == "off":
        if not checked:
            _check_headers(sets, dataset, world)
        return {}
    caches, bad = {}, []
    for name, (images, kind) in wanted.items():
        lay = layouts[name]
        folder = data.cache_dir
        shared = name == "train" and world.distributed and folder is None and place == "ram"
        if shared:  # one file per node instead of one copy per rank
            folder = str(Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()) / "fastiaa-cache")
        first = not shared or world.local_rank == 0

        def make():
            bar = tqdm(total=len(images), desc=f"decode once: {name}", leave=False, disable=not world.is_main,
                       dynamic_ncols=True)
            try:
                return build_cache(data.loader, images, kind, norm, dataset.resize, data.resize_size, data.image_size,
                                   data.workers, str(device), place, folder, bar.update, tqdm.write, lay,
                                   dataset.name, dataset.root)
            finally:
                bar.close()

        if not first:
            distributed.barrier(world)   # after the node's first process has written the file
        try:
            caches[name] = make()
        except DatasetError as error:    # every split's unreadable images, listed together
            if not hasattr(error, "bad"):
                raise
            bad += error.bad
            continue
        if shared:
            if first:
                distributed.barrier(world)
            distributed.barrier(world)   # every rank has mapped it: the node's file can go, the pages stay
            if first:
                for path in caches[name].files:
                    path.unlink(missing_ok=True)
    if bad:
        raise unreadable_images_error(bad, dataset.name, dataset.root)
    return caches
