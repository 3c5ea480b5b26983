"""Per-channel input normalisation, the first layer of every advcli model.

Attacks and data loaders work with pixels in [0, 1], so eps and alpha stay
plain scalars and clamping stays ``clamp(0, 1)``. The dataset's mean and std
live here, inside the model, as buffers: they follow ``.to(device/dtype)`` and
are saved in the checkpoint's ``state_dict``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel.

    Arguments:
        mean (Sequence[float]): per-channel mean of the data, in [0, 1] pixel units.
        std (Sequence[float]): per-channel standard deviation, same length as
            ``mean``, every entry > 0.

    Shape:
        - Input: ``(N, C, H, W)`` with ``C == len(mean)``, pixels in [0, 1].
        - Output: ``(N, C, H, W)``, same dtype, device and memory format.

    Both statistics are registered as buffers shaped ``(1, C, 1, 1)``.

    Examples::
        >>> norm = Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
        >>> norm(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"Normalize needs one mean and one std per channel; got "
                f"{mean_t.numel()} mean value(s) and {std_t.numel()} std value(s)."
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"Normalize needs every std > 0; got {std_t.tolist()}.")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
