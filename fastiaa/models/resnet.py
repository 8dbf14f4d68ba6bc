"""ResNet-50 trunk from torchvision; 2048-d features, global average + max pooling summed (docs/method.md §2)."""

from __future__ import annotations

import os

from torch import Tensor
from torchvision.models.resnet import Bottleneck, ResNet

from .base import Backbone, find_weight_file, load_trunk_weights, read_checkpoint

WEIGHT_FILES = ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth")
PUBLISHED = ("https://download.pytorch.org/models/resnet50-0676ba61.pth (torchvision "
             "ResNet50_Weights.IMAGENET1K_V1; IMAGENET1K_V2 resnet50-11ad3fa6.pth also works)")


class ResNet50Trunk(ResNet):
    """torchvision ResNet-50 without classifier and pooling.

    forward(ImageNet-normalised RGB ``[B, 3, H, W]``) -> ``[B, 2048, ceil(H/32), ceil(W/32)]``.
    Parameter names are torchvision's; its checkpoints load after dropping ``fc.*``.
    """

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        del self.avgpool, self.fc

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet50(pretrained: bool = True, weight_path: str | os.PathLike | None = None) -> Backbone:
    """ResNet-50 backbone: ``"imagenet"`` input space, 2048 features, ``"avg+max"`` pooling.

    pretrained: load ``resnet50-0676ba61.pth`` or ``resnet50-11ad3fa6.pth`` (see
    :func:`base.find_weight_file`; FileNotFoundError / ValueError when absent or not a ResNet-50
    checkpoint); False: torchvision's random initialisation.
    """
    trunk = ResNet50Trunk()
    if pretrained:
        path = find_weight_file("resnet50", weight_path, WEIGHT_FILES, PUBLISHED)
        load_trunk_weights(trunk, read_checkpoint(path), str(path), ignore_prefixes=("fc.",))
    return Backbone(trunk, num_features=2048, pooling="avg+max", input_space="imagenet")
