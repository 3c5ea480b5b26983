"""The small convolutional network of Wong & Kolter 2018, used for MNIST by "Fast is better than free".

Two stride-2 4x4 convolutions (16 and 32 channels) and a 100-unit hidden layer: the MNIST model of
"Provable defenses against adversarial examples via the convex outer adversarial polytope" (Wong &
Kolter, ICML 2018), which Wong, Rice & Kolter (ICLR 2020) train with FGSM from a random start to
88.77% PGD-50-10 accuracy at eps=0.3. An FGSM-training epoch on MNIST takes about 5 s on 2 CPU cores
(the Madry CNN: about 35 s), so the fast recipe runs in about a minute. Here it also accepts other image sizes and channel counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """conv(16, 4x4, stride 2) -> ReLU -> conv(32, 4x4, stride 2) -> ReLU -> fc 100 -> ReLU -> fc K.

    Arguments:
        in_channels (int): image channels C. image_size (int): H = W, at least 4.
        num_classes (int): outputs K. width (int): multiplies the convolution channels (Default: 1).
        hidden (int): units of the hidden layer (Default: 100).

    Shape:
        - Input: ``(N, C, H, W)``, already normalised. Output: ``(N, K)`` logits.

    Examples::
        >>> SmallCNN(in_channels=1, image_size=28, num_classes=10)(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, width: int = 1,
                 hidden: int = 100) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or width < 1 or hidden < 1:
            raise ValueError(f"SmallCNN needs positive sizes; got in_channels={in_channels}, "
                             f"num_classes={num_classes}, width={width}, hidden={hidden}.")
        if image_size < 4:
            raise ValueError(f"SmallCNN needs image_size >= 4; got {image_size}.")
        c1, c2 = 16 * width, 32 * width
        side = image_size // 2 // 2  # each 4x4 stride-2 convolution with padding 1 halves the side
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1)
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))  # flatten(1) copies when channels_last: fc1 sees (C, H, W) order
        return self.fc2(x)
