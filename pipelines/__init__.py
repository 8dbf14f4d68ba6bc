"""Image loading for fastiaa: NVIDIA DALI pipelines and the torchvision reference (docs/method.md §2).

``build_train_loader`` / ``build_eval_loader`` with ``kind="dali"`` or ``kind="torchvision"``
give ``Batch``es of channels-last NCHW images normalised per backbone (``NORMALIZATIONS``);
``build_cache`` decodes a split once into an ``ImageCache`` that both then read (decode once).
"""
from .cache import ImageCache
from .core import NORMALIZATIONS, Batch, Normalization
from .loaders import TrainLoader, build_cache, build_eval_loader, build_train_loader

__all__ = ["NORMALIZATIONS", "Batch", "ImageCache", "Normalization", "TrainLoader", "build_cache",
           "build_eval_loader", "build_train_loader"]
