"""Your own images: ``dataset=folder dataset.path=DIR``, read with torchvision's ``ImageFolder``.

Layout: ``DIR/train/CLASS/*.png`` and ``DIR/test/CLASS/*.png`` (any format PIL reads), the same class folders in
both. Each image is converted to ``dataset.channels`` channels (3: RGB, 1: grey) and resized to
``dataset.image_size`` pixels per side, then held like every built-in dataset: one uint8 tensor per split, on the
training device, batched and augmented there (`advcli.data.batches`).

ImageFolder lists images class by class; each split is then put in a seeded random order (``dataset.shuffle_seed``,
default 0; null keeps ImageFolder's order), the same on every run and resume, so that the held-out slice (the
training split's last ``data.val_size`` images), a ``data.train_size`` subset and the first
``evaluation.num_examples`` test images hold every class instead of the last or first ones only.

The training split's per-channel mean and std (for the model's ``Normalize`` layer) are computed once and cached
beside the data in ``DIR/.advcli-stats.json``, keyed by image size, channels and the training files' names,
sizes and modification times, so that changed data is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from advcli.data.sets import DatasetInfo, ImageSet
from advcli.errors import DataError
from advcli.runs.report import write_json

DEFAULTS = {"path": None, "image_size": 32, "channels": 3, "shuffle_seed": 0}
STATS_FILE = ".advcli-stats.json"


def options(given: dict[str, Any]) -> dict[str, Any]:
    """``path``, ``image_size`` and ``channels``, checked."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise DataError(f"Unknown option(s) {', '.join(unknown)} for dataset=folder; its options are dataset.path "
                        "(the folder holding train/ and test/), dataset.image_size, dataset.channels (1 or 3) and "
                        "dataset.shuffle_seed.")
    merged = {**DEFAULTS, **given}
    if merged["path"] in (None, "", "???"):
        raise DataError("dataset=folder needs dataset.path=DIR: the folder that holds train/ and test/, each with "
                        "one subfolder of images per class (torchvision's ImageFolder layout).")
    size, channels = merged["image_size"], merged["channels"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise DataError(f"dataset.image_size={size!r} must be a whole number of pixels, 4 or more (images are "
                        "resized to image_size x image_size).")
    if channels not in (1, 3):
        raise DataError(f"dataset.channels={channels!r} must be 1 (grey) or 3 (RGB).")
    seed = merged["shuffle_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise DataError(f"dataset.shuffle_seed={seed!r} must be a whole number, 0 or more (the seed of the images' "
                        "order), or null to keep ImageFolder's order (class by class).")
    merged["path"] = str(Path(os.path.expanduser(str(merged["path"]))).resolve())
    return merged


def _split_dir(path: str, split: str) -> Path:
    folder = Path(path) / split
    if not folder.is_dir():
        raise DataError(f"dataset.path={path} has no {split}/ folder. dataset=folder reads torchvision's ImageFolder "
                        f"layout: {path}/train/CLASS/IMAGE and {path}/test/CLASS/IMAGE, one folder per class.")
    return folder


def _image_folder(path: str, split: str, image_size: int, channels: int):
    from torchvision import datasets, transforms

    mode = "RGB" if channels == 3 else "L"
    transform = transforms.Compose([transforms.Lambda(lambda image: image.convert(mode)),
                                    transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    try:
        return datasets.ImageFolder(str(_split_dir(path, split)), transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"dataset.path={path}: {split}/ holds no images torchvision can read ({error}). Put each "
                        f"class's images in {path}/{split}/CLASS/.") from None


def class_names(path: str) -> tuple[str, ...]:
    """The class folders of ``train/`` (sorted, as ImageFolder numbers them); ``test/`` must have the same."""
    from torchvision import datasets

    found = {split: datasets.folder.find_classes(str(_split_dir(path, split)))[0] for split in ("train", "test")}
    if found["train"] != found["test"]:
        only = sorted(set(found["train"]) ^ set(found["test"]))
        raise DataError(f"dataset.path={path}: train/ and test/ have different class folders (in one only: "
                        f"{', '.join(only[:5]) or 'the same names in another order'}); both need the same classes.")
    if len(found["train"]) < 2:
        raise DataError(f"dataset.path={path}: train/ has {len(found['train'])} class folder(s); a classifier needs two "
                        "or more.")
    return tuple(found["train"])


def load_split(split: str, *, path: str, image_size: int, channels: int,
               shuffle_seed: int | None = 0) -> ImageSet:
    """One split as an `ImageSet` (uint8, on the CPU), in the order of `shuffled`."""
    return shuffled(_read_split(split, path=path, image_size=image_size, channels=channels), split, shuffle_seed)


def _read_split(split: str, *, path: str, image_size: int, channels: int) -> ImageSet:
    """One split in ImageFolder's order (class, then file name)."""
    class_names(path)
    folder = _image_folder(path, split, image_size, channels)
    images = torch.stack([image for image, _ in folder])
    return ImageSet(images.to(torch.uint8).contiguous(), torch.as_tensor(folder.targets, dtype=torch.int64))


def shuffled(images: ImageSet, split: str, seed: int | None) -> ImageSet:
    """``images`` in a random order drawn from ``seed`` alone (one for each split), or as they are for None."""
    if seed is None:
        return images
    generator = torch.Generator().manual_seed(2 * seed + (split == "test"))
    return images.subset(torch.randperm(len(images), generator=generator))


def order_note(options: dict[str, Any]) -> str:
    """How a folder's splits are ordered, for the results (which images the first N are)."""
    if options.get("shuffle_seed") is None:
        return "ImageFolder's order (class by class, then file name; dataset.shuffle_seed=null)"
    return (f"the order of dataset.shuffle_seed={options['shuffle_seed']} (torch.randperm seeded with "
            f"{2 * options['shuffle_seed']} for train/ and {2 * options['shuffle_seed'] + 1} for test/ over "
            "ImageFolder's class-sorted list)")


def channel_stats(images: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of the pixels, in [0, 1] units."""
    x = images.images.to(torch.float64).div(255).transpose(0, 1).flatten(1)
    return x.mean(1).tolist(), x.std(1, correction=0).tolist()


def _stats_key(path: str, image_size: int, channels: int) -> str:
    """Size, channels, and the name, size and modification time of every training image ImageFolder would read
    (it follows symbolic links, and so does this)."""
    from torchvision import datasets

    train = str(_split_dir(path, "train"))
    _, class_to_index = datasets.folder.find_classes(train)
    samples = datasets.folder.make_dataset(train, class_to_index, extensions=datasets.folder.IMG_EXTENSIONS)
    digest = hashlib.sha256(f"{image_size}:{channels}".encode())
    for file, label in samples:
        stat = os.stat(file)
        digest.update(f"{os.path.relpath(file, path)}:{label}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        stored = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _write_cache(cache: Path, stored: dict[str, Any]) -> None:
    """Written whole or not at all (two runs may measure the same folder at once)."""
    try:
        write_json(cache, stored)
    except OSError:
        pass  # a read-only data folder: the statistics are computed again next time


def info(*, path: str, image_size: int, channels: int, shuffle_seed: int | None = 0) -> DatasetInfo:
    """Classes, shape and the training split's statistics (cached beside the data; the order of the images, and so
    ``shuffle_seed``, does not enter them)."""
    classes = class_names(path)
    cache, key = Path(path) / STATS_FILE, _stats_key(path, image_size, channels)
    stored = _read_cache(cache)
    stats = stored.get(key)
    if not (isinstance(stats, dict) and len(stats.get("mean", [])) == channels == len(stats.get("std", []))):
        mean, std = channel_stats(_read_split("train", path=path, image_size=image_size, channels=channels))
        stats = {"mean": mean, "std": [max(s, 1e-6) for s in std]}
        _write_cache(cache, {**stored, key: stats})
    return DatasetInfo("folder", len(classes), channels, image_size, tuple(stats["mean"]), tuple(stats["std"]),
                       classes=classes)
