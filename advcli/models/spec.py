"""A model as plain data: the spec a checkpoint records (`model_spec`), and the model built back from it.

A spec names an architecture of advcli's registry (``name``, ``options``) or a class of one's own (``target``,
``arguments``), with the data's shape and statistics; `build_from_spec` makes the untrained model,
`rebuild_model` the trained one of a loaded checkpoint payload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from advcli import models
from advcli.data.sets import DatasetInfo
from advcli.errors import CheckpointError


def model_spec(name: str, options: dict[str, Any], info: DatasetInfo, *,
               normalize: tuple[Sequence[float], Sequence[float]] | None = None, adversarial_class: bool = False,
               target: str | None = None, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `build_model` needs, as plain data: the model ``name`` and ``options`` on the dataset ``info``
    (its input shape, K = ``num_classes`` and class names, where it has them).

    ``normalize``: the (mean, std) the model's Normalize layer uses; None: the dataset's. With
    ``adversarial_class`` the model has K + 1 outputs, the last meaning "adversarial input". A model of one's
    own: ``target``, its class's import path, and ``arguments``, the keyword arguments it is called with
    (`advcli.models.custom`). The spec records no dataset name, as it always has: checkpoints stay the same."""
    mean, std = normalize if normalize is not None else (info.mean, info.std)
    return {"name": name, "options": dict(options), "in_channels": info.in_channels, "image_size": info.image_size,
            "num_classes": info.num_classes, "mean": list(mean), "std": list(std),
            "adversarial_class": adversarial_class,
            **({"classes": list(info.classes)} if info.classes else {}),
            **({"target": target, "arguments": dict(arguments or {})} if target else {})}


def architecture(spec: dict[str, Any]) -> str:
    """What a spec builds: its class's import path for a model of one's own, else its registry name."""
    return spec.get("target") or spec["name"]


def num_outputs(spec: dict[str, Any]) -> int:
    """How many logits the model of ``spec`` returns: K, or K + 1 with an "adversarial input" output."""
    return spec["num_classes"] + int(bool(spec.get("adversarial_class")))


def build_from_spec(spec: dict[str, Any], where: str | Path | None = None) -> nn.Module:
    """Build an untrained model from a model spec: by name from advcli's registry, or a model of one's own by
    importing its class (``where``: the checkpoint that recorded it, None for one from the command line)."""
    if spec.get("target"):
        return models.build_custom_model(spec["target"], spec["arguments"], in_channels=spec["in_channels"],
                                         image_size=spec["image_size"], num_outputs=num_outputs(spec),
                                         mean=spec["mean"], std=spec["std"],
                                         where=None if where is None else str(where))
    return models.build_model(spec["name"], in_channels=spec["in_channels"], image_size=spec["image_size"],
                              num_classes=num_outputs(spec), mean=spec["mean"], std=spec["std"],
                              **spec.get("options", {}))


def rebuild_model(payload: dict[str, Any], path: str | Path = "checkpoint", *, recorded: bool = True) -> nn.Module:
    """The trained model of a loaded checkpoint, on the CPU, in eval mode. ``recorded``: the payload was read from
    the file ``path`` (False: made in this process from a weights file and the command line's model)."""
    spec = payload.get("model_spec")
    if not isinstance(spec, dict) or "model" not in payload:
        raise CheckpointError(f"Checkpoint {path} has no model in it; it was not written by `advcli train`.")
    model = build_from_spec(spec, where=path if recorded else None)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"Checkpoint {path} does not fit the model it names ({architecture(spec)}, {num_outputs(spec)} outputs, "
            f"{spec['in_channels']}x{spec['image_size']}x{spec['image_size']} inputs): {detail}"
        ) from None
    return model.eval()
