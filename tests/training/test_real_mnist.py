"""One real-data run: PGD training on a few thousand MNIST images buys robustness that standard training lacks."""

from __future__ import annotations

import pytest

from advcli.training.train import train
from conftest import compose_config


@pytest.mark.slow
def test_pgd_training_on_mnist_beats_standard_training_under_pgd(tmp_path, real_data_root):
    def run(attack: str) -> dict:
        return train(compose_config("train", [
            f"attack={attack}", "model=small_cnn", "dataset=mnist", f"data.root={real_data_root}", "data.download=false",
            "eps=0.1", "epochs=1", "data.train_size=8000", "data.val_size=200", "batch_size=128", "lr=3e-3", "lr_schedule=constant", "ema.decay=null", "evaluation=fast", "evaluation.num_examples=500", "device=cpu",
            "evaluation.sanity.enabled=false",
            "progress=false", f"output_dir={tmp_path / attack}"]))

    standard, robust = run("none"), run("pgd")
    print(f"\nMNIST, 8,000 training images, 1 epoch, eps=0.1, first 500 test images:\n"
          f"  attack=none: clean {standard['test']['clean']['acc']:.3f}  PGD-20 {standard['test']['pgd']['acc']:.3f}\n"
          f"  attack=pgd:  clean {robust['test']['clean']['acc']:.3f}  PGD-20 {robust['test']['pgd']['acc']:.3f}")
    assert standard["test"]["clean"]["acc"] > 0.85 and robust["test"]["clean"]["acc"] > 0.85
    assert robust["test"]["pgd"]["acc"] > standard["test"]["pgd"]["acc"] + 0.08
    assert robust["test"]["pgd"]["acc"] <= robust["test"]["fgsm"]["acc"] + 0.02  # PGD is the stronger attack
