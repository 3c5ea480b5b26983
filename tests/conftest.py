"""Shared test set-up: the data root, a Hydra config composer, the `advcli` console script in a subprocess,
small fixed models, and tiny stand-ins of CIFAR-10, CIFAR-100 and SVHN in torchvision's on-disk formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

REPO = Path(__file__).resolve().parents[1]
# Our machines keep MNIST and Fashion-MNIST beside the checkout; a user may point ADVCLI_DATA elsewhere.
os.environ.setdefault("ADVCLI_DATA", str((REPO / ".." / "shared" / "data").resolve()))
DATA_ROOT = Path(os.environ["ADVCLI_DATA"])
# One CPU thread per test process (and per `advcli` it starts): the suite's tiny runs gain nothing from more,
# and its numbers stay bit-identical whatever else the machine runs (threads=auto follows the load).
os.environ.setdefault("ADVCLI_THREADS", "1")
torch.set_num_threads(int(os.environ["ADVCLI_THREADS"]))


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


def advcli_process_env(env: dict[str, str] | None) -> dict[str, str]:
    # unbuffered, so that output written before a crash or a signal is not lost
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def run_advcli(*args: str, cwd=None, timeout: float = 300, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """`advcli ARGS` as a user types it, run from the repository root (or ``cwd``) to its end: exit status,
    stdout and stderr as text. ``env``: variables set on top of this process's environment."""
    return subprocess.run(["advcli", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout,
                          env=advcli_process_env(env))


def start_advcli(*args: str, cwd=None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`advcli ARGS` started and left running (to be stopped by a test), stdout and stderr piped as text."""
    return subprocess.Popen(["advcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd or REPO, env=advcli_process_env(env))


def hold_run_directory(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder`` as a run directory (as a live advcli train would), until it is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        ["python", "-c", "import sys, time; from pathlib import Path; from advcli.runs import paths; "
                         "paths.claim(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE, text=True, env=advcli_process_env(None))
    assert holder.stdout.readline().strip() == "held"
    return holder


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A run on the synthetic data that takes a few seconds on a CPU."""
    # a constant learning rate: tests that resume with more epochs need one that has not reached 0
    return ["dataset=synthetic", "model=mlp", "epochs=1", "batch_size=64", "lr_schedule=constant", "device=cpu", "progress=false",
            f"output_dir={tmp_path}", "data.val_size=64", "eps=0.1", "eps_warmup=0", "evaluation=fast",
            "evaluation.sanity.stronger.attacks.square.queries=300", *extra]  # the probe's Square: seconds, not tens


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


# ---------------------------------------------------------------- CIFAR-10/100 and SVHN stand-ins


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_pickle(path, obj) -> None:
    # The real files are Python 2 pickles whose str keys come back as str under torchvision's
    # encoding="latin1"; a Python 3 pickle gives the same dicts only with str keys (b"data" would
    # stay bytes and torchvision's entry["data"] would fail).
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def fake_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """CIFAR rows: uint8 (n, 3072) = 1024 red, 1024 green, 1024 blue values, each row-major 32x32."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def patch_checksums(monkeypatch, cls, folder, train_names, test_names, meta_name) -> None:
    # torchvision checks each file's md5 against these class attributes before parsing. Pointing them
    # at the stand-ins' md5s changes only the checksum table; torchvision's own reading code still runs.
    # `meta` holds the metadata file's md5 the same way, so it is adjusted too.
    monkeypatch.setattr(cls, "train_list", [[name, md5(folder / name)] for name in train_names])
    monkeypatch.setattr(cls, "test_list", [[name, md5(folder / name)] for name in test_names])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / meta_name)})


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """CIFAR-10 stand-in (10 train, 4 test examples) under tmp_path: (root, {split: (rows, labels)})."""
    import torchvision  # here, not at the top: a test session that reads no data does not pay for it

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = {"train": ([], []), "test": ([], [])}
    train_names = [f"data_batch_{k}" for k in range(1, 6)]
    for name, n in zip(train_names + ["test_batch"], [2, 3, 1, 2, 2, 4]):
        rows, labels = fake_rows(n, rng), rng.integers(0, 10, size=n).tolist()
        write_pickle(folder / name, {"batch_label": name, "data": rows, "labels": labels})
        split = "test" if name == "test_batch" else "train"
        written[split][0].append(rows)
        written[split][1].extend(labels)
    write_pickle(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)]})
    patch_checksums(monkeypatch, torchvision.datasets.CIFAR10, folder, train_names, ["test_batch"], "batches.meta")
    return tmp_path, {s: (np.concatenate(r), torch.tensor(l)) for s, (r, l) in written.items()}


@pytest.fixture
def cifar100_root(tmp_path, monkeypatch):
    """CIFAR-100 stand-in (5 train, 3 test examples) under tmp_path: (root, {split: (rows, fine labels)});
    the files also hold coarse labels, which advcli must not read."""
    import torchvision

    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    written = {}
    for name, n in (("train", 5), ("test", 3)):
        rows = fake_rows(n, rng)
        fine = [99, 0, 57, 12, 3][:n]
        coarse = [k // 5 for k in fine]
        write_pickle(folder / name, {"data": rows, "fine_labels": fine, "coarse_labels": coarse})
        written[name] = (rows, fine)
    write_pickle(folder / "meta", {"fine_label_names": [f"f{k}" for k in range(100)], "coarse_label_names": []})
    patch_checksums(monkeypatch, torchvision.datasets.CIFAR100, folder, ["train"], ["test"], "meta")
    return tmp_path, written


@pytest.fixture
def svhn_root(tmp_path, monkeypatch):
    """SVHN stand-in (5 train, 6 test examples) under tmp_path: (root, {split: (X as written (32, 32, 3, n),
    labels as advcli should read them)}). SVHN's .mat files label digit 0 as 10. Needs scipy."""
    import scipy.io
    import torchvision

    rng = np.random.default_rng(2)
    split_list = dict(torchvision.datasets.SVHN.split_list)
    written = {}
    for split, y in (("train", [3, 10, 7, 1, 1]), ("test", [10, 1, 2, 10, 9, 5])):
        x_hwcn = rng.integers(0, 256, size=(32, 32, 3, len(y)), dtype=np.uint8)  # the .mat layout
        path = tmp_path / f"{split}_32x32.mat"
        scipy.io.savemat(path, {"X": x_hwcn, "y": np.array(y, dtype=np.uint8)[:, None]})
        split_list[split] = [split_list[split][0], path.name, md5(path)]
        written[split] = (x_hwcn, [k % 10 for k in y])
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", split_list)  # checksum table only
    return tmp_path, written
