"""Datasets -> batches on the right device, pixels in [0, 1].

This module owns reading the image-classification datasets advcli trains on (through torchvision's
own dataset classes, or generated for ``synthetic``), holding each split as one uint8 tensor, and
cutting it into shuffled, augmented float batches. It knows nothing about attacks, models or Hydra:
callers pass plain values, and problems the user can fix come back as a one-paragraph `DataError`.

Design (after KellerJordan/cifar10-airbench): a small dataset is kept whole as a uint8 tensor
(N, C, H, W) on the training device -- all 60,000 MNIST training images are 47 MB -- and every batch is
indexed, cropped and flipped there with batched tensor ops. No DataLoader, no worker processes, no
per-image Python. Pixels are *not* normalised here: they stay in [0, 1] so that attack radii (eps) are
plain pixel units and clamping is to [0, 1]; the model's first layer normalises with
`DatasetInfo.mean` / `DatasetInfo.std`.

Example::

    info = dataset_info("mnist")                         # 10 classes, 1 channel, 28 px
    train = load_split("mnist", "train", root="data").to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for x, y in batches(train, 128, shuffle=True, generator=g, crop_padding=2):
        ...                                              # x: float32 (128, 1, 28, 28) in [0, 1]
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from advcli.data import folder
from advcli.data.sets import DatasetInfo, ImageSet
from advcli.errors import one_paragraph, DataError

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "synthetic", "folder")
SPLITS: tuple[str, ...] = ("train", "test")


# =============================================================================================
# Descriptions and containers
# =============================================================================================


# Per-channel statistics of the training splits, as commonly published.
_REAL_INFO = {
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
_PRETTY = {
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "svhn": "SVHN",
}


# =============================================================================================
# Names, options, info
# =============================================================================================

# The synthetic set's options and defaults (see `_make_synthetic` for what they mean).
_SYNTHETIC_DEFAULTS = {
    "num_train": 512,  # examples in the train split
    "num_test": 256,  # examples in the test split
    "num_classes": 4,
    "channels": 1,
    "image_size": 12,  # pixels per side
    "seed": 0,  # seeds the class prototypes and both splits
}
_SYNTHETIC_MINIMUM = {"num_train": 1, "num_test": 1, "num_classes": 2, "channels": 1, "image_size": 2, "seed": 0}


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(
            f"Unknown dataset {name!r}. Valid names are: {', '.join(DATASETS)} "
            f"(choose one with dataset=NAME on the command line)."
        )
    return name


def _options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The synthetic set's and the image folder's options with defaults filled in and checked; the others take none."""
    if name == "folder":
        return folder.options(options)
    if name != "synthetic":
        if options:
            raise DataError(
                f"Dataset {name!r} takes no options, but got {', '.join(sorted(options))}. "
                f"Options ({', '.join(_SYNTHETIC_DEFAULTS)}) apply only to the synthetic dataset; "
                f"remove them from the dataset config."
            )
        return {}
    unknown = sorted(set(options) - set(_SYNTHETIC_DEFAULTS))
    if unknown:
        raise DataError(
            f"Unknown option(s) {', '.join(unknown)} for the synthetic dataset. Valid options are "
            f"{', '.join(f'{k} (default {v})' for k, v in _SYNTHETIC_DEFAULTS.items())}."
        )
    merged = {**_SYNTHETIC_DEFAULTS, **options}
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < _SYNTHETIC_MINIMUM[key]:
            raise DataError(
                f"Synthetic dataset option {key}={value!r} is invalid: it must be a whole number "
                f">= {_SYNTHETIC_MINIMUM[key]} (default {_SYNTHETIC_DEFAULTS[key]})."
            )
    return merged


def dataset_info(name: str, **options: Any) -> DatasetInfo:
    """Classes, input shape and normalisation statistics of dataset ``name``.

    Args:
        name: one of `DATASETS`.
        **options: only for ``synthetic`` (the same options as `load_split`; num_classes, channels and
            image_size shape the info, the rest are accepted and ignored).

    For ``synthetic`` the mean and std are the nominal (0.5,) * channels and (0.25,) * channels: the
    prototypes are centred on 0.5 and the pixel spread (prototype spread plus noise) is 0.2-0.25
    (measured at the default options: mean 0.49, std 0.19; close enough for a Normalize layer).
    """
    _check_name(name)
    opts = _options(name, options)
    if name == "folder":
        return folder.info(**opts)
    if name == "synthetic":
        c = opts["channels"]
        return DatasetInfo("synthetic", opts["num_classes"], c, opts["image_size"], (0.5,) * c, (0.25,) * c)
    return _REAL_INFO[name]


def split_order(name: str, **options: Any) -> str:
    """The order of a dataset's splits, in words, for the results: which images "the first N" are."""
    if name == "folder":
        return folder.order_note(_options(name, options))
    return "the dataset's own order"


# =============================================================================================
# Loading
# =============================================================================================


def load_split(name: str, split: str, *, root: str | os.PathLike, download: bool = True, **options: Any) -> ImageSet:
    """One split of a dataset as an `ImageSet` on the CPU (move it with ``.to(device)``).

    Args:
        name: one of `DATASETS`.
        split: ``"train"`` or ``"test"`` (SVHN's ``extra`` split is not used).
        root: the data root, the folder torchvision's classes look in (``root/MNIST/raw``,
            ``root/cifar-10-batches-py``, ``root/test_32x32.mat``, ...). Not used by ``synthetic``.
        download: let torchvision download the files when they are missing. Files already under
            ``root`` are never downloaded again, so ``download=True`` works offline once they are there.
        **options: only for ``synthetic``: num_train=512, num_test=256, num_classes=4, channels=1,
            image_size=12, seed=0.

    Returns:
        ImageSet with images uint8 (N, C, H, W) and labels int64 (N,), in the dataset's own order.

    Raises:
        DataError: unknown name, split or option; files missing (and not downloadable); scipy missing
            for SVHN.
    """
    _check_name(name)
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r} for dataset {name!r}; use one of: {', '.join(SPLITS)}.")
    opts = _options(name, options)
    if name == "synthetic":
        return _make_synthetic(split, **opts)
    if name == "folder":
        return folder.load_split(split, **opts)
    if root is None or str(root) == "":
        raise DataError(
            f"No data root was given for {_PRETTY[name]}. Set data.root=PATH on the command line or the "
            f"environment variable ADVCLI_DATA=PATH to the folder that holds (or should receive) the data."
        )
    return _load_torchvision(name, split, os.path.abspath(os.path.expanduser(os.fspath(root))), download)


def _expected_location(name: str, split: str, root: str) -> str:
    """Where torchvision's class for ``name`` looks for its files under ``root``."""
    from torchvision import datasets as tvd

    if name == "mnist":
        return os.path.join(root, "MNIST", "raw")
    if name == "fashion_mnist":
        return os.path.join(root, "FashionMNIST", "raw")
    if name == "cifar10":
        return os.path.join(root, tvd.CIFAR10.base_folder)
    if name == "cifar100":
        return os.path.join(root, tvd.CIFAR100.base_folder)
    return os.path.join(root, tvd.SVHN.split_list[split][1])


def _load_torchvision(name: str, split: str, root: str, download: bool) -> ImageSet:
    from torchvision import datasets as tvd

    train = split == "train"
    if name == "svhn":
        try:
            import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with it)
        except ImportError as err:
            raise DataError(
                "Reading SVHN needs scipy (its files are MATLAB .mat files), and scipy is not installed "
                "in this Python environment. Install it with `pip install scipy` and run again."
            ) from err
    try:
        if name in ("mnist", "fashion_mnist"):
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            ds = cls(root, train=train, download=download)
            images = ds.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
            labels = ds.targets
        elif name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=train, download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # numpy (N, H, W, C) -> (N, C, H, W)
            labels = torch.as_tensor(ds.targets)
        else:
            ds = tvd.SVHN(root, split=split, download=download)
            images = torch.from_numpy(ds.data)  # already (N, C, H, W)
            labels = torch.from_numpy(ds.labels)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        pretty = _PRETTY[name]
        reason = f"downloading it failed ({one_paragraph(err, with_type=True, limit=300)})" if download else "downloading is turned off"
        raise DataError(
            f"Could not load the {pretty} {split} split from the data root {root}: torchvision found no "
            f"intact copy in {_expected_location(name, split, root)}, and {reason}. Fix: put the {pretty} "
            f"files there, or point advcli at the folder that holds them with data.root=PATH on the command "
            f"line or the environment variable ADVCLI_DATA=PATH, or allow downloading on a machine with "
            f"internet access."
        ) from err
    return ImageSet(images.to(torch.uint8).contiguous(), labels.to(torch.int64))


# -- synthetic ---------------------------------------------------------------------------------

_SYNTH_PROTO_LOW, _SYNTH_PROTO_HIGH = 0.2, 0.8  # prototype pixel range, [0, 1] pixel units
_SYNTH_CELL = 3  # prototypes are random on a grid of ~3x3-pixel cells, smoothed bilinearly
_SYNTH_NOISE_STD = 0.15  # per-pixel Gaussian noise around the prototype, [0, 1] pixel units


def _make_synthetic(
    split: str, *, num_train: int, num_test: int, num_classes: int, channels: int, image_size: int, seed: int
) -> ImageSet:
    """A tiny generated dataset: each example is its class prototype plus Gaussian noise.

    Each class has a fixed random prototype: values uniform in [0.2, 0.8] on a coarse grid of about
    ``image_size / 3`` cells per side, upsampled bilinearly, so that a shift of a pixel or two (random
    crop) keeps the class. Examples are prototype + N(0, 0.15^2) per pixel, clamped to [0, 1] and
    rounded to uint8. Classes are balanced and shuffled.

    Easy but not trivial: prototypes differ by about 0.2 per pixel on average, far more than the noise
    along the line between them, so a small MLP reaches > 90% clean accuracy within a few hundred
    steps; an L-inf perturbation needs a radius of several /255 (not 1/255) to flip a good classifier.

    Everything derives from ``torch.Generator().manual_seed(seed)``: first the prototypes, then one
    seed per split, so train and test are different draws around the same prototypes, and each split
    does not depend on the other's size.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = max(2, math.ceil(image_size / _SYNTH_CELL))
    grid = torch.rand(num_classes, channels, coarse, coarse, generator=g)
    grid = _SYNTH_PROTO_LOW + (_SYNTH_PROTO_HIGH - _SYNTH_PROTO_LOW) * grid
    prototypes = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=True)
    split_seeds = torch.randint(0, 2**62, (len(SPLITS),), generator=g)
    n = num_train if split == "train" else num_test

    g_split = torch.Generator().manual_seed(int(split_seeds[SPLITS.index(split)]))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g_split)]
    noise = _SYNTH_NOISE_STD * torch.randn(n, channels, image_size, image_size, generator=g_split)
    x = (prototypes[labels] + noise).clamp_(0, 1)
    return ImageSet(x.mul_(255).round_().to(torch.uint8), labels)


# =============================================================================================
# Batching and augmentation
# =============================================================================================


def num_batches(n: int, batch_size: int) -> int:
    """How many batches `batches` yields for ``n`` examples: ceil(n / b), the last one smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return -(-n // batch_size)


def batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    crop_padding: int = 0,
    flip: bool = False,
    channels_last: bool = False,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``data`` in batches, augmented on its device.

    Args:
        data: the split; batches are made on ``data.images.device``.
        batch_size: examples per batch; the last batch holds the rest.
        shuffle: visit examples in the order ``torch.randperm(N, generator=generator)`` (drawn on the
            generator's device, the CPU without one); otherwise in order 0..N-1.
        generator: source of the order and of all augmentation draws; seed it for a repeatable pass.
            Each pass advances it, so successive epochs differ.
        crop_padding: random translation of each image by up to this many pixels in each direction,
            filling with zeros -- the same as torchvision ``RandomCrop(size, padding=crop_padding)``.
        flip: mirror each image left-right with probability 0.5.
        channels_last: return ``x`` in ``torch.channels_last`` memory format.
        shard: ``(rank, world)`` for data-parallel training: of each global batch of ``batch_size``
            this process gets its contiguous share (``torch.tensor_split`` sizes), with the same
            order and augmentation draws as the unsharded pass, so ``world`` processes together see
            exactly the batches one process would.

    Yields:
        (x, y): x float32 (B, C, H, W) in [0, 1] (exactly ``images.float() / 255`` without
        augmentation), y int64 (B,). Every example appears exactly once per pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0 pixels, got {crop_padding}")
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    return _batches(data, batch_size, shuffle, generator, crop_padding, flip, channels_last, shard)


def share(n: int, shard: tuple[int, int] | None) -> slice:
    """The positions of a batch of ``n`` that process ``rank`` of ``world`` keeps (all without a shard)."""
    if shard is None:
        return slice(0, n)
    rank, world = shard
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _batches(data, batch_size, shuffle, generator, crop_padding, flip, channels_last, shard):
    n = len(data)
    device = data.images.device
    rng_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(n, generator=generator, device=rng_device).to(device) if shuffle else None
    for k in range(num_batches(n, batch_size)):
        start = k * batch_size
        size = min(batch_size, n - start)
        keep = share(size, shard)
        idx = slice(start + keep.start, start + keep.stop)
        if order is not None:
            idx = order[idx]  # gather the shuffled examples; unshuffled batches are views
        x, y = data.images[idx], data.labels[idx]
        # Augment in uint8 (a quarter of the memory traffic of float32), convert once at the end.
        # The draws are made for the whole batch, so a shard gets the same ones as the unsharded pass.
        if crop_padding > 0:
            x = _random_crop(x, crop_padding, generator, rng_device, size, keep)
        if flip:
            x = _random_flip(x, generator, rng_device, size, keep)
        x = x.float().div_(255)  # division, not * (1/255): bit-identical to torchvision's ToTensor
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def _random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None, rng_device, drawn: int,
                 keep: slice) -> torch.Tensor:
    """Zero-pad (B, C, H, W) by ``padding`` pixels and cut an H x W window at a random offset per image
    (offsets drawn for ``drawn`` images, of which ``x`` holds the ``keep`` ones)."""
    b, c, h, w = x.shape
    # Top-left corner of the window in padded coordinates, uniform in [0, 2 * padding] like RandomCrop.
    top = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator, device=rng_device)[keep].to(x.device)
    left = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator, device=rng_device)[keep].to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H) padded row of each output row
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, W)
    x = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def _random_flip(x: torch.Tensor, generator: torch.Generator | None, rng_device, drawn: int,
                 keep: slice) -> torch.Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability 0.5 (drawn as in `_random_crop`)."""
    mirror = torch.rand(drawn, generator=generator, device=rng_device)[keep].to(x.device) < 0.5
    return torch.where(mirror[:, None, None, None], x.flip(3), x)
