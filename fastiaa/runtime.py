"""Where and how a run computes: the device, the autocast dtype, the evaluation loaders and the
model of a checkpoint, shared by the trainer, ``fastiaa eval`` and the deployment commands."""
from __future__ import annotations

import dataclasses

import torch

from fastiaa import distributed
from fastiaa.config import TrainConfig
from fastiaa.data import Dataset, ImageSet
from fastiaa.distributed import World
from fastiaa.models import EmbeddingNet, create_model
from fastiaa.pipelines import NORMALIZATIONS, build_eval_loader


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


def eval_loader(cfg: TrainConfig, images: ImageSet, resize: str, input_space: str, device: torch.device):
    """The evaluation pipeline of a run (docs/method.md §2: resize, centre crop) over ``images``, in order."""
    return build_eval_loader(cfg.data.loader, images, cfg.eval.eval_batch,
                             **loader_geometry(cfg, resize, input_space, device))


def eval_loaders(cfg: TrainConfig, dataset: Dataset, input_space: str, device: torch.device,
                 world: World, splits=("test", "query", "gallery")) -> dict:
    """Eval loaders (resize, centre crop) of this rank's share of each split in ``splits`` that the
    dataset has: ``{"test": ...}`` or ``{"query": ..., "gallery": ...}`` (plus ``"train"`` if asked)."""
    sets = {name: getattr(dataset, name) for name in splits}
    return {name: eval_loader(cfg, shard_images(images, world), dataset.resize, input_space, device)
            for name, images in sets.items() if images is not None}


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
