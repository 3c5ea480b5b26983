"""The models wing: architectures and their registry (names -> models, each built behind ``Normalize``), the
spec a checkpoint records (`spec`), classes of one's own (`custom`, `timm_net`), foreign weights (`weights`),
RobustBench's zoo (`zoo`) and where a run's model comes from (`sources`). Imports the shared top level,
`advcli.runs` (checkpoint files) and `advcli.data` (a dataset's shape); never attacks, evaluation or training.

``build_model`` is the one place a model is made from plain values (the
config stays in ``train``/``evaluate``). Every model it returns takes pixels in
[0, 1] and returns logits::

    nn.Sequential(normalize=Normalize(mean, std), net=<architecture>)

A class advcli does not ship (``model._target_``) is built the same way by
``build_custom_model`` (`advcli.models.custom`). ``uses_batchnorm`` and
``is_convolutional`` let callers decide train/eval handling and
``channels_last`` from the built module, without knowing the architecture.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Sequence

from torch import nn

from advcli.errors import ModelError
from advcli.models.cnn import MadryCNN
from advcli.models.custom import build_custom_model
from advcli.models.mlp import MLP
from advcli.models.normalize import Normalize
from advcli.models.preact_resnet import PreActResNet18
from advcli.models.resnet18 import ResNet18
from advcli.models.small_cnn import SmallCNN
from advcli.models.wide_resnet import WideResNet
from advcli.models.zoo import ZooNet

__all__ = [
    "EXTERNAL_MODELS",
    "MODELS",
    "MLP",
    "MadryCNN",
    "ModelError",
    "Normalize",
    "PreActResNet18",
    "ResNet18",
    "SmallCNN",
    "WideResNet",
    "build_custom_model",
    "build_model",
    "is_convolutional",
    "uses_batchnorm",
]

MODELS: dict[str, type] = {
    "mlp": MLP,
    "cnn": MadryCNN,
    "small_cnn": SmallCNN,
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
    "wide_resnet": WideResNet,
}
# architectures defined by other packages, built through advcli's registry all the same
EXTERNAL_MODELS: dict[str, type] = {
    "robustbench": ZooNet,  # an architecture of RobustBench's zoo (advcli.models.zoo; needs the robustbench extra)
}

# given by build_model itself, never through **kwargs
_SHAPE_ARGS = ("in_channels", "image_size", "num_classes")

# public batch-norm classes; the lazy variants are not used by advcli models
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _options(cls: type) -> list[str]:
    """Names of the architecture-specific keyword arguments of ``cls``."""
    params = inspect.signature(cls.__init__).parameters
    return sorted(
        name
        for name, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self" and name not in _SHAPE_ARGS
    )


def build_model(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` behind a ``Normalize(mean, std)`` layer.

    Arguments:
        name (str): a key of ``MODELS``: ``cnn``, ``small_cnn``, ``mlp``, ``preact_resnet18``,
            ``resnet18`` or ``wide_resnet``.
        in_channels (int): image channels C; ``mean`` and ``std`` need C values.
        image_size (int): image height and width H = W.
        num_classes (int): number of outputs K (K + 1 for an extra "adversarial" class).
        mean (Sequence[float]): per-channel data mean, in [0, 1] pixel units.
        std (Sequence[float]): per-channel data std.
        **kwargs: architecture options, e.g. ``hidden`` for ``mlp``, ``width``
            for ``cnn``, ``depth`` and ``widen_factor`` for ``wide_resnet``.

    Returns:
        ``nn.Sequential`` with children ``normalize`` and ``net``; input
        ``(N, C, H, W)`` pixels in [0, 1], output ``(N, K)`` logits.

    Raises:
        ModelError: unknown ``name``, an option the architecture does not take,
            an option value it refuses (e.g. a ``wide_resnet`` depth not 6n + 4),
            or ``mean``/``std`` not matching ``in_channels``.

    Examples::
        >>> model = build_model("cnn", in_channels=1, image_size=28, num_classes=10,
        ...                     mean=(0.1307,), std=(0.3081,))
        >>> model(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """
    cls = MODELS.get(name) or EXTERNAL_MODELS.get(name)
    if cls is None:
        raise ModelError(
            f"Unknown model {name!r}. Valid models are: {', '.join(sorted([*MODELS, *EXTERNAL_MODELS]))}. "
            f"Choose one with `model=NAME` on the command line, e.g. `advcli train model=cnn`."
        )
    accepted = _options(cls)
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise ModelError(
            f"Model {name!r} does not accept the option(s) {', '.join(bad)}. "
            f"Options it accepts: {', '.join(accepted) if accepted else '(none)'}."
        )
    if len(mean) != in_channels or len(std) != in_channels:
        raise ModelError(
            f"Model {name!r} has in_channels={in_channels} but got {len(mean)} mean and "
            f"{len(std)} std value(s); give one mean and one std per channel."
        )
    net = cls(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kwargs)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def uses_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a batch-norm layer, whose output depends on
    train or eval mode and on the other examples in the batch."""
    return any(isinstance(m, _BATCHNORM_TYPES) for m in model.modules())


def is_convolutional(model: nn.Module) -> bool:
    """True if ``model`` has an ``nn.Conv2d``, i.e. ``channels_last`` can pay off."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


# The spec a checkpoint records and the model built back from it (after the registry: spec.py calls build_model).
from advcli.models.spec import architecture, build_from_spec, model_spec, num_outputs, rebuild_model  # noqa: E402,F401
