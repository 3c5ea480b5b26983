"""Shared test set-up: the data root, a Hydra config composer, and small fixed models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

REPO = Path(__file__).resolve().parents[1]
# Our machines keep MNIST and Fashion-MNIST beside the checkout; a user may point ADVCLI_DATA elsewhere.
os.environ.setdefault("ADVCLI_DATA", str((REPO / ".." / "shared" / "data").resolve()))
DATA_ROOT = Path(os.environ["ADVCLI_DATA"])


@pytest.fixture
def real_data_root() -> Path:
    """The folder holding real MNIST; a test that needs it fails (never skips) when it is missing."""
    mnist = DATA_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert mnist.is_file(), (f"real MNIST is missing: expected {mnist}. Set ADVCLI_DATA to a folder holding "
                             "MNIST in torchvision's layout.")
    return DATA_ROOT


def compose_config(name: str, overrides: list[str]):
    """The config `advcli <name>` would run with these overrides (Hydra's compose API)."""
    with initialize_config_module(config_module="advcli.configs", version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A run on the synthetic data that takes a few seconds on a CPU."""
    return ["dataset=synthetic", "model=mlp", "epochs=1", "batch_size=64", "device=cpu", "progress=false",
            f"output_dir={tmp_path}", "data.val_size=64", "eps=0.1", "eps_warmup=0", *extra]


class TinyConvNet(torch.nn.Module):
    """A small fixed conv net on 1x8x8 inputs for attack tests (no data needed)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyConvNet().eval()


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return x, y


@pytest.fixture(scope="session")
def robust_mlp():
    """An MLP PGD-trained (eps=0.05, a few seconds) on the synthetic set, in eval mode, and the test split
    as (x, y): x (256, 1, 12, 12) in [0, 1]. For evaluation and sanity tests that need a real model."""
    import torch.nn.functional as F

    from advcli import attacks, data
    from advcli.models import build_model

    torch.manual_seed(0)
    train_set = data.load_split("synthetic", "train", root=".", num_train=1024)
    test_set = data.load_split("synthetic", "test", root=".")
    model = build_model("mlp", in_channels=1, image_size=12, num_classes=4, mean=(0.5,), std=(0.25,), hidden=[64])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(6):
        for x, y in data.batches(train_set, 64, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            x_adv = attacks.pgd(model, x, y, 0.05, steps=5)
            optimizer.zero_grad()
            F.cross_entropy(model(x_adv), y).backward()
            optimizer.step()
    x, y = next(data.batches(test_set, len(test_set)))
    return model.eval(), x, y
