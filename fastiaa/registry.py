"""The registries of fastiaa's interchangeable parts: losses and backbones (datasets: the readers'
``fastiaa.data.DATASETS``), and the names of the deployment formats.

Each entry names ``"module:attribute"`` and is imported on first use, so that this module (and
the command line, which takes its choices from here) starts without importing torch and timm
(seconds of start-up).
"""
from __future__ import annotations

import importlib

LOSSES = {
    "ms": "fastiaa.losses:MultiSimilarityLoss",
    "contrastive": "fastiaa.losses:ContrastiveLoss",
    "triplet": "fastiaa.losses:TripletLoss",
}
LOSS_SPELLINGS = {"ms": "ms", "multisimilarity": "ms", "contrastive": "contrastive", "triplet": "triplet"}
"""Accepted spellings, case-insensitive (the authors write MS, Contrastive, Triplet)."""

BACKBONES = {
    "googlenet": "fastiaa.models.googlenet:googlenet",
    "bninception": "fastiaa.models.bninception:bninception",
    "resnet50": "fastiaa.models.resnet:resnet50",
    "efficientnet_lite0": "fastiaa.models.efficientnet:efficientnet_lite0",
}


INDEX_KINDS = ("flat", "hnsw", "ivf")
"""faiss index kinds of ``fastiaa.index`` (exact inner product, HNSW graph, IVF cells)."""
EXPORT_FORMATS = ("onnx", "torchscript")
"""File formats of ``fastiaa.export``."""
EMBEDDING_DTYPES = ("float32", "float16")
"""dtypes of the ``.npy`` files of ``fastiaa.embeddings``."""


def loss_name(spelling: str) -> str:
    """The registry name of a loss spelling ("MS" -> "ms").

    Raises:
        ValueError: unknown loss (the message lists the choices).
    """
    name = LOSS_SPELLINGS.get(str(spelling).lower())
    if name is None:
        raise ValueError(f"unknown loss {spelling!r}; choose MS, Contrastive or Triplet")
    return name


def load(table: dict[str, str], name: str):
    """The object registered as ``name`` in ``table`` (``LOSSES`` or ``BACKBONES``).

    Raises:
        ValueError: ``name`` is not registered (the message lists the choices).
    """
    if name not in table:
        raise ValueError(f"unknown name {name!r}; choose one of {', '.join(table)}")
    module, attribute = table[name].split(":")
    return getattr(importlib.import_module(module), attribute)
