"""The benchmark datasets and models as a run gets them: `dataset=cifar100|svhn` and
`model=wrn28_10|wrn34_10|resnet18` composed through Hydra, the dataset read through `config.dataset_choice`
and `data.load_split` from tiny stand-ins in torchvision's formats (conftest's cifar100_root and svhn_root),
and the model built from the composed options. CPU only, no real data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from advcli import config, data, models
from advcli.models import sources, uses_batchnorm
from conftest import compose_config

# model config -> (registry name, options, parameters for 10 classes of 3x32x32)
MODEL_CONFIGS = {
    "wrn28_10": ("wide_resnet", {"depth": 28, "widen_factor": 10, "dropout": 0.0}, 36_479_194),
    "wrn34_10": ("wide_resnet", {"depth": 34, "widen_factor": 10, "dropout": 0.0}, 46_160_474),
    "resnet18": ("resnet18", {}, 11_173_962),
}
# dataset config -> (stand-in fixture, classes, crop_padding, flip)
DATASET_CONFIGS = {"cifar100": ("cifar100_root", 100, 4, True), "svhn": ("svhn_root", 10, 0, False)}


def model_from(cfg, info: data.DatasetInfo) -> torch.nn.Module:
    """The model `advcli train` builds for this config and dataset (through a checkpoint's model spec)."""
    return models.build_from_spec(sources.spec_from_config(cfg.model, info))


@pytest.mark.parametrize("choice", sorted(MODEL_CONFIGS))
def test_model_config_composes_to_the_registered_model(choice: str) -> None:
    name, options, count = MODEL_CONFIGS[choice]
    cfg = compose_config("train", [f"model={choice}", "dataset=cifar10"])
    assert OmegaConf.to_container(cfg.model) == {"name": name, **options, "normalize": "dataset"}
    model = model_from(cfg, data.dataset_info("cifar10"))  # no forward: building WRN-34-10 takes ~0.4 s
    assert sum(p.numel() for p in model.parameters()) == count
    assert uses_batchnorm(model)


@pytest.mark.parametrize("choice", sorted(DATASET_CONFIGS))
def test_dataset_config_loads_the_standin_end_to_end(choice: str, request) -> None:
    fixture, num_classes, crop_padding, flip = DATASET_CONFIGS[choice]
    root, written = request.getfixturevalue(fixture)
    cfg = compose_config("train", [f"dataset={choice}", f"data.root={root}"])
    dataset = config.dataset_choice(cfg.dataset)
    assert (dataset.name, dataset.options, dataset.crop_padding, dataset.flip) == (choice, {}, crop_padding, flip)
    info = data.dataset_info(dataset.name, **dataset.options)
    assert (info.num_classes, info.in_channels, info.image_size) == (num_classes, 3, 32)
    for split, (_, labels) in written.items():
        split_set = data.load_split(dataset.name, split, root=config.data_root(cfg.data.root), download=False,
                                    **dataset.options)
        assert split_set.images.shape == (len(labels), 3, 32, 32) and split_set.labels.tolist() == labels
        # one augmented pass, as training batches it
        x, y = next(data.batches(split_set, len(labels), shuffle=True, generator=torch.Generator().manual_seed(0),
                                 crop_padding=dataset.crop_padding, flip=dataset.flip))
        assert x.shape == (len(labels), 3, 32, 32) and 0 <= x.min() and x.max() <= 1
        assert sorted(y.tolist()) == sorted(labels)


@pytest.mark.parametrize("dataset, model", [("cifar100", "resnet18"), ("svhn", "wrn28_10")])
def test_a_benchmark_model_classifies_and_differentiates_a_standin_batch(dataset: str, model: str, request) -> None:
    # the full-size models, once each: WRN-28-10 on two 32x32 images costs well under a second on one CPU core
    root, _ = request.getfixturevalue(DATASET_CONFIGS[dataset][0])
    cfg = compose_config("train", [f"dataset={dataset}", f"model={model}", f"data.root={root}"])
    choice = config.dataset_choice(cfg.dataset)
    info = data.dataset_info(choice.name, **choice.options)
    test_set = data.load_split(choice.name, "test", root=config.data_root(cfg.data.root), download=False,
                               **choice.options)
    x, y = next(data.batches(test_set, 2))
    torch.manual_seed(0)
    net = model_from(cfg, info).eval()
    x.requires_grad_(True)
    logits = net(x)
    assert logits.shape == (2, info.num_classes) and torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x)
    assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()
