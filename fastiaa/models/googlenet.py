"""GoogLeNet (Inception v1) trunk from torchvision; 1024-d features, global average pooling (docs/method.md §2)."""

from __future__ import annotations

import os

from torch import Tensor
from torchvision.models import GoogLeNet

from .base import (Backbone, Renormalize, find_weight_file, init_for_frozen_batchnorm, load_trunk_weights,
                   read_checkpoint)

WEIGHT_FILES = ("googlenet-1378be20.pth",)
PUBLISHED = "https://download.pytorch.org/models/googlenet-1378be20.pth (torchvision GoogLeNet_Weights.IMAGENET1K_V1)"


class GoogLeNetTrunk(GoogLeNet):
    """torchvision GoogLeNet without auxiliary heads, classifier and pooling.

    forward(ImageNet-normalised RGB ``[B, 3, H, W]``) -> ``[B, 1024, ceil(H/32), ceil(W/32)]``.
    torchvision's ImageNet weights expect inputs normalised with mean = std = 0.5; ``renormalize``
    converts, as torchvision's own ``transform_input=True`` does for these weights. Parameter names
    are torchvision's, so ``googlenet-1378be20.pth`` loads after dropping ``aux1.*``, ``aux2.*``
    and ``fc.*``.
    """

    def __init__(self) -> None:
        super().__init__(aux_logits=False, transform_input=False, init_weights=False)
        del self.avgpool, self.dropout, self.fc
        self.renormalize = Renormalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool1(self.conv1(self.renormalize(x)))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        for block in (self.inception4a, self.inception4b, self.inception4c, self.inception4d, self.inception4e):
            x = block(x)
        return self.inception5b(self.inception5a(self.maxpool4(x)))


def googlenet(pretrained: bool = True, weight_path: str | os.PathLike | None = None) -> Backbone:
    """GoogLeNet backbone: ``"imagenet"`` input space, 1024 features, ``"avg"`` pooling.

    pretrained: load ``googlenet-1378be20.pth`` (see :func:`base.find_weight_file` for where it is
    looked for; FileNotFoundError / ValueError when absent or not a GoogLeNet checkpoint);
    False: random initialisation (:func:`base.init_for_frozen_batchnorm`).
    """
    trunk = GoogLeNetTrunk()
    if not pretrained:
        init_for_frozen_batchnorm(trunk)
    else:
        path = find_weight_file("googlenet", weight_path, WEIGHT_FILES, PUBLISHED)
        load_trunk_weights(trunk, read_checkpoint(path), str(path), ignore_prefixes=("aux1.", "aux2.", "fc."))
    return Backbone(trunk, num_features=1024, pooling="avg", input_space="imagenet")
