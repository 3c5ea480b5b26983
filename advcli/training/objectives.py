"""Training objectives: what the outer minimisation minimises on each batch (``trainer=...``).

Every objective has two halves, and one call that runs both::

    objective.examples(model, x, y, eps) -> Examples(x, x_adv, y)   # the training attack, on the bare model
    objective.loss(model, examples) -> Step(loss, logits, targets)  # train mode, the loss on those examples
    objective(model, x, y, eps) -> Step                              # the two in turn

The loss is the per-example loss (B,) the optimiser minimises, plus the logits and targets on which
"training accuracy" is measured. The halves are apart because adversarial weight perturbation
(`advcli.training.awp`, ``awp.gamma``) computes the loss twice on the same examples: at the weights, for the
direction of the perturbation, and at the perturbed weights, for the optimiser's step.

``extra_outputs`` says how many outputs the model needs beyond the K classes; ``needs_attack`` whether the
objective means anything without a training attack; ``attack_mode`` the BatchNorm mode its attack runs in
unless the run says otherwise (``attack_mode=``).
The caller owns autocast, setting that BatchNorm mode, the reduction of the loss over the batch (and
over ranks) and the optimiser step.

- `MinMax` (``trainer=minmax``; ``trainer=standard``, its former name, still works): Madry et al. 2018, the
  cross-entropy at the attack's point; with ``attack=none`` it is standard training.
- `Trades` (``trainer=trades``): Zhang et al. 2019, clean cross-entropy plus beta times the KL
  divergence between the clean and the perturbed prediction, the perturbation maximising that KL.
- `Mart` (``trainer=mart``): Wang et al. 2020, the boosted cross-entropy at the attack's point plus beta
  times the clean-to-perturbed KL divergence weighted by how badly the clean input is classified.
- `AdversarialClass` (``trainer=adv_class``): K+1 outputs; clean inputs keep their label, the
  attack's outputs get the extra label K ("adversarial input"), as in Grosse et al. 2017 and
  Hosseini et al. 2017 ("NULL labeling"). Judge it with adaptive attacks (`advcli.evaluation.evaluate`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
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


@dataclass
class Examples:
    """One batch and what the training attack made of it: all a loss needs."""

    x: torch.Tensor      # clean inputs
    x_adv: torch.Tensor  # the training attack's outputs
    y: torch.Tensor      # labels


class Objective(ABC):
    """An objective: a training attack (`examples`) and a loss on its outputs (`loss`); calling it runs both."""

    extra_outputs = 0
    needs_attack = True
    attack_mode = "train"

    def __init__(self, attack: Attack = attacks.none):
        self.attack = attack

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Examples:
        """The training attack on the true labels (its own loss, CE unless ``attack.loss`` says otherwise), run on
        the bare model in whatever BatchNorm mode the caller set."""
        return Examples(x, self.attack(unwrap(model), x, y, eps), y)

    @abstractmethod
    def loss(self, model: nn.Module, found: Examples) -> Step:
        """The per-example loss on ``found``, the model in train mode."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Step:
        return self.loss(model, self.examples(model, x, y, eps))


class MinMax(Objective):
    """min_theta E max_{delta in S} CE(f(x + delta), y): the loss at the training attack's point."""

    needs_attack = False   # with attack=none it is standard training
    attack_mode = "train"  # Madry et al. and Wong et al. attack with BatchNorm in train mode

    def loss(self, model: nn.Module, found: Examples) -> Step:
        model.train()
        logits = model(found.x_adv)
        return Step(F.cross_entropy(logits.float(), found.y, reduction="none"), logits, found.y)


class Trades(Objective):
    """TRADES (Zhang et al. 2019, "Theoretically principled trade-off between robustness and accuracy"):
    CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL inside the threat model.

    The training attack's settings (steps, step size, norm, restarts) are kept; its loss becomes the KL
    to the clean prediction, and, as in the authors' code, it starts from x + 0.001 * N(0, 1) (at x itself
    the KL is at its minimum and its gradient is rounding noise) with BatchNorm in eval mode. Larger ``beta``
    buys robustness with clean accuracy (the paper uses 6 on CIFAR-10, 1 to 6 on MNIST). Training accuracy
    is measured on x'.
    """

    attack_mode = "eval"
    start_std = 0.001

    def __init__(self, attack: Attack = attacks.none, beta: float = 6.0):
        if beta < 0:
            raise ValueError(f"TRADES beta must be >= 0, got {beta}")
        super().__init__(attack)
        self.beta = beta

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Examples:
        bare = unwrap(model)
        with torch.no_grad():
            clean_probs = F.softmax(bare(x).float(), dim=1)
        x_adv = self.attack(bare, x, clean_probs, eps, loss="kl", random_start=False, start_std=self.start_std)
        return Examples(x, x_adv, y)

    def loss(self, model: nn.Module, found: Examples) -> Step:
        model.train()
        logits_clean, logits_adv = model(found.x), model(found.x_adv)
        kl = attacks.kl_divergence(logits_adv, F.softmax(logits_clean.float(), dim=1))
        loss = F.cross_entropy(logits_clean.float(), found.y, reduction="none") + self.beta * kl
        return Step(loss, logits_adv, found.y)


def boosted_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's BCE per example: -log p_y - log(1 - max_{k != y} p_k), p = softmax(logits).

    log(1 - p_k) is computed as the log of the other classes' probabilities, logsumexp_{j != k} of the
    log-probabilities: exact, finite and with bounded gradients even where p_k rounds to 1 (the authors'
    code writes log(1.0001 - p_k) for the same reason, which caps the term near 9.2).
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    true = log_probs.gather(1, y[:, None])
    runner_up = log_probs.scatter(1, y[:, None], -math.inf).argmax(dim=1, keepdim=True)
    not_runner_up = log_probs.scatter(1, runner_up, -math.inf).logsumexp(dim=1, keepdim=True)
    return -(true + not_runner_up).squeeze(1)


class Mart(Objective):
    """MART (Wang et al. 2020, "Improving adversarial robustness requires revisiting misclassified examples"):
    BCE(f(x'), y) + beta * KL(f(x) || f(x')) * (1 - p_y(x)), x' from the training attack on the cross-entropy.

    The boosted cross-entropy (`boosted_cross_entropy`) also pushes down the strongest wrong class at x'; the
    KL term, weighted by 1 - p_y(x), pulls the perturbed prediction towards the clean one hardest where the
    clean input is misclassified. As in the authors' code the attack runs with BatchNorm in eval mode, and the
    gradient flows through both halves of the KL and through the weight. The paper uses beta = 6 on CIFAR-10.
    Training accuracy is measured on x'.
    """

    attack_mode = "eval"

    def __init__(self, attack: Attack = attacks.none, beta: float = 6.0):
        if beta < 0:
            raise ValueError(f"MART beta must be >= 0, got {beta}")
        super().__init__(attack)
        self.beta = beta

    def loss(self, model: nn.Module, found: Examples) -> Step:
        model.train()
        logits_clean, logits_adv = model(found.x), model(found.x_adv)
        clean_probs = F.softmax(logits_clean.float(), dim=1)
        misclassified = 1 - clean_probs.gather(1, found.y[:, None]).squeeze(1)
        kl = attacks.kl_divergence(logits_adv, clean_probs)
        loss = boosted_cross_entropy(logits_adv, found.y) + self.beta * kl * misclassified
        return Step(loss, logits_adv, found.y)


class AdversarialClass(Objective):
    """A K+1-way classifier: clean x with label y, the training attack's x' with label K ("adversarial").

    Per example the loss is (1 - adv_weight) * CE(f(x), y) + adv_weight * CE(f(x'), K). The attack is
    the usual one on the true-class loss, blind to the extra class, as in the papers that report this
    defence strong; adaptive attacks (PGD with `loss=rejection_margin`, `advcli.attacks.rejection_margin`) get
    around it. Training accuracy counts both halves against their own labels.
    """

    extra_outputs = 1
    attack_mode = "train"

    def __init__(self, attack: Attack = attacks.none, adv_weight: float = 0.5):
        if not 0 <= adv_weight <= 1:
            raise ValueError(f"adv_weight must lie in [0, 1], got {adv_weight}")
        super().__init__(attack)
        self.adv_weight = adv_weight

    def loss(self, model: nn.Module, found: Examples) -> Step:
        model.train()
        logits_clean, logits_adv = model(found.x), model(found.x_adv)
        y = found.y
        flagged = torch.full_like(y, logits_clean.shape[1] - 1)
        loss = ((1 - self.adv_weight) * F.cross_entropy(logits_clean.float(), y, reduction="none")
                + self.adv_weight * F.cross_entropy(logits_adv.float(), flagged, reduction="none"))
        return Step(loss, torch.cat([logits_clean, logits_adv]), torch.cat([y, flagged]))
