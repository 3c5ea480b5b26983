"""The training recipes (bench/time_to_robust.py): `advcli train`'s defaults and experiment=fast|strong are what
their config comments and the README say they are, and a run records what it trained with."""

from __future__ import annotations

import pytest

from advcli import config
from advcli.training.train import train
from conftest import compose_config, tiny_overrides


def recipe(cfg) -> dict:
    """What defines a recipe, read from a composed config."""
    return {"model": config.plain(cfg.model), "attack": config.choice_name(cfg.attack, "attack"),
            "steps": cfg.attack.steps, "alpha": cfg.attack.alpha, "random_start": cfg.attack.random_start,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
            "eps_warmup": cfg.eps_warmup, "ema": cfg.ema.decay, "test_examples": cfg.evaluation.num_examples,
            "evaluation": cfg.evaluation.name}


@pytest.mark.parametrize("overrides,expected", [
    ([], {"model": {"name": "small_cnn", "width": 2, "hidden": 200, "normalize": "dataset"}, "attack": "pgd", "steps": 5, "alpha": None,
          "random_start": True, "epochs": 7, "batch_size": 256, "lr": 2e-3, "lr_schedule": "onecycle",
          "eps_warmup": 1, "ema": 0.995, "test_examples": 1000, "evaluation": "default"}),
    (["experiment=fast"], {"model": {"name": "small_cnn", "width": 1, "hidden": 100, "normalize": "dataset"}, "attack": "pgd", "steps": 3,
                           "alpha": None, "random_start": True, "epochs": 3, "batch_size": 256, "lr": 2e-3,
                           "lr_schedule": "constant", "eps_warmup": 1, "ema": 0.99, "test_examples": 1000,
                           "evaluation": "default"}),
    (["experiment=strong"], {"model": {"name": "cnn", "width": 1, "normalize": "dataset"}, "attack": "pgd", "steps": 10, "alpha": None,
                             "random_start": True, "epochs": 9, "batch_size": 128, "lr": 2e-3,
                             "lr_schedule": "onecycle", "eps_warmup": 1, "ema": 0.995, "test_examples": 1000,
                             "evaluation": "default"}),
], ids=["default", "fast", "strong"])
def test_each_recipe_is_the_documented_one(overrides, expected):
    cfg = compose_config("train", overrides)
    assert recipe(cfg) == expected
    assert cfg.dataset.name == "mnist" and cfg.eps == 0.3 and cfg.norm == "linf"


def test_a_preset_run_records_the_settings_it_trained_with(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "experiment=fast", "model=mlp", "epochs=1",
                                                           "batch_size=64")))
    assert metrics["attack"] == "pgd" and metrics["attack_settings"]["steps"] == 3 and metrics["ema_decay"] == 0.99


def test_the_default_run_evaluates_the_first_thousand_test_images_and_eval_the_whole_set():
    assert compose_config("train", []).evaluation.num_examples == 1000
    assert compose_config("eval", ["ckpt=unused"]).evaluation.num_examples is None
