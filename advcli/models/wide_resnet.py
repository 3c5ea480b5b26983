"""WideResNet, the CIFAR model of adversarial training at scale.

Wide residual network of Zagoruyko & Komodakis 2016, "Wide Residual Networks", in the pre-activation
form used for adversarial training on CIFAR: WRN-34-10 is the model of Zhang et al. 2019 (TRADES) and
has the depth and widths of Madry et al. 2018's CIFAR-10 model (five residual units per group, widths
160/320/640); WRN-28-10 is that of e.g. Carmon et al. 2019 and Gowal et al. 2020. Depth = 6n + 4:
three groups of n wide basic blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advcli.errors import ModelError
from advcli.models.checks import require_positive
from advcli.models.preact_resnet import _PreActBlock


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 conv stem (16 channels), three groups of n = (depth - 4) / 6 wide basic
    blocks of widths 16k, 32k, 64k with strides 1, 2, 2, then BN -> ReLU -> global average pool ->
    linear.

    Each block is BN -> ReLU -> conv3x3 -> BN -> ReLU -> dropout -> conv3x3 plus the shortcut (a
    1x1 convolution of the pre-activated input where the width or stride changes). Convolutions are
    initialised He-normal over the fan-out and the linear bias to zero, as in the TRADES code.
    About 36.5M parameters for WRN-28-10 and 46.2M for WRN-34-10 on CIFAR-10.

    Arguments:
        in_channels (int): image channels C.
        image_size (int): image height and width H = W. Accepted so every model has the same
            signature; the adaptive pool makes any size work (28 and 32 end at 7x7 and 8x8).
        num_classes (int): number of outputs K.
        depth (int): number of layers, 6n + 4 (10, 16, 22, 28, 34, 40, ...) (Default: 28).
        widen_factor (int): k, multiplies the widths 16, 32, 64 (Default: 10).
        dropout (float): dropout probability between the two convolutions of a block, in [0, 1)
            (Default: 0, as Madry et al. and TRADES).

    Raises:
        ModelError: ``depth`` not of the form 6n + 4 (n >= 1), ``widen_factor`` < 1, or ``dropout``
            outside [0, 1): the options a user sets in the model config.

    Shape:
        - Input: ``(N, C, H, W)``, already normalised.
        - Output: ``(N, K)`` logits.

    Examples::
        >>> net = WideResNet(in_channels=3, image_size=32, num_classes=10, depth=10, widen_factor=1)
        >>> net(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, depth: int = 28,
                 widen_factor: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        require_positive("WideResNet", in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ModelError(
                f"WideResNet depth={depth!r} is not of the form 6n + 4 with n >= 1: each of its three groups "
                f"has n blocks of two convolutions, plus the stem, two shortcut convolutions and the linear "
                f"layer. Use e.g. model.depth=28 or model.depth=34 (also 10, 16, 22, 40)."
            )
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ModelError(
                f"WideResNet widen_factor={widen_factor!r} must be an integer >= 1 (it multiplies the "
                f"widths 16, 32, 64); e.g. model.widen_factor=10."
            )
        if not 0 <= dropout < 1:
            raise ModelError(f"WideResNet dropout={dropout!r} must lie in [0, 1); 0 turns dropout off.")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        groups = []
        in_planes = 16
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = [_PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, dropout)
                      for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = groups
        self.bn = nn.BatchNorm2d(widths[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(F.relu(self.bn(x)))
        return self.linear(x.flatten(1))
