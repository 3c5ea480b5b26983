"""RobustBench's model zoo, through the ``robustbench`` package (an optional extra: ``advcli[robustbench]``).

`load_zoo_model` is ``robustbench.utils.load_model``: on a machine with internet it downloads the weights into
``model_dir`` (RobustBench's own default: ``./models``); offline it reads ``model_dir/DATASET/THREAT/NAME.pt``
and, when the file is not there, says where it looked. `ZooNet` makes a zoo architecture an advcli model
(registry name ``robustbench``), so that an imported zoo model is checkpointed, rebuilt, evaluated and
fine-tuned like any other. A zoo model keeps its own preprocessing: it takes [0, 1] pixels, so advcli puts no
normalisation in front of it (``model.normalize=none``).
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from advcli.errors import CheckpointError, ConfigError, MissingExtra

THREAT_MODELS = ("Linf", "L2", "corruptions")
ZOO_DATASETS = ("cifar10", "cifar100", "imagenet")
ZOO_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def _reference_autoattack_as_robustbench_imports_it() -> None:
    """robustbench imports the reference AutoAttack as ``autoattack`` (the name of its git install); from PyPI the
    same code is the ``pyautoattack`` package (advcli's dependency). Name it as robustbench expects, when nothing
    else has that name."""
    if importlib.util.find_spec("autoattack") is not None:
        return
    try:
        import pyautoattack
        import pyautoattack.state
    except ImportError:
        return  # robustbench's own import error will say what is missing
    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)


def require_robustbench():
    """The ``robustbench`` package's ``utils`` module, or a one-paragraph MissingExtra."""
    _reference_autoattack_as_robustbench_imports_it()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its pkg_resources import warns on recent setuptools
            import robustbench.utils
    except ImportError as error:
        raise MissingExtra(
            f"Loading a RobustBench model needs the robustbench package, which cannot be imported here ({error}). "
            "Install it with `pip install 'advcli[robustbench]'` (or `pip install robustbench`) and run again.") from None
    return robustbench.utils


def threat_norm(threat_model: str, norm: str | None) -> str:
    """The norm a zoo model of ``threat_model`` is attacked in; a contradicting ``norm=`` is refused."""
    norms = {"Linf": "linf", "L2": "l2"}
    if threat_model not in norms:
        raise ConfigError(f"threat_model={threat_model}: advcli evaluates adversarial robustness, in the Linf or L2 "
                          "threat model (RobustBench's corruptions models are not attacked with a radius).")
    if norm is not None and norm != norms[threat_model]:
        raise ConfigError(f"norm={norm} contradicts threat_model={threat_model}: a {threat_model} model is evaluated in "
                          f"its own threat model; leave norm out (it follows threat_model) or pass norm={norms[threat_model]}.")
    return norms[threat_model]


def check_zoo_name(name: str, dataset: str, threat_model: str) -> None:
    """Refuse a dataset, threat model or model name that RobustBench's zoo does not have, in one paragraph."""
    if dataset not in ZOO_DATASETS:
        raise ConfigError(f"RobustBench's zoo holds models for {', '.join(ZOO_DATASETS)} only, not {dataset}. To "
                          "fine-tune a zoo model on other data, name its dataset: model.zoo_dataset=cifar10.")
    if threat_model not in THREAT_MODELS:
        raise ConfigError(f"threat_model={threat_model} is not one of RobustBench's: {', '.join(THREAT_MODELS)}.")
    require_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    known = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    if name not in known:
        close = sorted(k for k in known if k.lower()[:5] == name.lower()[:5])[:5]
        raise ConfigError(
            f"robustbench={name}: RobustBench's zoo has no {dataset} {threat_model} model of that name"
            f"{' (similar: ' + ', '.join(close) + ')' if close else ''}. The names are those of the leaderboard at "
            "robustbench.github.io, e.g. robustbench=Wong2020Fast.")


def load_zoo_model(name: str, dataset: str, threat_model: str, model_dir: str | Path) -> nn.Module:
    """The zoo's trained model, in eval mode, on the CPU (RobustBench's own loader)."""
    check_zoo_name(name, dataset, threat_model)
    utils = require_robustbench()
    path = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    if path.is_file():  # robustbench reads it with torch.load's defaults: check first that it is data only
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"robustbench={name}: {path} holds Python objects, not only tensors; advcli loads "
                                  "weights as data only (weights_only=True). Download the zoo's file again.") from None
    try:
        return utils.load_model(model_name=name, model_dir=str(model_dir), dataset=dataset,
                                threat_model=threat_model).eval()
    except (OSError, ValueError, RuntimeError, ConnectionError) as error:
        where = "found it there but could not read it" if path.is_file() else "did not find it there"
        raise CheckpointError(
            f"robustbench={name}: RobustBench looked for the weights in {path} and {where}, and could not download "
            f"them ({type(error).__name__}: {' '.join(str(error).split())[:200]}). On a machine without internet, "
            f"copy {name}.pt to {path} (robustbench_dir=DIR sets the folder; RobustBench's default is ./models).") from None
    except Exception as error:  # gdown and requests raise their own errors when offline
        raise CheckpointError(
            f"robustbench={name}: the weights are not in {path} and downloading them failed "
            f"({type(error).__name__}: {' '.join(str(error).split())[:200]}). Copy {name}.pt to {path}, or set "
            "robustbench_dir=DIR to the folder that holds DATASET/THREAT/NAME.pt.") from None


class ZooNet(nn.Module):
    """A RobustBench zoo architecture (untrained) as an advcli architecture: registry name ``robustbench``.

    Arguments:
        in_channels, image_size, num_classes: the data's (checked against the zoo's dataset where known).
        zoo_name (str): the model's name in the zoo, e.g. ``Wong2020Fast``.
        zoo_dataset (str): the zoo's dataset (cifar10, cifar100, imagenet).
        threat_model (str): Linf, L2 or corruptions.
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, zoo_name: str,
                 zoo_dataset: str = "cifar10", threat_model: str = "Linf") -> None:
        super().__init__()
        check_zoo_name(zoo_name, zoo_dataset, threat_model)
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        self.model = model_dicts[BenchmarkDataset(zoo_dataset)][ThreatModel(threat_model)][zoo_name]["model"]()
        zoo_classes = ZOO_CLASSES[zoo_dataset]
        if last_linear(self.model).out_features != zoo_classes:
            raise ConfigError(f"model.zoo_name={zoo_name}: its last nn.Linear does not make the {zoo_classes} outputs "
                              "of its dataset, so advcli cannot tell which layer is its classifier.")
        if num_classes != zoo_classes:  # fine-tuning on other classes: a new last layer
            replace_head(self.model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def last_linear(net: nn.Module) -> nn.Linear:
    """The classifier's last layer: the last ``nn.Linear`` in module order."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CheckpointError("The model has no nn.Linear layer to serve as its classification head.")
    return linears[-1]


def replace_head(net: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` of ``net`` for a freshly initialised one with ``num_classes`` outputs."""
    old = last_linear(net)
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
                return
