"""Adversarial attacks: the inner maximisation max_{delta in S} L(f(x + delta), y) of min-max training.

Every attack has one signature::

    attack(model, x, y, eps, **hyper_parameters) -> x_adv

- ``x`` holds pixels in [0, 1], shape (B, C, H, W); ``x_adv`` is detached, in [0, 1], and
  ``x_adv - x`` lies in the threat model S: the L-inf ball (``norm="linf"``) or the L2 ball
  (``norm="l2"``) of radius ``eps``. Normalisation lives inside the model, so eps and alpha are
  plain pixel-unit scalars.
- Only the input gradient is computed (`torch.autograd.grad` w.r.t. delta); the model's parameters
  stop requiring grad while the attack runs, so their ``.grad`` is never touched and autograd does not
  keep what a weight gradient would need.
- The attack never calls ``model.train()`` or ``model.eval()``: the caller decides (training attacks
  BatchNorm-mode per the ``attack_mode`` setting, evaluation in eval mode), and the caller's autocast
  context, if any, applies to the forward passes.

With ``_partial_: true`` in an attack config, ``hydra.utils.instantiate(cfg.attack)`` returns one of
these functions with its hyper-parameters bound, ready to call as ``attack(model, x, y, eps)``.

Training and evaluation want different things from restarts. Training PGD keeps, per example, the
restart with the highest loss. Evaluation PGD (``early_stop=True``) asks only "can this example be
broken?": an example misclassified at any step keeps that point and is never attacked again, and
restart r runs only on the examples no earlier restart broke, so R restarts cost about
1 + (R - 1) x (robust fraction) single runs. AutoAttack, through the reference code, is in
`advcli.attacks.reference`; the losses are in `advcli.attacks.losses`, the balls, starts and steps in
`advcli.attacks.balls` (their names are re-exported here).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from advcli.attacks.balls import (THREAT_MODELS, Ascent, Start, StartOption, ThreatModel, as_start,  # noqa: F401
    ascent_l2, ascent_linf, project_l2, project_linf, random_l2, random_linf, start_from_flags, start_point,
    takes_start_flags, START_FLAGS)
from advcli.attacks.losses import (LOSSES, cross_entropy, dlr, kl_divergence, margin,  # noqa: F401
    rejection_margin, still_safe)


Attack = Callable[..., torch.Tensor]


# --- helpers ------------------------------------------------------------------------------------

@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the duration, then get their old flags back.

    Attack steps need only d loss / d input. `torch.autograd.grad` already skips the weight gradients;
    with the weights frozen the forward pass also stops saving what those gradients would need (less
    memory), and no ``.grad`` can be filled by an attack that calls ``.backward()`` (FAB does).
    """
    flipped = [p for p in model.parameters() if p.requires_grad]
    for p in flipped:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


def gradient_and_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                        loss_fn: Callable = cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """d sum_i loss_i / d delta, computed for delta alone, and the (detached) logits at x + delta.

    Under fp16 autocast each example's gradient comes back multiplied by a positive factor of its own (the
    direction, all an attack step uses, is exact): fp16 stops at about 6e-8, so a confident model's loss
    gradient would underflow to zero on its way back through the network. The gradient at the logits is
    taken in fp32 and scaled per example so that its largest entry is 1 before it enters the fp16 layers.
    """
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x + delta)
        if logits.dtype != torch.float16:
            (grad,) = torch.autograd.grad(loss_fn(logits, y).sum(), delta)
            return grad, logits.detach()
        wide = logits.detach().float().requires_grad_(True)
        (at_logits,) = torch.autograd.grad(loss_fn(wide, y).sum(), wide)
        largest = at_logits.abs().amax(dim=1, keepdim=True)
        at_logits = torch.where(largest > 0, at_logits / largest.clamp_min(torch.finfo(torch.float32).tiny), at_logits)
        (grad,) = torch.autograd.grad(logits, delta, grad_outputs=at_logits.to(logits.dtype))
    return grad, logits.detach()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                   loss_fn: Callable = cross_entropy) -> torch.Tensor:
    """d sum_i loss_i / d delta, computed for delta alone (sum, so examples do not scale each other)."""
    return gradient_and_logits(model, x, y, delta, loss_fn)[0]


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``t``, keeping a channels-last layout (faster convolutions) when ``t`` had one."""
    rows = t[index]
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        rows = rows.contiguous(memory_format=torch.channels_last)
    return rows


def _check(eps: float, steps: int, restarts: int, norm: str) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if norm not in THREAT_MODELS:
        raise ValueError(f"norm must be one of {sorted(THREAT_MODELS)}, got {norm!r}")


def _objective(loss: str, early_stop: bool, targeted: bool) -> Callable:
    """The per-example loss PGD ascends, once ``loss`` is known to go with ``early_stop`` and ``targeted``."""
    loss_fn = LOSSES[loss]
    if loss == "kl" and early_stop:
        raise ValueError("loss='kl' maximises a divergence from soft targets; early_stop needs labels")
    if not targeted:
        return loss_fn
    if early_stop:
        raise ValueError("early_stop asks whether an example can be misclassified; a targeted attack cannot use it")
    return lambda logits, target: -loss_fn(logits, target)


# --- the attacks --------------------------------------------------------------------------------

def none(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.0, **_: object) -> torch.Tensor:
    """No attack: standard training and clean accuracy. Returns ``x`` detached."""
    return x.detach()


@takes_start_flags
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float | None = None,
        steps: int = 10, norm: str = "linf", start: StartOption = "uniform", restarts: int = 1,
        loss: str = "ce", early_stop: bool = False, targeted: bool = False) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks"): ``steps`` ascent steps of size ``alpha``, each projected back onto the
    ``norm`` ball of radius ``eps`` and onto the [0, 1] pixel box.

    Args:
        model: maps (B, C, H, W) pixels in [0, 1] to (B, K) logits.
        x: clean images, (B, C, H, W) in [0, 1]. y: labels, (B,) int64.
        eps: radius of the threat model, pixel units (e.g. 8/255 for L-inf on CIFAR-10).
        alpha: step size, pixel units; None -> 2.5 * eps / steps, which lets a path from the
            centre reach the boundary with room to move along it.
        steps: ascent steps per restart (>= 1).
        norm: "linf" (signed-gradient steps) or "l2" (normalised-gradient steps).
        start: where each restart starts (`Start`): "uniform" (a uniform sample of the ball), "zero"
            (x itself) or ("gaussian", std) (TRADES: 0.001). The configs' spelling, ``random_start``
            (True: "uniform") and ``start_std`` (without a random start: Gaussian noise of this std),
            is taken too (`takes_start_flags`).
        restarts: independent runs; per example the perturbation with the highest loss is kept.
        loss: "ce" (cross-entropy), "margin" (Carlini & Wagner logit margin), "dlr" (Croce & Hein),
            "kl" (``y`` holds target probabilities (B, K): TRADES's inner maximisation) or
            "rejection_margin" (the adaptive attack on a model with an "adversarial input" output).
        early_stop: evaluation semantics. An example misclassified (for "rejection_margin": given a
            wrong class other than the flag) at any step (the random start
            included) keeps that point and leaves the batch; restart r attacks only the examples no
            earlier restart broke; examples never broken keep their highest-loss point. The work
            falls with the robust fraction. Use it with the model in eval mode: the batch shrinks
            as examples break, which BatchNorm in train mode would notice.
        targeted: ``y`` holds target classes and the attack descends the loss towards them (restarts
            keep the point closest to the target); not with ``early_stop``.

    Returns:
        x_adv: (B, C, H, W), detached, in [0, 1], with x_adv - x inside the ball.

    Example:
        >>> x_adv = pgd(model, x, y, eps=8/255, steps=10)
    """
    _check(eps, steps, restarts, norm)
    start = as_start(start)
    if eps == 0:
        return x.detach()
    ascent = Ascent(eps, 2.5 * eps / steps if alpha is None else alpha, steps, norm)
    loss_fn, x = _objective(loss, early_stop, targeted), x.detach()
    with frozen_parameters(model):
        if early_stop:
            with torch.no_grad():
                return _pgd_until_broken(model, x, y, ascent, start, restarts, loss)
        return (x + _best_of_restarts(model, x, y, ascent, start, restarts, loss_fn)).detach()


def _one_restart(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ascent: Ascent, start: Start,
                 loss_fn: Callable) -> torch.Tensor:
    """One PGD run from ``start``: its final delta."""
    delta = start.point(x, ascent.eps, ascent.norm)
    for _ in range(ascent.steps):
        delta = ascent.step(x, delta, input_gradient(model, x, y, delta, loss_fn))
    return delta


def _best_of_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ascent: Ascent, start: Start,
                      restarts: int, loss_fn: Callable) -> torch.Tensor:
    """Per example, the final delta of the restart with the highest loss (one restart: its delta, with no
    forward pass to rank it)."""
    best_delta = _one_restart(model, x, y, ascent, start, loss_fn)
    if restarts == 1:
        return best_delta
    with torch.no_grad():
        best_loss = loss_fn(model(x + best_delta), y)
    for _ in range(restarts - 1):
        delta = _one_restart(model, x, y, ascent, start, loss_fn)
        with torch.no_grad():
            run_loss = loss_fn(model(x + delta), y)
        better = run_loss > best_loss
        best_delta = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best_delta)
        best_loss = torch.maximum(run_loss, best_loss)
    return best_delta


def _pgd_until_broken(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ascent: Ascent, start: Start,
                      restarts: int, loss: str) -> torch.Tensor:
    """PGD with ``early_stop=True``: see `pgd`. Runs under no_grad except for each input gradient.

    ``live`` holds the positions (in x) of the examples a restart still attacks: an example leaves it at the
    step it breaks, and the next restart attacks only the examples no restart has broken.
    """
    loss_fn = LOSSES[loss]
    x_adv = x.clone()
    broken = torch.zeros_like(y, dtype=torch.bool)  # misclassified at some point of some restart
    best_loss = torch.full(y.shape, float("-inf"), device=x.device)  # of the unbroken examples' final points
    for _ in range(restarts):
        live = (~broken).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        x_live, y_live = take(x, live), y[live]
        delta = start.point(x_live, ascent.eps, ascent.norm)
        for step in range(ascent.steps + 1):
            if step < ascent.steps:
                grad, logits = gradient_and_logits(model, x_live, y_live, delta, loss_fn)
            else:  # the restart's final point: look, no step
                logits = model(x_live + delta)
            still_correct = still_safe(logits, y_live, loss)
            newly_broken = live[~still_correct]
            x_adv[newly_broken] = (x_live + delta)[~still_correct]
            broken[newly_broken] = True
            if step == ascent.steps:
                _keep_if_higher(x_adv, best_loss, live[still_correct], (x_live + delta)[still_correct],
                                loss_fn(logits[still_correct], y_live[still_correct]))
                break
            live, x_live, y_live = live[still_correct], x_live[still_correct], y_live[still_correct]
            if live.numel() == 0:
                break
            delta = ascent.step(x_live, delta[still_correct], grad[still_correct])
    return x_adv


def _keep_if_higher(x_adv: torch.Tensor, best_loss: torch.Tensor, rows: torch.Tensor, points: torch.Tensor,
                    losses: torch.Tensor) -> None:
    """Per example of ``rows``, keep the point whose final loss is the highest of the restarts so far."""
    higher = losses > best_loss[rows]
    x_adv[rows[higher]] = points[higher]
    best_loss[rows[higher]] = losses[higher]


@takes_start_flags
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float | None = None,
         norm: str = "linf", start: StartOption = "zero", restarts: int = 1, loss: str = "ce") -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one ascent step, i.e. PGD with steps=1.

    With ``start="uniform"`` (``random_start=True``) it is the "fast" adversarial training attack of Wong et
    al. 2020 ("Fast is better than free"): a uniform start in the ball, then a step of alpha = 1.25 * eps
    (the default then), projected back; ``restarts`` > 1 draws that many starts and keeps, per example,
    the one with the highest loss. From x itself (the default) alpha defaults to eps, which is exactly
    Goodfellow's x + eps * sign(grad), and there is nothing to restart. ``start`` as in `pgd`.

    Returns x_adv: (B, C, H, W), detached, in [0, 1].
    """
    start = as_start(start)
    if restarts > 1 and start.kind == "zero":
        raise ValueError("FGSM without a random start is deterministic: restarts > 1 needs start='uniform' "
                         "(random_start=True) or a Gaussian start")
    if alpha is None:
        alpha = 1.25 * eps if start.kind == "uniform" else eps
    return pgd(model, x, y, eps, alpha=alpha, steps=1, norm=norm, start=start, restarts=restarts, loss=loss)
