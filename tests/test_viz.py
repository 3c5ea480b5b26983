"""advcli viz and training_curves.png: the pictures exist, are PNGs of the size their grid implies, and the
arrays behind them have the expected shapes; on real MNIST a PGD-trained model's saliency follows the digit
more closely than a standard model's."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from advcli import data, viz
from advcli.checkpoint import load, rebuild_model
from advcli.train import train
from conftest import compose_config, tiny_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """A standard and a PGD-trained small CNN on the synthetic set (4 classes, 1x12x12): their run folders."""
    folders = {}
    for attack in ("none", "pgd"):
        folder = tmp_path_factory.mktemp(attack)
        train(compose_config("train", tiny_overrides(folder, f"attack={attack}", "model=small_cnn", "epochs=2",
                                                     "evaluation.sanity.enabled=false")))
        folders[attack] = folder
    return folders


def test_training_writes_training_curves_png(synthetic_runs):
    assert png_size(synthetic_runs["pgd"] / "training_curves.png") == (900, 360)


def test_viz_writes_four_pictures_of_the_expected_sizes(synthetic_runs, tmp_path):
    cfg = compose_config("viz", [f"ckpt={synthetic_runs['pgd'] / 'checkpoint.pt'}",
                                 f"compare={synthetic_runs['none'] / 'checkpoint.pt'}", "num_images=5",
                                 "loss_examples=64", "pgd_steps=5", "restarts=2", "device=cpu", f"output_dir={tmp_path}"])
    summary = viz.visualize_checkpoints(cfg)
    assert png_size(tmp_path / "gallery.png") == viz.picture_size(rows=8, cols=5)  # 4 rows per checkpoint
    assert png_size(tmp_path / "saliency.png") == viz.picture_size(rows=3, cols=5)  # images + 2 rows of maps
    assert png_size(tmp_path / "large_eps.png") == viz.picture_size(rows=2, cols=5)  # start + 4 classes
    assert png_size(tmp_path / "loss_distribution.png") == (600, 400)
    assert set(summary["saliency_correlation"]) == {"pgd-trained", "none-trained"}
    assert all(-1 <= r <= 1 for r in summary["saliency_correlation"].values())


def test_draw_pictures_returns_arrays_of_the_expected_shapes(synthetic_runs, tmp_path):
    payload = load(synthetic_runs["pgd"] / "checkpoint.pt")
    model = rebuild_model(payload).eval()
    images = data.load_split("synthetic", "test", root=".").subset(slice(0, 40))
    arrays = viz.draw_pictures({"pgd": model}, images, eps=0.1, norm="linf", out=tmp_path, num_images=6,
                               loss_examples=40, pgd_steps=5, restarts=2, large_eps_steps=10)
    gallery = arrays["gallery"]["pgd"]
    for key in ("clean", "fgsm", "pgd", "perturbation"):
        assert gallery[key].shape == (6, 1, 12, 12), key
    assert ((gallery["pgd"] - gallery["clean"]).abs().amax() <= 0.1 + 1e-6)
    assert gallery["perturbation"].min() >= 0 and gallery["perturbation"].max() <= 1
    assert arrays["saliency"]["pgd"]["maps"].shape == (6, 12, 12)
    assert arrays["saliency"]["pgd"]["correlation"].shape == (6,)
    assert arrays["loss_distribution"]["pgd"]["losses"].shape == (40,)
    moved = arrays["large_eps"]["pgd"]["images"]
    assert moved.shape == (4, 1, 12, 12)  # one image per class
    radius = viz.default_large_eps(moved[0].shape)
    assert ((moved - images.images[0].float().div(255)).flatten(1).norm(dim=1) <= radius + 1e-4).all()


def test_targeted_pgd_moves_towards_the_target(robust_mlp):
    model, x, y = robust_mlp
    target = (y + 1) % 4
    from advcli import attacks

    x_adv = attacks.pgd(model, x, target, 1.0, norm="l2", steps=30, targeted=True)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).float().mean() > (model(x).argmax(1) == target).float().mean() + 0.3
    with pytest.raises(ValueError, match="targeted"):
        attacks.pgd(model, x, target, 0.1, targeted=True, early_stop=True)


def test_viz_refuses_checkpoints_of_different_datasets(synthetic_runs, tmp_path):
    other = tmp_path / "other"
    train(compose_config("train", tiny_overrides(other, "dataset.image_size=8", "evaluation.sanity.enabled=false")))
    cfg = compose_config("viz", [f"ckpt={synthetic_runs['pgd'] / 'checkpoint.pt'}", f"compare={other / 'checkpoint.pt'}",
                                 "device=cpu", f"output_dir={tmp_path / 'out'}"])
    from advcli.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="same dataset"):
        viz.visualize_checkpoints(cfg)


@pytest.mark.slow
def test_pgd_trained_saliency_follows_the_digit_more_than_standard(tmp_path, real_data_root):
    """Tsipras et al. 2019: robust models' input gradients look like the digit. Measured on 300 test images."""
    models = {}
    for attack in ("none", "pgd"):
        metrics = train(compose_config("train", [
            f"attack={attack}", "model=small_cnn", "dataset=mnist", f"data.root={real_data_root}",
            "data.download=false", "eps=0.2", "epochs=2", "data.train_size=8000", "evaluation.num_examples=300",
            "evaluation.sanity.enabled=false", "device=cpu", "progress=false", f"output_dir={tmp_path / attack}"]))
        models[attack] = rebuild_model(load(metrics["checkpoint"])).eval()
    test = data.load_split("mnist", "test", root=real_data_root, download=False).subset(slice(0, 300))
    x, y = next(data.batches(test, 300))
    correlation = {name: viz.image_correlation(viz.saliency(model, x, y), x).mean().item()
                   for name, model in models.items()}
    print(f"\nmean corr(|saliency|, image) on 300 MNIST test images: standard {correlation['none']:.3f}, "
          f"PGD-trained {correlation['pgd']:.3f}")
    assert correlation["pgd"] > correlation["none"] + 0.05
