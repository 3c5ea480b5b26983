"""What every dataset is made of: its description (`DatasetInfo`) and one split as tensors (`ImageSet`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: classes, input shape, normalisation.

    ``mean`` and ``std`` are per channel in [0, 1] pixel units, for the model's ``Normalize`` layer.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int  # square images, pixels per side
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None  # class names, where the data has them (dataset=folder)


@dataclass
class ImageSet:
    """One split of a dataset, whole: ``images`` uint8 (N, C, H, W) contiguous, ``labels`` int64 (N,).

    Both tensors live on the same device; `to` moves them together, `subset` selects examples.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(
                f"ImageSet.images must be a uint8 tensor (N, C, H, W); got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise TypeError(
                f"ImageSet.labels must be an int64 tensor (N,); got {self.labels.dtype} "
                f"with shape {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"ImageSet has {len(self.images)} images but {len(self.labels)} labels")
        if self.images.device != self.labels.device:
            raise ValueError(f"ImageSet images are on {self.images.device} but labels on {self.labels.device}")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageSet:
        """The same examples on ``device`` (no copy when they are already there)."""
        return ImageSet(self.images.to(device), self.labels.to(device))

    def subset(self, index: slice | torch.Tensor) -> ImageSet:
        """The examples picked by ``index``: a slice, a LongTensor of positions or a bool mask (N,)."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.images.device)
        return ImageSet(self.images[index], self.labels[index])
