"""Tests for advcli.data: batching and augmentation bookkeeping, real MNIST / Fashion-MNIST against
torchvision's own items, CIFAR-10/100 and SVHN through torchvision's real parsers on tiny stand-ins
written in their on-disk formats, the missing-data message, and the synthetic set. CPU only.

The real-data tests need MNIST and Fashion-MNIST under $ADVCLI_DATA, else <repo>/../shared/data; they
fail (not skip) when the folder is missing.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import ToTensor
from torchvision.transforms.functional import pil_to_tensor

from advcli.data import (
    DATASETS,
    DataError,
    DatasetInfo,
    ImageSet,
    batches,
    dataset_info,
    load_split,
    num_batches,
)
from advcli.errors import UserError

from conftest import REPO  # noqa: E402
DATA_ROOT = os.environ.get("ADVCLI_DATA") or os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="module")
def data_root() -> str:
    for sub in ("MNIST", "FashionMNIST"):
        assert os.path.isdir(os.path.join(DATA_ROOT, sub, "raw")), (
            f"real {sub} data not found under {DATA_ROOT}; set ADVCLI_DATA to a folder holding "
            f"MNIST/raw and FashionMNIST/raw (torchvision layout)"
        )
    return DATA_ROOT


def indexed_set(n: int, channels: int = 1, size: int = 2) -> ImageSet:
    """Example i carries i in its label and in its pixels (low byte, high byte), to check pairing."""
    index = torch.arange(n)
    images = torch.zeros(n, channels, size, size, dtype=torch.uint8)
    images[:, 0, 0, 0] = (index % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (index // 256).to(torch.uint8)
    return ImageSet(images, index.clone())


def decode_index(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `indexed_set` on a float batch in [0, 1]."""
    pixels = (x * 255).round().long()
    return pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1]


def random_set(n: int, channels: int, size: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.randint(0, 10, (n,), generator=g))


def shuffled_labels(data: ImageSet, seed: int, epochs: int = 1, batch_size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([y for _, y in batches(data, batch_size, shuffle=True, generator=g)]) for _ in range(epochs)]


# ============================================================================================
# batches
# ============================================================================================


@pytest.mark.parametrize("n,batch_size", [(103, 16), (96, 16), (5, 8), (1, 1)])
def test_shuffled_pass_visits_every_example_once(n, batch_size):
    data = indexed_set(n)
    g = torch.Generator().manual_seed(0)
    out = list(batches(data, batch_size, shuffle=True, generator=g))
    assert len(out) == num_batches(n, batch_size)
    sizes = [len(y) for _, y in out]
    assert sizes[:-1] == [batch_size] * (len(out) - 1) and 0 < sizes[-1] <= batch_size
    seen = torch.cat([y for _, y in out])
    assert torch.equal(seen.sort().values, torch.arange(n)), "each example exactly once per pass"
    # pixels travel with their labels
    assert torch.equal(torch.cat([decode_index(x) for x, _ in out]), seen)


def test_the_last_batch_holds_the_rest():
    data = indexed_set(103)
    out = list(batches(data, 16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert len(out) == num_batches(103, 16) == 7 and [len(y) for _, y in out][-1] == 103 - 6 * 16
    assert num_batches(96, 16) == 6 and num_batches(0, 16) == 0


def test_unshuffled_batches_are_in_order_and_exactly_images_over_255():
    data = random_set(37, channels=3, size=5)
    out = list(batches(data, 10))
    x = torch.cat([x for x, _ in out])
    assert torch.equal(torch.cat([y for _, y in out]), data.labels)
    for xb, yb in out:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.shape[1:] == (3, 5, 5) and xb.device == data.images.device
        assert xb.is_contiguous()
    assert torch.equal(x, data.images.float() / 255)
    assert x.min() >= 0 and x.max() <= 1


def test_shuffle_order_is_randperm_of_the_generator():
    data = indexed_set(200)
    first = shuffled_labels(data, seed=3)[0]
    assert torch.equal(first, torch.randperm(200, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(first, shuffled_labels(data, seed=3)[0]), "same seed -> same order"
    assert not torch.equal(first, shuffled_labels(data, seed=4)[0]), "different seed -> different order"
    epoch1, epoch2 = shuffled_labels(data, seed=3, epochs=2)
    assert not torch.equal(epoch1, epoch2), "the generator advances between epochs"
    assert not torch.equal(first, torch.arange(200))


def test_channels_last_changes_memory_format_not_values():
    data = random_set(9, channels=3, size=6)
    plain = next(iter(batches(data, 9)))[0]
    last = next(iter(batches(data, 9, channels_last=True)))[0]
    assert not plain.is_contiguous(memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last)
    # with augmentation too
    g = torch.Generator().manual_seed(0)
    x, _ = next(iter(batches(data, 9, generator=g, crop_padding=1, flip=True, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_flip_mirrors_about_half_of_the_images():
    data = random_set(400, channels=3, size=7)
    original = data.images.float() / 255
    mirrored = original.flip(-1)
    assert all(not torch.equal(a, b) for a, b in zip(original, mirrored)), "test images must be asymmetric"
    x, y = next(iter(batches(data, 400, flip=True, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(y, data.labels)
    same = (x == original).flatten(1).all(1)
    flipped = (x == mirrored).flatten(1).all(1)
    assert torch.all(same ^ flipped), "each image is either untouched or exactly mirrored"
    assert 0.4 < flipped.float().mean() < 0.6
    # the draws come from the generator: same seed, same flips
    x2, _ = next(iter(batches(data, 400, flip=True, generator=torch.Generator().manual_seed(0))))
    x3, _ = next(iter(batches(data, 400, flip=True, generator=torch.Generator().manual_seed(1))))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_crop_translates_each_image_by_at_most_padding_with_zero_fill():
    size, pad, n = 8, 2, 300
    # pixel (r, c) holds 1 + r * size + c in channel 0 (and 100 + that in channel 1): 0 means padding
    position = 1 + torch.arange(size * size, dtype=torch.uint8).reshape(size, size)
    image = torch.stack([position, position + 100])
    data = ImageSet(image.expand(n, -1, -1, -1).clone(), torch.arange(n))
    x, y = next(iter(batches(data, n, crop_padding=pad, generator=torch.Generator().manual_seed(0))))
    assert x.shape == (n, 2, size, size) and torch.equal(y, data.labels)
    x = (x * 255).round().to(torch.uint8)
    padded = F.pad(image, (pad, pad, pad, pad))
    shifts = set()
    for out in x:
        rows, cols = torch.nonzero(out[0], as_tuple=True)
        source = out[0][rows, cols].long() - 1
        dy, dx = (source // size - rows).unique(), (source % size - cols).unique()
        assert len(dy) == 1 and len(dx) == 1, "a crop is a pure translation"
        dy, dx = int(dy), int(dx)
        assert abs(dy) <= pad and abs(dx) <= pad
        expected = padded[:, pad + dy : pad + dy + size, pad + dx : pad + dx + size]
        assert torch.equal(out, expected), "both channels move together; uncovered pixels are zero"
        shifts.add((dy, dx))
    assert len(shifts) == (2 * pad + 1) ** 2, "every offset in [-pad, pad]^2 occurs"


def test_crop_and_flip_together_keep_shape_range_and_values():
    data = random_set(64, channels=3, size=8, seed=5)
    data.images[0] = 255  # extremes stay in range
    g = torch.Generator().manual_seed(0)
    x, y = next(iter(batches(data, 64, crop_padding=3, flip=True, generator=g)))
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    for out, img in zip((x * 255).round().to(torch.uint8), data.images):
        assert set(out.unique().tolist()) <= set(img.unique().tolist()) | {0}
    assert not torch.equal(x, data.images.float() / 255)


def test_batches_rejects_bad_arguments_at_call_time():
    data = indexed_set(4)
    with pytest.raises(ValueError):
        batches(data, 0)
    with pytest.raises(ValueError):
        batches(data, 2, crop_padding=-1)
    with pytest.raises(ValueError):
        num_batches(4, 0)


def test_imageset_subset_to_and_checks():
    data = indexed_set(10)
    assert len(data) == 10
    part = data.subset(torch.tensor([7, 2]))
    assert torch.equal(part.labels, torch.tensor([7, 2]))
    assert torch.equal(decode_index(part.images.float() / 255), part.labels)
    strided = data.subset(slice(1, 10, 3))
    assert torch.equal(strided.labels, torch.tensor([1, 4, 7])) and strided.images.is_contiguous()
    moved = data.to("cpu")
    assert moved.images.device.type == "cpu" and torch.equal(moved.images, data.images)
    with pytest.raises(TypeError):
        ImageSet(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError):
        ImageSet(torch.zeros(2, 3, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# ============================================================================================
# real MNIST and Fashion-MNIST
# ============================================================================================


def test_mnist_test_split_matches_torchvision(data_root):
    data = load_split("mnist", "test", root=data_root)  # download=True: files present, so no network
    assert len(data) == 10_000
    assert data.images.shape == (10_000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and set(data.labels.unique().tolist()) == set(range(10))
    info = dataset_info("mnist")
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)

    reference = torchvision.datasets.MNIST(data_root, train=False)
    for i in (0, 1, 4321, 9999):
        image, label = reference[i]
        assert torch.equal(data.images[i], pil_to_tensor(image))
        assert data.labels[i] == label

    # batches() gives what torchvision's ToTensor gives, in order and in randperm order
    as_tensor = torchvision.datasets.MNIST(data_root, train=False, transform=ToTensor())
    x, y = next(iter(batches(data, 32)))
    assert torch.equal(x, torch.stack([as_tensor[i][0] for i in range(32)]))
    assert y.tolist() == [as_tensor[i][1] for i in range(32)]
    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(7))[:32].tolist()
    x, y = next(iter(batches(data, 32, shuffle=True, generator=torch.Generator().manual_seed(7))))
    assert torch.equal(x, torch.stack([as_tensor[i][0] for i in perm]))
    assert y.tolist() == [as_tensor[i][1] for i in perm]


def test_fashion_mnist_train_split_matches_torchvision(data_root):
    data = load_split("fashion_mnist", "train", root=data_root, download=False)
    assert len(data) == 60_000 and data.images.shape == (60_000, 1, 28, 28)
    reference = torchvision.datasets.FashionMNIST(data_root, train=True)
    for i in (0, 12_345, 59_999):
        image, label = reference[i]
        assert torch.equal(data.images[i], pil_to_tensor(image))
        assert data.labels[i] == label
    assert torch.bincount(data.labels).tolist() == [6000] * 10


# ============================================================================================
# CIFAR-10 / CIFAR-100 / SVHN through torchvision's real parsers, on tiny stand-ins
# (the fixtures cifar10_root, cifar100_root and svhn_root of conftest.py)
# ============================================================================================


@pytest.mark.parametrize("split,n", [("train", 10), ("test", 4)])
def test_cifar10_standin_loads_through_torchvision(cifar10_root, split, n):
    root, written = cifar10_root
    data = load_split("cifar10", split, root=str(root), download=False)
    rows, labels = written[split]
    assert data.images.shape == (n, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.images.is_contiguous()
    assert data.labels.dtype == torch.int64 and torch.equal(data.labels, labels)
    # a row is three 32x32 planes (R, G, B): CHW is a plain reshape of what was written
    assert torch.equal(data.images, torch.from_numpy(rows.reshape(n, 3, 32, 32)))
    assert torch.equal(data.images[0, 1, 0, :], torch.from_numpy(rows[0, 1024:1056]))
    reference = torchvision.datasets.CIFAR10(str(root), train=split == "train")
    for i in range(n):
        assert torch.equal(data.images[i], pil_to_tensor(reference[i][0]))
    as_tensor = torchvision.datasets.CIFAR10(str(root), train=split == "train", transform=ToTensor())
    x, _ = next(iter(batches(data, n)))
    assert torch.equal(x, torch.stack([as_tensor[i][0] for i in range(n)]))
    # download=True with the files present parses them without touching the network
    assert torch.equal(load_split("cifar10", split, root=str(root)).images, data.images)


def test_cifar100_standin_loads_fine_labels(cifar100_root):
    root, written = cifar100_root
    for split, (rows, fine) in written.items():
        data = load_split("cifar100", split, root=root, download=False)
        assert torch.equal(data.images, torch.from_numpy(rows.reshape(len(fine), 3, 32, 32)))
        assert data.labels.tolist() == fine, "fine labels, not coarse"
    assert dataset_info("cifar100").num_classes == 100


def test_svhn_standin_loads_through_torchvision(svhn_root):
    root, written = svhn_root
    x_hwcn, labels = written["test"]
    data = load_split("svhn", "test", root=root, download=False)
    assert data.images.shape == (6, 3, 32, 32) and data.images.is_contiguous()
    assert data.labels.tolist() == labels == [0, 1, 2, 0, 9, 5]  # the files write digit 0 as 10
    assert torch.equal(data.images[4], torch.from_numpy(x_hwcn[:, :, :, 4]).permute(2, 0, 1))
    reference = torchvision.datasets.SVHN(root, split="test")
    assert torch.equal(data.images[4], pil_to_tensor(reference[4][0]))


def test_svhn_without_scipy_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy...` raise ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match="pip install scipy") as caught:
        load_split("svhn", "train", root=tmp_path, download=False)
    assert isinstance(caught.value.__cause__, ImportError)


# ============================================================================================
# errors
# ============================================================================================


@pytest.mark.parametrize(
    "name,folder",
    [
        ("mnist", os.path.join("MNIST", "raw")),
        ("fashion_mnist", os.path.join("FashionMNIST", "raw")),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_data_names_the_folder_and_the_fix(tmp_path, name, folder):
    with pytest.raises(DataError) as caught:
        load_split(name, "train", root=tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path) in message and os.path.join(str(tmp_path), folder) in message
    assert "ADVCLI_DATA" in message and "data.root=" in message and "download" in message
    assert "\n" not in message, "one paragraph"
    assert isinstance(caught.value, UserError)
    assert caught.value.__cause__ is not None, "raised from torchvision's exception"


def test_relative_root_is_reported_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / "relative" / "MNIST")):
        load_split("mnist", "test", root="relative", download=False)


def test_unknown_name_split_and_options_are_data_errors():
    with pytest.raises(DataError) as caught:
        load_split("imagenet", "train", root=".")
    assert all(name in str(caught.value) for name in DATASETS)
    with pytest.raises(DataError) as caught:
        dataset_info("cifar-10")
    assert "cifar10" in str(caught.value)
    with pytest.raises(DataError, match="extra"):
        load_split("synthetic", "extra", root=".")
    with pytest.raises(DataError, match="num_clases"):
        load_split("synthetic", "train", root=".", num_clases=3)
    with pytest.raises(DataError, match="num_classes"):
        dataset_info("synthetic", num_classes=1)
    with pytest.raises(DataError, match="image_size"):
        load_split("synthetic", "train", root=".", image_size=12.5)
    with pytest.raises(DataError, match="synthetic"):
        dataset_info("mnist", num_classes=3)


@pytest.mark.parametrize("name", [n for n in DATASETS if n not in ("synthetic", "folder")])  # folder: test_folder.py
def test_real_dataset_info_is_consistent(name):
    info = dataset_info(name)
    assert isinstance(info, DatasetInfo) and info.name == name
    assert len(info.mean) == len(info.std) == info.in_channels
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)


# ============================================================================================
# synthetic
# ============================================================================================


def test_synthetic_is_deterministic_per_seed_and_shaped_by_options():
    options = dict(num_train=90, num_test=30, num_classes=3, channels=2, image_size=10)
    a = load_split("synthetic", "train", root="unused", seed=5, **options)
    b = load_split("synthetic", "train", root="unused", seed=5, **options)
    c = load_split("synthetic", "train", root="unused", seed=6, **options)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (90, 2, 10, 10) and a.images.dtype == torch.uint8 and a.labels.dtype == torch.int64
    assert torch.bincount(a.labels).tolist() == [30, 30, 30], "balanced classes"
    assert not torch.equal(a.labels, torch.arange(90) % 3), "classes are shuffled"
    assert a.images.float().std() > 20, "pixel values spread over the range, not saturated"
    info = dataset_info("synthetic", seed=5, **options)
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 2, 10)
    assert len(info.mean) == len(info.std) == 2

    test = load_split("synthetic", "test", root="unused", seed=5, **options)
    assert len(test) == 30 and not torch.equal(test.images, a.images[:30]), "train and test are different draws"
    same_size = {**options, "num_train": 30}
    assert not torch.equal(
        load_split("synthetic", "train", root="unused", seed=5, **same_size).images, test.images
    ), "train and test differ even at the same size"
    other_train_size = load_split("synthetic", "test", root="unused", seed=5, **{**options, "num_train": 7})
    assert torch.equal(test.images, other_train_size.images), "a split does not depend on the other's size"
    # same prototypes: class means of train and test agree far better than across classes
    def mean(s: ImageSet, k: int) -> torch.Tensor:
        return s.images[s.labels == k].float().mean(0)

    assert (mean(a, 0) - mean(test, 0)).abs().mean() < (mean(a, 0) - mean(test, 1)).abs().mean() / 2


def test_synthetic_defaults_match_info():
    data = load_split("synthetic", "train", root=None)
    info = dataset_info("synthetic")
    assert len(data) == 512 and len(load_split("synthetic", "test", root=None)) == 256
    assert data.images.shape[1:] == (info.in_channels, info.image_size, info.image_size)
    assert int(data.labels.max()) + 1 == info.num_classes
    x, _ = next(iter(batches(data, 512)))
    assert abs(x.mean().item() - info.mean[0]) < 0.05


def test_synthetic_is_learnable_and_not_broken_by_a_tiny_perturbation():
    train, test = (load_split("synthetic", s, root=None) for s in ("train", "test"))
    info = dataset_info("synthetic")
    torch.manual_seed(0)
    d = info.in_channels * info.image_size**2
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    def forward(x: torch.Tensor) -> torch.Tensor:  # normalise in the model, as advcli's models do
        return model((x - info.mean[0]) / info.std[0])

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):  # 25 epochs x 8 batches = 200 steps
        for x, y in batches(train, 64, shuffle=True, generator=g):
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    x, y = next(iter(batches(test, len(test))))
    x.requires_grad_(True)
    logits = forward(x)
    assert (logits.argmax(1) == y).float().mean() > 0.9, "learnable in 200 steps"
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x)
    with torch.no_grad():
        x_adv = (x + grad.sign() / 255).clamp(0, 1)  # one FGSM step, eps = 1/255
        assert (forward(x_adv).argmax(1) == y).float().mean() > 0.9, "a 1/255 perturbation changes little"
        x_far = (x + 64 / 255 * grad.sign()).clamp(0, 1)  # eps = 64/255: attacks have something to do
        assert (forward(x_far).argmax(1) == y).float().mean() < 0.5
