"""Your own images: dataset=folder (torchvision's ImageFolder layout) trains, resumes and evaluates, with its
training split's mean and std computed once and cached beside the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from advcli.data import dataset_info, folder, load_split
from advcli.errors import CheckpointError, DataError
from advcli.evaluation import viz
from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.evaluation.viz import visualize_checkpoints
from advcli.runs import checkpoint
from advcli.training.train import train
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
    monkeypatch.setattr(folder, "_read_split", lambda *a, **k: pytest.fail("statistics computed again"))
    assert dataset_info("folder", path=str(image_folder), image_size=8) == first
    monkeypatch.undo()
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(image_folder / "train" / "cat" / "white.png")
    assert dataset_info("folder", path=str(image_folder), image_size=8).mean > first.mean


def test_splits_are_uint8_at_the_asked_size_in_a_seeded_shuffle_of_imagefolder_order(image_folder):
    def split(name, seed):
        return load_split("folder", name, root=None, path=str(image_folder), image_size=8, channels=1,
                          shuffle_seed=seed)

    in_order = split("test", None)  # ImageFolder's own order: class, then file name
    assert in_order.images.dtype == torch.uint8 and in_order.images.shape == (18, 1, 8, 8)
    assert in_order.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    shuffled = split("test", 0)
    assert torch.equal(shuffled.images, split("test", 0).images)  # the same seed: the same order, every time
    assert not torch.equal(shuffled.labels, split("test", 1).labels)
    assert sorted(shuffled.labels.tolist()) == in_order.labels.tolist()  # the same images, reordered
    assert load_split("folder", "test", root=None, path=str(image_folder), image_size=8).labels.tolist() == \
        shuffled.labels.tolist()  # shuffle_seed=0 is the default


def test_held_out_training_subset_and_evaluated_test_images_span_the_classes(tmp_path, image_folder):
    from advcli.training import train as train_module

    cfg = compose_config("train", tiny_overrides(tmp_path, "dataset=folder", f"dataset.path={image_folder}",
                                                 "dataset.image_size=8", "data.val_size=3", "data.train_size=6",
                                                 "evaluation.num_examples=6"))
    train_set, val_set, test_set = train_module.load_data(cfg, train_module.check_settings(cfg), torch.device("cpu"))
    for name, images in (("held-out", val_set), ("train_size", train_set), ("first test", test_set)):
        assert len(set(images.labels.tolist())) >= 2, f"the {name} images are of one class: {images.labels.tolist()}"


def test_a_folder_run_says_which_test_images_it_evaluated_and_resumes_exactly(tmp_path, image_folder):
    overrides = ["dataset=folder", f"dataset.path={image_folder}", "dataset.image_size=8", "model=small_cnn",
                 "batch_size=8", "data.val_size=3", "evaluation.num_examples=9", "evaluation.sanity.enabled=false"]
    straight = train(compose_config("train", tiny_overrides(tmp_path / "straight", *overrides, "epochs=2")))
    assert straight["num_test"] == 9 and "first 9" in straight["examples"]
    assert "dataset.shuffle_seed=0" in straight["examples"]
    train(compose_config("train", tiny_overrides(tmp_path / "resumed", *overrides, "epochs=1")))
    resumed = train(compose_config("train", tiny_overrides(tmp_path / "resumed", *overrides, "epochs=2")))
    assert resumed["history"] == [{**entry, "time_s": again["time_s"]}
                                  for entry, again in zip(straight["history"], resumed["history"])]
    assert resumed["test"] == straight["test"] and resumed["examples"] == straight["examples"]


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
    named = [title for title in titles if title.startswith("true ")]
    assert named and all(title.split(",")[0][len("true "):] in CLASSES for title in named), titles[:6]


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


def test_a_folder_run_of_an_advcli_before_the_shuffle_resumes_only_in_imagefolder_order(tmp_path, image_folder):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, "dataset=folder", f"dataset.path={image_folder}", "dataset.image_size=8",
                               "batch_size=8", "data.val_size=3", "evaluation.sanity.enabled=false")
    train(compose_config("train", [*overrides, "dataset.shuffle_seed=null"]))
    older = checkpoint.load(run / "checkpoint.pt")  # as an advcli without dataset.shuffle_seed wrote it
    del older["fingerprint"]["dataset.shuffle_seed"]
    checkpoint.save(run / "checkpoint.pt", {k: v for k, v in older.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match="dataset.shuffle_seed: None -> 0"):
        train(compose_config("train", [*overrides, "epochs=2"]))
    resumed = train(compose_config("train", [*overrides, "epochs=2", "dataset.shuffle_seed=null"]))
    assert resumed["epochs_trained"] == 2 and "ImageFolder's order" in resumed["examples"]
    with pytest.raises(DataError, match="dataset.shuffle_seed=-1"):
        dataset_info("folder", path=str(image_folder), shuffle_seed=-1)
