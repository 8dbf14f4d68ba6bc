"""Shared parts of every backbone: the embedding network, pooling, frozen BatchNorm, weight files.

docs/method.md §2. A backbone family (one file each) builds a *trunk*, a module mapping images
``[B, 3, H, W]`` to a feature map ``[B, C, h, w]``, and describes it with a :class:`Backbone`;
:class:`EmbeddingNet` adds global pooling and the randomly initialised linear embedding layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

POOLINGS = ("avg", "avg+max")
INPUT_SPACES = ("imagenet", "bninception")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A feature extractor and how to use it.

    trunk: module, ``[B, 3, H, W] -> [B, num_features, h, w]`` feature map.
    num_features: channels of the feature map (1024 GoogLeNet / BN-Inception, 2048 ResNet-50,
        1280 EfficientNet-Lite0).
    pooling: ``"avg"`` (global average pool) or ``"avg+max"`` (global average + global max pool,
        summed), docs/method.md §2.
    input_space: ``"imagenet"`` (RGB in [0, 1], ImageNet mean/std) or ``"bninception"``
        (BGR in [0, 255] minus (104, 117, 128)); the normalisation the data pipeline must apply.
    """

    trunk: nn.Module
    num_features: int
    pooling: str
    input_space: str

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.input_space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {INPUT_SPACES}, got {self.input_space!r}")


def global_pool(features: Tensor, pooling: str) -> Tensor:
    """Pool a feature map ``[B, C, h, w]`` to ``[B, C]`` (same dtype).

    ``"avg"``: mean over h, w. ``"avg+max"``: mean plus maximum over h, w (docs/method.md §2: BN-Inception
    and ResNet-50 sum global average and global max pooling).
    """
    pooled = features.mean(dim=(2, 3))
    if pooling == "avg+max":
        pooled = pooled + features.amax(dim=(2, 3))
    return pooled


class Renormalize(nn.Module):
    """Per-channel affine map from ImageNet-normalised RGB to another normalisation.

    Input: ``x = (rgb - IMAGENET_MEAN) / IMAGENET_STD`` with rgb in [0, 1], ``[B, 3, H, W]``.
    Output: ``(rgb - mean) / std`` for the ``mean`` / ``std`` (on [0, 1]) a checkpoint was trained
    with, same shape, dtype and memory format. Lets backbones trained on other normalisations
    (torchvision's GoogLeNet, TensorFlow's EfficientNet-Lite) share the ``"imagenet"`` input space.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        out_mean, out_std = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("scale", (in_std / out_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - out_mean) / out_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class EmbeddingNet(nn.Module):
    """Backbone trunk + global pooling + linear embedding layer (docs/method.md §2).

    forward(images ``[B, 3, H, W]`` float, any memory format, optionally under ``torch.autocast``)
    -> ``[B, embedding_size]`` float32 un-normalised embeddings.

    The embedding layer is ``Linear(num_features, embedding_size)`` with Kaiming-normal weights
    (fan_out mode, ReLU gain: std = sqrt(2 / embedding_size)) and zero bias. Every BatchNorm layer
    stays in eval mode whatever ``train(mode)`` is called with (frozen running statistics, as in
    the authors' code); the BatchNorm affine weights and biases stay trainable.

    Attributes: ``backbone`` (the trunk), ``head`` (the embedding layer), ``pooling``,
    ``input_space`` ("imagenet" | "bninception"), ``num_features``, ``embedding_size``.
    """

    def __init__(self, backbone: Backbone, embedding_size: int = 512) -> None:
        super().__init__()
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        self.backbone = backbone.trunk
        self.pooling = backbone.pooling
        self.input_space = backbone.input_space
        self.num_features = backbone.num_features
        self.embedding_size = embedding_size
        self.head = nn.Linear(backbone.num_features, embedding_size)
        nn.init.kaiming_normal_(self.head.weight, mode="fan_out")
        nn.init.zeros_(self.head.bias)
        self.train()

    def forward(self, images: Tensor) -> Tensor:
        pooled = global_pool(self.backbone(images), self.pooling)
        return self.head(pooled).float()

    def train(self, mode: bool = True) -> EmbeddingNet:
        """Set train/eval mode, then put every BatchNorm back in eval mode (frozen statistics)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the pretrained trunk (BatchNorm affine included)."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the embedding layer (the paper trains them with a x10 learning rate)."""
        return list(self.head.parameters())


def init_for_frozen_batchnorm(trunk: nn.Module) -> None:
    """Random initialisation for training a trunk from scratch under frozen BatchNorm.

    Frozen BatchNorm keeps its initial statistics (mean 0, variance 1) and so never rescales the
    signal; the convolutions must keep the scale themselves: Kaiming-normal weights (fan_out,
    ReLU gain), zero biases. (torchvision's GoogLeNet init, std 0.01, shrinks the 1024-d features
    to ~1e-12 under frozen BatchNorm; PyTorch's default init to ~1e-2 for BN-Inception.)
    """
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def find_weight_file(model: str, weight_path: str | os.PathLike | None, file_names: tuple[str, ...],
                     published: str) -> Path:
    """Locate a local ImageNet checkpoint for ``model``; never downloads.

    weight_path: a checkpoint file (used as is), or a directory searched for ``file_names`` (in
        order). None: torch's hub cache ``<torch.hub.get_dir()>/checkpoints`` is searched, where
        torchvision and pretrainedmodels keep the files they downloaded.
    Raises FileNotFoundError naming the expected file names, the folders searched, where the
    checkpoint is published, and the ``--pretrained 0`` alternative.
    """
    if weight_path is not None and Path(weight_path).is_file():
        return Path(weight_path)
    folder = Path(weight_path) if weight_path is not None else Path(torch.hub.get_dir()) / "checkpoints"
    for name in file_names:
        if (folder / name).is_file():
            return folder / name
    where = f"weight path {str(weight_path)!r}" if weight_path is not None else f"torch hub cache {str(folder)!r}"
    raise FileNotFoundError(
        f"pretrained {model} needs its ImageNet checkpoint {' or '.join(file_names)}, not found in the {where}. "
        f"Download it from {published} and pass its file or folder as --weight_path, "
        f"or train from scratch with --pretrained 0."
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state dict (mapping of parameter names to tensors) from ``path`` onto the CPU.

    Raises ValueError naming the file when it is not a readable PyTorch state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and tensor errors all mean "not a usable checkpoint"
        raise ValueError(f"cannot read {str(path)!r} as a PyTorch checkpoint: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a state dict (a mapping of parameter names to tensors)")
    return state


def load_trunk_weights(trunk: nn.Module, state: dict[str, Tensor], source: str,
                       ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Copy a checkpoint into ``trunk`` after checking names and shapes.

    Keys starting with one of ``ignore_prefixes`` (the ImageNet classifier, auxiliary heads) are
    dropped. A missing BatchNorm ``num_batches_tracked`` counter is allowed (checkpoints saved
    before PyTorch 0.4.1 have none; frozen BatchNorm never reads it).
    Raises ValueError naming ``source`` and listing a few missing, unexpected and mis-shaped keys.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        def listing(title: str, keys: list[str]) -> str:
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            return f"{len(keys)} {title}" + (f" ({shown})" if keys else "")

        raise ValueError(
            f"checkpoint {source} does not fit the {type(trunk).__name__} architecture: "
            f"{listing('missing keys', missing)}; {listing('unexpected keys', unexpected)}; "
            f"{listing('shape mismatches (checkpoint vs model)', mis_shaped)}. "
            "Is it the right file for this backbone?"
        )
    trunk.load_state_dict(state, strict=False)
