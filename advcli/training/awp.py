"""Adversarial weight perturbation (Wu, Xia & Wang 2020, "Adversarial weight perturbation helps robust
generalization"): with ``awp.gamma`` > 0, every trainer takes its optimiser step with the gradient found at
weights pushed up its own loss.

Per step, once the training attack has found its examples (`advcli.training.objectives`), the gradient g_l of the
objective's loss on them with respect to each weight w_l of a convolution or linear layer (weight tensors of more
than one dimension, as the authors' ``AdvWeightPerturb``; biases and BatchNorm are left alone) gives

    v_l = gamma * ||w_l|| * g_l / ||g_l||

(`perturbation`). The objective's gradient is then computed at w + v and the weights are restored exactly
(`perturbed`) before the optimiser steps: the update is computed at the perturbed point and applied to the
unperturbed weights (`advcli.training.epoch.train_step`).

Two differences from the authors' code, neither in what is computed:

- They find the direction by one SGD step (lr 0.01, no momentum) of a copy of the model on the negated loss and
  take the difference of the weights; the per-layer normalisation cancels the learning rate, so that difference
  is g_l's direction. Here the gradient is taken on the model itself, with no copy, and its BatchNorm running
  statistics are put back afterwards (the copy's forward pass never touched the model's).
- They subtract v after the optimiser step; here the weights are restored before it, from a copy, so that the
  restore is exact (w + v - v is not w in floating point) and weight decay acts on w, not on w + v.

Under torchrun the gradients are summed over the ranks first: every rank gets the perturbation of the global
batch, as one process would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from advcli import distributed

EPS = 1e-20  # as the authors' code: a zero gradient gives a zero perturbation, not a division by zero


@dataclass
class Perturbation:
    """What is added to which weights: ``steps[i]`` to ``weights[i]``. Empty: no perturbation."""

    weights: list[nn.Parameter] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)


def perturbable_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights AWP perturbs: those of convolutions and linear layers (named ``weight``, more than one dim)."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() > 1 and name.rsplit(".", 1)[-1] == "weight"]


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """The model's buffers (BatchNorm's running statistics and counts) as they were before, afterwards."""
    saved = [buffer.detach().clone() for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


def perturbation(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], gamma: float) -> Perturbation:
    """v_l = gamma * ||w_l|| * g_l / ||g_l||, g_l the gradient of ``loss_fn(model)`` (a scalar) for each
    perturbable weight; the model's weights and buffers are left as they were.

    A layer whose gradient is not finite (an fp16 overflow, which the GradScaler handles for the main step) gets
    no perturbation in that step; checked on the device, so a step never waits on a sync.
    """
    weights = perturbable_weights(model)
    if gamma <= 0 or not weights:
        return Perturbation()
    with kept_buffers(model):
        grads = torch.autograd.grad(loss_fn(model), weights, allow_unused=True)
    steps = []
    for weight, grad in zip(weights, grads):
        if grad is None:  # a weight this objective's loss does not use
            steps.append(torch.zeros_like(weight))
            continue
        grad = distributed.total(grad.float())  # the direction of the global batch, the same on every rank
        step = grad * (gamma * weight.detach().float().norm() / (grad.norm() + EPS))
        steps.append(torch.where(torch.isfinite(step).all(), step, torch.zeros_like(step)).to(weight.dtype))
    return Perturbation(weights, steps)


@contextlib.contextmanager
def perturbed(diff: Perturbation) -> Iterator[None]:
    """The weights with ``diff`` added, inside the block; bit for bit the weights of before, after it (they are
    copied back, not recomputed as w + v - v)."""
    originals = [weight.detach().clone() for weight in diff.weights]
    with torch.no_grad():
        for weight, step in zip(diff.weights, diff.steps):
            weight.add_(step)
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in zip(diff.weights, originals):
                weight.copy_(original)
