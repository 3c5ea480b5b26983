"""Training objectives: what the outer minimisation minimises on each batch (``trainer=...``).

Every objective has one signature::

    objective(model, x, y, eps) -> Step(loss, logits, targets)

It runs its training attack (the inner maximisation) on the bare model, puts the model in train mode
and returns the per-example loss (B,) the optimiser minimises, plus the logits and targets on which
"training accuracy" is measured. ``extra_outputs`` says how many outputs the model needs beyond the K
classes; ``needs_attack`` whether the objective means anything without a training attack;
``attack_mode`` the BatchNorm mode its attack runs in unless the run says otherwise (``attack_mode=``).
The caller owns autocast, setting that BatchNorm mode, the reduction of the loss over the batch (and
over ranks) and the optimiser step.

- `MinMax` (``trainer=standard``): Madry et al. 2018, the cross-entropy at the attack's point; with
  ``attack=none`` it is standard training.
- `Trades` (``trainer=trades``): Zhang et al. 2019, clean cross-entropy plus beta times the KL
  divergence between the clean and the perturbed prediction, the perturbation maximising that KL.
- `AdversarialClass` (``trainer=adv_class``): K+1 outputs; clean inputs keep their label, the
  attack's outputs get the extra label K ("adversarial input"), as in Grosse et al. 2017 and
  Hosseini et al. 2017 ("NULL labeling"). Judge it with adaptive attacks (`advcli.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advcli import attacks
from advcli.attacks import Attack
from advcli.distributed import unwrap


@dataclass
class Step:
    loss: torch.Tensor     # (B,) fp32, per example
    logits: torch.Tensor   # (M, K') the outputs training accuracy is measured on
    targets: torch.Tensor  # (M,) their labels


class MinMax:
    """min_theta E max_{delta in S} CE(f(x + delta), y): the loss at the training attack's point."""

    extra_outputs = 0
    needs_attack = False   # with attack=none it is standard training
    attack_mode = "train"  # Madry et al. and Wong et al. attack with BatchNorm in train mode

    def __init__(self, attack: Attack = attacks.none):
        self.attack = attack

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Step:
        x_adv = self.attack(unwrap(model), x, y, eps)
        model.train()
        logits = model(x_adv)
        return Step(F.cross_entropy(logits.float(), y, reduction="none"), logits, y)


class Trades:
    """TRADES (Zhang et al. 2019, "Theoretically principled trade-off between robustness and accuracy"):
    CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL inside the threat model.

    The training attack's settings (steps, step size, norm, restarts) are kept; its loss becomes the KL
    to the clean prediction, and, as in the authors' code, it starts from x + 0.001 * N(0, 1) (at x itself
    the KL is at its minimum and its gradient is rounding noise) with BatchNorm in eval mode. Larger ``beta``
    buys robustness with clean accuracy (the paper uses 6 on CIFAR-10, 1 to 6 on MNIST). Training accuracy
    is measured on x'.
    """

    extra_outputs = 0
    needs_attack = True
    attack_mode = "eval"
    start_std = 0.001

    def __init__(self, attack: Attack = attacks.none, beta: float = 6.0):
        if beta < 0:
            raise ValueError(f"TRADES beta must be >= 0, got {beta}")
        self.attack, self.beta = attack, beta

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Step:
        bare = unwrap(model)
        with torch.no_grad():
            clean_probs = F.softmax(bare(x).float(), dim=1)
        x_adv = self.attack(bare, x, clean_probs, eps, loss="kl", random_start=False, start_std=self.start_std)
        model.train()
        logits_clean, logits_adv = model(x), model(x_adv)
        kl = attacks.kl_divergence(logits_adv, F.softmax(logits_clean.float(), dim=1))
        loss = F.cross_entropy(logits_clean.float(), y, reduction="none") + self.beta * kl
        return Step(loss, logits_adv, y)


class AdversarialClass:
    """A K+1-way classifier: clean x with label y, the training attack's x' with label K ("adversarial").

    Per example the loss is (1 - adv_weight) * CE(f(x), y) + adv_weight * CE(f(x'), K). The attack is
    the usual one on the true-class loss, blind to the extra class, as in the papers that report this
    defence strong; adaptive attacks (`advcli.attacks.adaptive_margin`) get around it. Training
    accuracy counts both halves against their own labels.
    """

    extra_outputs = 1
    needs_attack = True
    attack_mode = "train"

    def __init__(self, attack: Attack = attacks.none, adv_weight: float = 0.5):
        if not 0 <= adv_weight <= 1:
            raise ValueError(f"adv_weight must lie in [0, 1], got {adv_weight}")
        self.attack, self.adv_weight = attack, adv_weight

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Step:
        x_adv = self.attack(unwrap(model), x, y, eps)
        model.train()
        logits_clean, logits_adv = model(x), model(x_adv)
        flagged = torch.full_like(y, logits_clean.shape[1] - 1)
        loss = ((1 - self.adv_weight) * F.cross_entropy(logits_clean.float(), y, reduction="none")
                + self.adv_weight * F.cross_entropy(logits_adv.float(), flagged, reduction="none"))
        return Step(loss, torch.cat([logits_clean, logits_adv]), torch.cat([y, flagged]))
