"""PreActResNet18, the CIFAR-10 model of fast adversarial training.

Pre-activation residual network from He, Zhang, Ren, Sun 2016, "Identity
Mappings in Deep Residual Networks", in the 18-layer CIFAR form used by
Wong, Rice, Kolter 2020, "Fast is better than free: Revisiting adversarial
training" (and by Rice et al. 2020, "Overfitting in adversarially robust deep
learning"): 3x3 stem, no max-pool, four stages of two blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advcli.models.checks import require_positive


class _PreActBlock(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> [dropout] -> conv3x3, plus the shortcut.

    When the block changes stride or width, the shortcut is a 1x1 convolution
    applied to the pre-activated input (He et al. 2016, Fig. 4e); otherwise it
    is the identity on the raw input, so the residual path stays clean. Also
    the wide basic block of `advcli.models.wide_resnet` (Zagoruyko & Komodakis
    2016), which adds dropout between the two convolutions; 0 (no dropout) here.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = F.relu(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for small images.

    He et al. 2016, "Identity Mappings in Deep Residual Networks"; the CIFAR-10
    variant of Wong et al. 2020, "Fast is better than free". Stem: 3x3 conv to
    64 channels, stride 1, no max-pool. Stages: 64/128/256/512 channels with
    strides 1/2/2/2, two pre-activation blocks each. Head: BN -> ReLU ->
    global average pool -> linear. About 11.17M parameters for CIFAR-10.

    Arguments:
        in_channels (int): image channels C.
        image_size (int): image height and width H = W. Accepted so every
            model has the same signature; the adaptive pool makes any size work
            (>= 8 recommended: the three stride-2 stages divide it by 8).
        num_classes (int): number of outputs K.

    Shape:
        - Input: ``(N, C, H, W)``, already normalised.
        - Output: ``(N, K)`` logits.

    Examples::
        >>> net = PreActResNet18(in_channels=3, image_size=32, num_classes=10)
        >>> net(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        require_positive("PreActResNet18", in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_PreActBlock(in_planes, planes, stride), _PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)  # the last block ends in a conv: normalise before pooling
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.pool(F.relu(self.bn(x)))
        return self.linear(x.flatten(1))
