"""The MNIST convolutional network of Madry et al. 2018.

Two 5x5 convolutions with 2x2 max-pooling, then a 1024-unit hidden layer:
the architecture of the MNIST challenge model in "Towards Deep Learning Models
Resistant to Adversarial Attacks" (Madry, Makelov, Schmidt, Tsipras, Vladu,
ICLR 2018). Here it also accepts other image sizes and channel counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MadryCNN(nn.Module):
    """conv(32, 5x5) -> ReLU -> maxpool 2 -> conv(64, 5x5) -> ReLU -> maxpool 2
    -> fc 1024 -> ReLU -> fc K.

    Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
    Attacks", MNIST model. The convolutions use padding 2, so only the two
    pools shrink the image: H -> H // 2 -> H // 4 (28 -> 7, 32 -> 8, 12 -> 3),
    and the first fully connected layer takes ``64 * width * (H // 4) ** 2``
    inputs.

    Arguments:
        in_channels (int): image channels C (1 for MNIST, 3 for CIFAR).
        image_size (int): image height and width H = W, at least 4.
        num_classes (int): number of outputs K.
        width (int): multiplies the convolution channels, giving
            ``32 * width`` and ``64 * width`` (Default: 1, the paper's model).

    Shape:
        - Input: ``(N, C, H, W)``, already normalised.
        - Output: ``(N, K)`` logits.

    Examples::
        >>> net = MadryCNN(in_channels=1, image_size=28, num_classes=10)
        >>> net(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, width: int = 1) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(
                f"MadryCNN needs positive sizes; got in_channels={in_channels}, "
                f"num_classes={num_classes}, width={width}."
            )
        if image_size < 4:
            # two 2x2 pools must leave at least one pixel
            raise ValueError(f"MadryCNN needs image_size >= 4; got {image_size}.")
        c1, c2 = 32 * width, 64 * width
        side = image_size // 2 // 2  # pixels per side after the two pools
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(c2 * side * side, 1024)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pool before ReLU: the same function (max commutes with a monotone map), on a quarter of the pixels
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        # flatten(1) copies when x is channels_last, so fc1 always sees (C, H, W) order
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
