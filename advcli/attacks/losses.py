"""The losses attacks maximise, per example (shape (B,)), and whether an attack has yet succeeded.

``LOSSES`` names them for an attack's ``loss`` setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
