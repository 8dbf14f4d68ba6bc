"""Image loading for fastiaa: NVIDIA DALI pipelines and the torchvision reference (docs/method.md §2).

``build_train_loader`` / ``build_eval_loader`` with ``kind="dali"`` or ``kind="torchvision"``
give ``Batch``es of channels-last NCHW images normalised per backbone (``NORMALIZATIONS``).
"""
from .core import NORMALIZATIONS, Batch, Normalization
from .loaders import TrainLoader, build_eval_loader, build_train_loader

__all__ = ["NORMALIZATIONS", "Batch", "Normalization", "TrainLoader", "build_eval_loader", "build_train_loader"]
