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
`advcli.attacks.reference`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


Attack = Callable[..., torch.Tensor]


# --- losses the attacks maximise (per example, shape (B,)) -------------------------------------

def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini & Wagner (2017) logit margin, max_{j != y} z_j - z_y: positive once x is misclassified."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks"): the margin divided by z_(1) - z_(3), the gap
    between the largest and third-largest logit, so rescaling the logits does not change it. K >= 3."""
    logits = logits.float()
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    ranked = logits.sort(dim=1, descending=True).values
    return margin(logits, y) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def kl_divergence(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per example, ``p`` = ``target_probs`` (B, K): the loss TRADES's attack
    maximises, with the clean prediction as ``p`` in place of labels."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return (target_probs * (target_probs.clamp_min(1e-12).log() - log_probs)).sum(dim=1)


def rejection_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The adaptive loss against a K+1-output model whose last output means "adversarial input"
    (``trainer=adv_class``): max_{j not in {y, K}} z_j - max(z_y, z_K). It is positive once the best
    wrong class beats both the true class and the flag, i.e. the input is misclassified *and* not
    rejected -- what an attacker who knows about the extra class must reach (Carlini & Wagner 2017,
    "Adversarial examples are not easily detected")."""
    logits = logits.float()
    flag = logits.shape[1] - 1
    guarded = torch.maximum(logits.gather(1, y[:, None]).squeeze(1), logits[:, flag])
    others = logits.scatter(1, y[:, None], float("-inf"))
    others[:, flag] = float("-inf")
    return others.amax(dim=1) - guarded


LOSSES = {"ce": cross_entropy, "margin": margin, "dlr": dlr, "kl": kl_divergence, "rejection_margin": rejection_margin}


def still_safe(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per example, whether the attack with this ``loss`` has not yet succeeded: the prediction is y, or
    for ``rejection_margin`` y or the "adversarial input" flag (the last output), which it must avoid."""
    predicted = logits.argmax(dim=1)
    safe = predicted == y
    if loss == "rejection_margin":
        safe |= predicted == logits.shape[1] - 1
    return safe


# --- the threat models -------------------------------------------------------------------------

def project_linf(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point of the L-inf ball of radius eps: clip each pixel."""
    return delta.clamp(-eps, eps)


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point of the L2 ball of radius eps: rescale examples whose norm exceeds eps."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def random_linf(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Uniform sample from the L-inf ball."""
    return torch.empty_like(x).uniform_(-eps, eps)


def random_l2(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Uniform sample from the L2 ball: a uniform direction, radius eps * u^(1/d)."""
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    d = x[0].numel()
    radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype).pow(1.0 / d)
    return direction * radius.view(-1, *([1] * (x.dim() - 1)))


def ascent_linf(grad: torch.Tensor) -> torch.Tensor:
    """Steepest-ascent direction of unit L-inf norm: the gradient's sign."""
    return grad.sign()


def ascent_l2(grad: torch.Tensor) -> torch.Tensor:
    """Steepest-ascent direction of unit L2 norm: the normalised gradient."""
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball S: the nearest point of S (``project``), a uniform sample of it (``sample``), and the
    steepest-ascent direction of unit norm for a gradient (``ascent``)."""

    project: Callable[[torch.Tensor, float], torch.Tensor]
    sample: Callable[[torch.Tensor, float], torch.Tensor]
    ascent: Callable[[torch.Tensor], torch.Tensor]


THREAT_MODELS = {
    "linf": ThreatModel(project=project_linf, sample=random_linf, ascent=ascent_linf),
    "l2": ThreatModel(project=project_l2, sample=random_l2, ascent=ascent_l2),
}


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


def start_point(x: torch.Tensor, eps: float, norm: str, *, random_start: bool, start_std: float = 0.0) -> torch.Tensor:
    """The first delta of an attack, inside the ball and the pixel box: uniform in the ball (``random_start``),
    small Gaussian noise of std ``start_std`` (TRADES starts from 0.001 * N(0, 1): at delta = 0 its KL loss has
    a zero gradient), or zero."""
    ball = THREAT_MODELS[norm]
    if random_start:
        delta = ball.sample(x, eps)
    elif start_std:
        delta = ball.project(start_std * torch.randn_like(x), eps)
    else:
        return torch.zeros_like(x)
    return (x + delta).clamp(0, 1) - x


def _check(eps: float, steps: int, restarts: int, norm: str) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if norm not in THREAT_MODELS:
        raise ValueError(f"norm must be one of {sorted(THREAT_MODELS)}, got {norm!r}")


# --- the attacks --------------------------------------------------------------------------------

def none(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.0, **_: object) -> torch.Tensor:
    """No attack: standard training and clean accuracy. Returns ``x`` detached."""
    return x.detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float | None = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        loss: str = "ce", early_stop: bool = False, targeted: bool = False, start_std: float = 0.0) -> torch.Tensor:
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
        random_start: start from a uniform sample of the ball instead of x.
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
        start_std: without ``random_start``, start from Gaussian noise of this std instead of x itself
            (TRADES: 0.001).

    Returns:
        x_adv: (B, C, H, W), detached, in [0, 1], with x_adv - x inside the ball.

    Example:
        >>> x_adv = pgd(model, x, y, eps=8/255, steps=10)
    """
    _check(eps, steps, restarts, norm)
    if eps == 0:
        return x.detach()
    if alpha is None:
        alpha = 2.5 * eps / steps
    ball = THREAT_MODELS[norm]
    loss_fn = LOSSES[loss]
    if loss == "kl" and early_stop:
        raise ValueError("loss='kl' maximises a divergence from soft targets; early_stop needs labels")
    if targeted:
        if early_stop:
            raise ValueError("early_stop asks whether an example can be misclassified; a targeted attack cannot use it")
        untargeted_loss = loss_fn
        loss_fn = lambda logits, target: -untargeted_loss(logits, target)  # noqa: E731
    x = x.detach()
    if early_stop:
        with frozen_parameters(model), torch.no_grad():
            return _pgd_until_broken(model, x, y, eps, alpha, steps, restarts, random_start, norm, loss)

    best_delta, best_loss = None, None
    with frozen_parameters(model):
        for _ in range(restarts):
            delta = start_point(x, eps, norm, random_start=random_start, start_std=start_std)
            for _ in range(steps):
                grad = input_gradient(model, x, y, delta, loss_fn)
                delta = ball.project(delta + alpha * ball.ascent(grad), eps)
                delta = (x + delta).clamp(0, 1) - x  # stays in the ball: the box and ball are both convex around x
            if restarts == 1:
                best_delta = delta
                break
            with torch.no_grad():
                run_loss = loss_fn(model(x + delta), y)
            if best_delta is None:
                best_delta, best_loss = delta, run_loss
            else:
                better = run_loss > best_loss
                best_delta = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best_delta)
                best_loss = torch.maximum(run_loss, best_loss)
    return (x + best_delta).detach()


def _pgd_until_broken(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                      restarts: int, random_start: bool, norm: str, loss: str) -> torch.Tensor:
    """PGD with ``early_stop=True``: see `pgd`. Runs under no_grad except for each input gradient.

    ``live`` holds the positions (in x) of the examples a restart still attacks: an example leaves it at the
    step it breaks, and the next restart attacks only the examples no restart has broken.
    """
    ball, loss_fn = THREAT_MODELS[norm], LOSSES[loss]
    x_adv = x.clone()
    broken = torch.zeros_like(y, dtype=torch.bool)  # misclassified at some point of some restart
    best_loss = torch.full(y.shape, float("-inf"), device=x.device)  # of the unbroken examples' final points
    for _ in range(restarts):
        live = (~broken).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        x_live, y_live = take(x, live), y[live]
        delta = start_point(x_live, eps, norm, random_start=random_start)
        for step in range(steps + 1):
            if step < steps:
                grad, logits = gradient_and_logits(model, x_live, y_live, delta, loss_fn)
            else:  # the restart's final point: look, no step
                logits = model(x_live + delta)
            still_correct = still_safe(logits, y_live, loss)
            newly_broken = live[~still_correct]
            x_adv[newly_broken] = (x_live + delta)[~still_correct]
            broken[newly_broken] = True
            if step == steps:
                _keep_if_higher(x_adv, best_loss, live[still_correct], (x_live + delta)[still_correct],
                                loss_fn(logits[still_correct], y_live[still_correct]))
                break
            live, x_live, y_live = live[still_correct], x_live[still_correct], y_live[still_correct]
            if live.numel() == 0:
                break
            delta = ball.project(delta[still_correct] + alpha * ball.ascent(grad[still_correct]), eps)
            delta = (x_live + delta).clamp(0, 1) - x_live  # the box and the ball are both convex around x
    return x_adv


def _keep_if_higher(x_adv: torch.Tensor, best_loss: torch.Tensor, rows: torch.Tensor, points: torch.Tensor,
                    losses: torch.Tensor) -> None:
    """Per example of ``rows``, keep the point whose final loss is the highest of the restarts so far."""
    higher = losses > best_loss[rows]
    x_adv[rows[higher]] = points[higher]
    best_loss[rows[higher]] = losses[higher]


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float | None = None,
         norm: str = "linf", random_start: bool = False, restarts: int = 1, loss: str = "ce",
         start_std: float = 0.0) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one ascent step, i.e. PGD with steps=1.

    With ``random_start=True`` it is the "fast" adversarial training attack of Wong et al. 2020
    ("Fast is better than free"): a uniform start in the ball, then a step of alpha = 1.25 * eps
    (the default then), projected back; ``restarts`` > 1 draws that many starts and keeps, per example,
    the one with the highest loss. Without a random start alpha defaults to eps, which is exactly
    Goodfellow's x + eps * sign(grad), and there is nothing to restart.

    Returns x_adv: (B, C, H, W), detached, in [0, 1].
    """
    if restarts > 1 and not (random_start or start_std):
        raise ValueError("FGSM without a random start is deterministic: restarts > 1 needs random_start=True")
    if alpha is None:
        alpha = 1.25 * eps if random_start else eps
    return pgd(model, x, y, eps, alpha=alpha, steps=1, norm=norm, random_start=random_start, restarts=restarts,
               loss=loss, start_std=start_std)
