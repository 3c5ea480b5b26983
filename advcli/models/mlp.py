"""A fully connected classifier: the smallest model, for quick runs and tests.

It has no convolution and no batch norm, so ``is_convolutional`` and
``uses_batchnorm`` are both False for it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    A plain baseline, not taken from a particular paper; Madry et al. 2018
    ("Towards Deep Learning Models Resistant to Adversarial Attacks") show
    that such low-capacity models gain little from adversarial training,
    which makes it a useful contrast to ``MadryCNN``.

    Arguments:
        in_channels (int): image channels C.
        image_size (int): image height and width H = W.
        num_classes (int): number of outputs K.
        hidden (Sequence[int]): widths of the hidden layers (Default: (256, 256)).
            An empty sequence gives a linear classifier.

    Shape:
        - Input: ``(N, C, H, W)``, already normalised (``build_model`` puts
          ``Normalize`` in front).
        - Output: ``(N, K)`` logits.

    Examples::
        >>> net = MLP(in_channels=1, image_size=28, num_classes=10)
        >>> net(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
    ) -> None:
        super().__init__()
        widths = [int(h) for h in hidden]  # also accepts an OmegaConf ListConfig
        if in_channels < 1 or image_size < 1 or num_classes < 1 or any(w < 1 for w in widths):
            raise ValueError(
                f"MLP needs positive sizes; got in_channels={in_channels}, "
                f"image_size={image_size}, num_classes={num_classes}, hidden={widths}."
            )
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_channels * image_size * image_size
        for width in widths:
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
