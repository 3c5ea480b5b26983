"""Your own images: dataset=folder (torchvision's ImageFolder layout) trains, resumes and evaluates, with its
training split's mean and std computed once and cached beside the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from advcli import checkpoint, folder, viz
from advcli.data import dataset_info, load_split
from advcli.errors import CheckpointError, DataError
from advcli.evaluate import evaluate_checkpoint
from advcli.train import train
from advcli.viz import visualize_checkpoints
from conftest import compose_config, tiny_overrides

CLASSES = ("cat", "dog", "eel")


def write_images(root, counts={"train": 12, "test": 6}, size=10):
    """PNGs whose class decides the mean colour (so a model can learn them), some not at the target size."""
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                base = np.zeros((size + i % 3, size, 3)) + 60 + 60 * k  # heights differ: every image is resized
                pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_images(tmp_path / "pictures")


def direct_stats(root, size):
    """The training images' per-channel mean and std, computed here with PIL and numpy."""
    arrays = [np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float64) / 255
              for path in sorted((root / "train").rglob("*.png"))]
    pixels = np.stack(arrays).reshape(-1, 3)
    return pixels.mean(0), pixels.std(0)


def test_folder_info_holds_classes_and_the_training_splits_statistics(image_folder):
    info = dataset_info("folder", path=str(image_folder), image_size=8)
    mean, std = direct_stats(image_folder, 8)
    assert info.classes == CLASSES and (info.num_classes, info.in_channels, info.image_size) == (3, 3, 8)
    assert np.allclose(info.mean, mean, atol=1e-6) and np.allclose(info.std, std, atol=1e-6)
    cache = json.loads((image_folder / folder.STATS_FILE).read_text())
    assert len(cache) == 1 and np.allclose(next(iter(cache.values()))["mean"], mean, atol=1e-6)


def test_cached_statistics_are_reused_and_renewed_when_the_data_changes(image_folder, monkeypatch):
    first = dataset_info("folder", path=str(image_folder), image_size=8)
    monkeypatch.setattr(folder, "load_split", lambda *a, **k: pytest.fail("statistics computed again"))
    assert dataset_info("folder", path=str(image_folder), image_size=8) == first
    monkeypatch.undo()
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(image_folder / "train" / "cat" / "white.png")
    assert dataset_info("folder", path=str(image_folder), image_size=8).mean > first.mean


def test_splits_are_uint8_in_imagefolder_order_at_the_asked_size(image_folder):
    test = load_split("folder", "test", root=None, path=str(image_folder), image_size=8, channels=1)
    assert test.images.dtype == torch.uint8 and test.images.shape == (18, 1, 8, 8)
    assert test.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6


@pytest.mark.parametrize("problem,fragment", [("no_test", "has no test/ folder"), ("other_classes", "different class"),
                                              ("missing_path", "dataset.path=DIR")])
def test_a_bad_folder_is_one_paragraph(tmp_path, problem, fragment):
    root = write_images(tmp_path / "p", counts={"train": 2, "test": 1} if problem != "no_test" else {"train": 2})
    if problem == "other_classes":
        (root / "test" / "eel").rename(root / "test" / "emu")
    options = {} if problem == "missing_path" else {"path": str(root)}
    with pytest.raises(DataError, match=fragment):
        dataset_info("folder", **options)


def test_a_folder_trains_resumes_and_evaluates(tmp_path, image_folder):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, "dataset=folder", f"dataset.path={image_folder}", "dataset.image_size=8",
                               "dataset.crop_padding=1", "dataset.flip=true", "model=small_cnn", "batch_size=8",
                               "data.val_size=3", "evaluation.sanity.enabled=false")
    train(compose_config("train", overrides))
    resumed = train(compose_config("train", [*overrides, "epochs=2"]))  # continues the run to a second epoch
    assert resumed["epochs_trained"] == 2 and [e["epoch"] for e in resumed["history"]] == [1, 2]
    payload = checkpoint.load(run / "checkpoint.pt")
    assert payload["model_spec"]["classes"] == list(CLASSES)
    info = dataset_info("folder", path=str(image_folder), image_size=8)
    assert payload["model_spec"]["mean"] == list(info.mean)
    again = evaluate_checkpoint(compose_config("eval", [f"ckpt={run / 'checkpoint.pt'}", "evaluation=fast",
                                                        "evaluation.sanity.enabled=false", "device=cpu",
                                                        "progress=false", f"output_dir={tmp_path / 'eval'}"]))
    assert again["num_examples"] == 18 and again["test"]["clean"]["acc"] == resumed["test"]["clean"]["acc"]


def test_the_pictures_name_the_folders_classes(tmp_path, image_folder, monkeypatch):
    train(compose_config("train", tiny_overrides(tmp_path / "run", "dataset=folder", f"dataset.path={image_folder}",
                                                 "dataset.image_size=8", "batch_size=8", "data.val_size=3",
                                                 "evaluation.sanity.enabled=false")))
    titles = []
    original = viz._show
    monkeypatch.setattr(viz, "_show", lambda ax, image, title="", **style: (titles.append(title),
                                                                            original(ax, image, title, **style)))
    visualize_checkpoints(compose_config("viz", [f"ckpt={tmp_path / 'run' / 'checkpoint.pt'}", "device=cpu",
                                                 "num_images=4", "loss_examples=8", "pgd_steps=2", "restarts=1",
                                                 f"output_dir={tmp_path / 'viz'}"]))
    assert any(title.startswith("true cat, said ") for title in titles), titles[:6]


def test_a_folder_whose_classes_or_images_changed_is_not_scored_or_resumed_as_before(tmp_path, image_folder):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, "dataset=folder", f"dataset.path={image_folder}", "dataset.image_size=8",
                               "batch_size=8", "data.val_size=3", "evaluation.sanity.enabled=false")
    train(compose_config("train", overrides))
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(image_folder / "train" / "cat" / "white.png")
    with pytest.raises(CheckpointError, match="other mean"):
        train(compose_config("train", [*overrides, "epochs=2"]))
    (image_folder / "test" / "eel").rename(image_folder / "test" / "emu")
    (image_folder / "train" / "eel").rename(image_folder / "train" / "emu")
    with pytest.raises(CheckpointError, match="trained on the classes"):
        evaluate_checkpoint(compose_config("eval", [f"ckpt={run / 'checkpoint.pt'}", "evaluation=fast", "device=cpu",
                                                    "progress=false", f"output_dir={tmp_path / 'eval'}"]))
