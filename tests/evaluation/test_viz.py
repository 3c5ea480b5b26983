"""advcli viz and training_curves.png: the pictures exist as PNGs, the arrays behind them show each
checkpoint's images, predictions, saliency, PGD losses and large-eps images moved towards each class; on real
MNIST a PGD-trained model's saliency follows the digit more closely than a standard model's."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from advcli import data
from advcli.evaluation import viz
from advcli.models import rebuild_model
from advcli.runs.checkpoint import load
from advcli.training.train import train
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
    history = json.loads((synthetic_runs["pgd"] / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [1, 2]  # what the curves show: every epoch, every curve
    assert all({"train_acc", "val_clean_acc", "val_robust_acc", "train_loss"} <= set(entry) for entry in history)


def test_viz_draws_both_checkpoints_in_four_pictures(synthetic_runs, tmp_path, monkeypatch):
    draw_pictures, drawn = viz.draw_pictures, {}

    def keep_arrays(*args, **kwargs):  # the arrays behind the pictures the command draws
        drawn.update(draw_pictures(*args, **kwargs))
        return drawn

    monkeypatch.setattr(viz, "draw_pictures", keep_arrays)
    cfg = compose_config("viz", [f"ckpt={synthetic_runs['pgd'] / 'checkpoint.pt'}",
                                 f"compare={synthetic_runs['none'] / 'checkpoint.pt'}", "num_images=5",
                                 "loss_examples=64", "pgd_steps=5", "restarts=2", "device=cpu", f"output_dir={tmp_path}"])
    summary = viz.visualize_checkpoints(cfg)
    for stem in ("gallery", "saliency", "loss_distribution", "large_eps"):
        png_size(tmp_path / f"{stem}.png")  # fails unless a PNG
    assert set(summary["saliency_correlation"]) == {"pgd-trained", "none-trained"}
    assert all(-1 <= r <= 1 for r in summary["saliency_correlation"].values())
    models = {"pgd-trained": synthetic_runs["pgd"], "none-trained": synthetic_runs["none"]}
    for picture in drawn.values():
        assert set(picture) == set(models)  # one row (or histogram) per checkpoint
    for label, folder in models.items():
        gallery = drawn["gallery"][label]
        for key in ("clean", "fgsm", "pgd", "perturbation"):  # 5 images, 4 rows per checkpoint
            assert gallery[key].shape == (5, 1, 12, 12), key
        for key in ("pred_clean", "pred_fgsm", "pred_pgd"):
            assert gallery[key].shape == (5,) and 0 <= gallery[key].min() and gallery[key].max() < 4, key
        correlation = drawn["saliency"][label]["correlation"]
        assert drawn["saliency"][label]["maps"].shape == (5, 12, 12)
        assert ((-1 <= correlation) & (correlation <= 1)).all()
        assert summary["saliency_correlation"][label] == pytest.approx(correlation.mean().item())
        losses = drawn["loss_distribution"][label]["losses"]
        assert losses.shape == (64,) and (losses >= 0).all()
        assert summary["median_pgd_loss"][label] == pytest.approx(losses.median().item())
        # large eps: each image moves from the first gallery image towards its class
        moved, reached = drawn["large_eps"][label]["images"], drawn["large_eps"][label]["target_probability"]
        assert moved.shape == (4, 1, 12, 12)
        model = rebuild_model(load(folder / "checkpoint.pt")).eval()
        with torch.no_grad():
            at_start = model(gallery["clean"][:1]).softmax(1)[0]
            assert torch.allclose(reached, model(moved).softmax(1).diagonal())
        assert (reached > at_start).all(), (at_start, reached)  # every target more likely than at the start


def test_draw_pictures_returns_arrays_of_the_expected_shapes(synthetic_runs, tmp_path):
    payload = load(synthetic_runs["pgd"] / "checkpoint.pt")
    model = rebuild_model(payload).eval()
    images = data.load_split("synthetic", "test", root=".").subset(slice(0, 40))
    settings = viz.Settings(num_images=6, loss_examples=40, pgd_steps=5, restarts=2, large_eps_steps=10)
    arrays = viz.draw_pictures({"pgd": model}, images, eps=0.1, norm="linf", out=tmp_path, settings=settings)
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
    from advcli.runs.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="same dataset"):
        viz.visualize_checkpoints(cfg)


@pytest.mark.slow
def test_pgd_trained_saliency_follows_the_digit_more_than_standard(tmp_path, real_data_root):
    """Tsipras et al. 2019: robust models' input gradients look like the digit. Measured on 300 test images."""
    models = {}
    for attack in ("none", "pgd"):
        metrics = train(compose_config("train", [
            f"attack={attack}", "model=small_cnn", "dataset=mnist", f"data.root={real_data_root}",
            "data.download=false", "eps=0.2", "epochs=2", "data.train_size=8000", "data.val_size=100", "batch_size=128", "lr=1e-3", "lr_schedule=constant", "ema.decay=null",
            "evaluation=fast", "evaluation.num_examples=300",
            "evaluation.sanity.enabled=false", "device=cpu", "progress=false", f"output_dir={tmp_path / attack}"]))
        models[attack] = rebuild_model(load(metrics["checkpoint"])).eval()
    test = data.load_split("mnist", "test", root=real_data_root, download=False).subset(slice(0, 300))
    x, y = next(data.batches(test, 300))
    correlation = {name: viz.image_correlation(viz.saliency(model, x, y), x).mean().item()
                   for name, model in models.items()}
    print(f"\nmean corr(|saliency|, image) on 300 MNIST test images: standard {correlation['none']:.3f}, "
          f"PGD-trained {correlation['pgd']:.3f}")
    assert correlation["pgd"] > correlation["none"] + 0.05
