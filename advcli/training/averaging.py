"""An exponential moving average (EMA) of the weights, the model that is validated, evaluated and saved when
``ema.decay`` is set: averaging the last few hundred steps' weights smooths out the noise of adversarial
training's steps, a standard ingredient of the strongest published robust models (Gowal et al. 2020,
"Uncovering the limits of adversarial training against norm-bounded adversarial examples").

torch's `AveragedModel` keeps the copy and the count; the update here is EMA with the usual warm-up
(TensorFlow's ``num_updates``): the decay after n updates is min(decay, (1 + n) / (10 + n)), so that the
first steps' weights, far from any trained model, do not linger in the average of a short run.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, updates: int | torch.Tensor) -> float | torch.Tensor:
    """The decay of update number ``updates + 1`` (``updates`` already averaged in); on the device's counter
    tensor it stays a tensor, so the training step never waits for the host."""
    warmup = (1 + updates) / (10 + updates)
    return torch.clamp(warmup, max=decay) if torch.is_tensor(warmup) else min(decay, warmup)


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of ``model`` whose parameters and buffers (BatchNorm statistics too) follow the EMA of
    ``model``'s with `AveragedModel.update_parameters(model)` after each optimiser step."""
    if not 0 < decay < 1:
        raise ValueError(f"the EMA decay must lie in (0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        # AveragedModel passes one dtype at a time: counters (BatchNorm's num_batches_tracked) are copied
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        weight = 1 - ema_decay(decay, updates)
        torch._foreach_lerp_(averaged, current, weight.to(averaged[0].dtype))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
