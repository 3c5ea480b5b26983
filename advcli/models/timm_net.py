"""The architectures of the timm library (``pip install 'advcli[timm]'``) as models of one's own:
``model=timm model.name=resnet18`` is ``model._target_=advcli.models.timm_net.timm_model`` (configs/model/timm.yaml).

Weights start random (``pretrained=False``): timm's pretrained weights come from the Hugging Face hub, out of reach
on a machine without internet, and are ImageNet's anyway. A downloaded timm state_dict loads with ``init=FILE``
or ``weights=FILE``: the model is timm's own module, so its keys are timm's names.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from advcli.errors import ConfigError, MissingExtra


def require_timm():
    try:
        import timm
    except ImportError as error:
        raise MissingExtra(f"model=timm needs the timm package, which cannot be imported here ({error}). Install it "
                           "with `pip install 'advcli[timm]'` (or `pip install timm`) and run again.") from None
    return timm


def timm_model(*, in_channels: int, num_classes: int, architecture: str, **options: Any) -> nn.Module:
    """``timm.create_model(architecture, num_classes=, in_chans=, pretrained=False, **options)``; ``options``
    are timm's own (e.g. ``drop_rate``; ``img_size`` for a vision transformer on small images)."""
    timm = require_timm()
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture}*")[:6]
        raise ConfigError(f"model.name={architecture} is not a timm architecture"
                          f"{' (similar: ' + ', '.join(close) + ')' if close else ''}; timm.list_models() lists them, "
                          "e.g. model.name=resnet18.")
    return timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
