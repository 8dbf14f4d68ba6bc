"""BN-Inception (Inception with batch normalisation, Ioffe & Szegedy 2015) trunk; 1024-d features,
global average + max pooling summed (docs/method.md §2).

Parameter names follow the Cadene pretrainedmodels port (``conv1_7x7_s2``, ``conv1_7x7_s2_bn``,
``inception_3a_1x1``, ``inception_3a_1x1_bn``, ...), so its ImageNet checkpoint
``bn_inception-52deb4733.pth`` loads directly. Input: BGR in [0, 255] minus (104, 117, 128).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, find_weight_file, init_for_frozen_batchnorm, load_trunk_weights, read_checkpoint

WEIGHT_FILES = ("bn_inception-52deb4733.pth", "bn_inception-239d2248.pth")
PUBLISHED = ("http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth "
             "(Cadene pretrainedmodels, 'bninception' ImageNet weights)")

# Inception blocks: name, 1x1, 3x3 reduce, 3x3, double-3x3 reduce, double-3x3, pool, pool projection,
# stride. A 0 means the branch (1x1) or the projection after the pool is absent; stride-2 blocks
# downsample in their 3x3 convolutions and in a 3x3 max pool.
BLOCKS = (
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)


class BNInception(nn.Module):
    """BN-Inception feature extractor generated from :data:`BLOCKS`.

    forward(``[B, 3, H, W]`` BGR minus mean) -> ``[B, 1024, H/32, W/32]`` (H, W multiples of 32).
    Every convolution (with bias) is followed by BatchNorm (eps 1e-5) and ReLU; pooling branches
    use 3x3 average pooling (stride 1, padding counted) or 3x3 max pooling, in ceil mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self._unit("conv1_7x7_s2", 3, 64, 7, 2)
        self._unit("conv2_3x3_reduce", 64, 64, 1)
        self._unit("conv2_3x3", 64, 192, 3)
        channels = 192
        self.plan: list[tuple[list[list[str]], str, int, str | None]] = []
        for name, n1, r3, n3, rd, nd, pool, proj, stride in BLOCKS:
            p = f"inception_{name}_"
            chains = [[self._unit(p + "1x1", channels, n1, 1)]] if n1 else []
            chains.append([self._unit(p + "3x3_reduce", channels, r3, 1), self._unit(p + "3x3", r3, n3, 3, stride)])
            chains.append([self._unit(p + "double_3x3_reduce", channels, rd, 1),
                           self._unit(p + "double_3x3_1", rd, nd, 3),
                           self._unit(p + "double_3x3_2", nd, nd, 3, stride)])
            proj_name = self._unit(p + "pool_proj", channels, proj, 1) if proj else None
            self.plan.append((chains, pool, stride, proj_name))
            channels = n1 + n3 + nd + (proj or channels)
        self.num_features = channels

    def _unit(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1) -> str:
        self.add_module(name, nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2))
        self.add_module(name + "_bn", nn.BatchNorm2d(cout))
        return name

    def _run(self, name: str, x: Tensor) -> Tensor:
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)), inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self._run("conv1_7x7_s2", x), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self._run("conv2_3x3", self._run("conv2_3x3_reduce", x)), 3, 2, ceil_mode=True)
        for chains, pool, stride, proj_name in self.plan:
            outputs = []
            for chain in chains:
                y = x
                for name in chain:
                    y = self._run(name, y)
                outputs.append(y)
            padding = 1 if stride == 1 else 0
            if pool == "avg":
                pooled = F.avg_pool2d(x, 3, stride, padding, ceil_mode=True, count_include_pad=True)
            else:
                pooled = F.max_pool2d(x, 3, stride, padding, ceil_mode=True)
            outputs.append(self._run(proj_name, pooled) if proj_name else pooled)
            x = torch.cat(outputs, dim=1)
        return x


def _squeeze_bn_shapes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Some published copies of the checkpoint store BatchNorm tensors as ``[1, C]``; make them ``[C]``."""
    return {k: v.flatten() if "_bn." in k and v.dim() == 2 and v.shape[0] == 1 else v for k, v in state.items()}


def bninception(pretrained: bool = True, weight_path: str | os.PathLike | None = None) -> Backbone:
    """BN-Inception backbone: ``"bninception"`` input space, 1024 features, ``"avg+max"`` pooling.

    pretrained: load ``bn_inception-52deb4733.pth`` (or ``bn_inception-239d2248.pth``; see
    :func:`base.find_weight_file`; FileNotFoundError / ValueError when absent or not a
    BN-Inception checkpoint); False: random initialisation (:func:`base.init_for_frozen_batchnorm`).
    """
    trunk = BNInception()
    if not pretrained:
        init_for_frozen_batchnorm(trunk)
    else:
        path = find_weight_file("bninception", weight_path, WEIGHT_FILES, PUBLISHED)
        state = _squeeze_bn_shapes(read_checkpoint(path))
        load_trunk_weights(trunk, state, str(path), ignore_prefixes=("last_linear.",))
    return Backbone(trunk, num_features=trunk.num_features, pooling="avg+max", input_space="bninception")
