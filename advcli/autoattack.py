"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"), run by the authors' own code: the optional ``pyautoattack`` package
(``pip install "advcli[autoattack]"``). The attacks here follow advcli's signature,
``attack(model, x, y, eps, ...) -> x_adv`` with pixels in [0, 1], and are evaluation attacks: call them with
the model in eval mode.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from advcli.attacks import frozen_parameters
from advcli.errors import ConfigError, MissingExtra

AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}


def require_autoattack() -> type:
    """The ``AutoAttack`` class of the ``pyautoattack`` package, or a `MissingExtra` saying how to install it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as error:
        raise MissingExtra(
            f"AutoAttack needs the optional package pyautoattack, which cannot be imported ({error}). Install "
            "advcli's extra with: pip install 'advcli[autoattack]' (or pip install -e '.[autoattack]' in a "
            "checkout), or leave attack=autoattack out; every other attack works without it."
        ) from None
    return AutoAttack


def _square_l2_fits(h: int, w: int) -> bool:
    """Whether the reference Square attack's L2 initialisation (a grid of s x s squares, s = h // 5, from an
    offset (h - 5s) // 2) stays inside an h x w image; it indexes past the edge otherwise and crashes."""
    s = h // 5
    if s < 1:
        return False
    offset = (h - 5 * s) // 2
    return offset + (h // s) * s <= h and offset + (w // s) * s <= w


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
               version: str = "standard", seed: int = 0) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks"), run by the authors' code (the ``pyautoattack`` package).

    The standard version runs APGD-CE, APGD-T (targeted DLR), FAB-T and Square (5,000 queries) in turn,
    each only on the examples the earlier ones left correctly classified. It is an evaluation attack:
    call it with the model in eval mode. The targeted attacks use min(9, K - 1) target classes (9 in
    the paper, where K >= 10), so a model needs K >= 4 classes.

    Args:
        model: (B, C, H, W) pixels in [0, 1] -> (B, K) logits. x: (B, C, H, W) in [0, 1]. y: (B,) int64.
        eps: radius in pixel units. norm: "linf" or "l2". version: AutoAttack's "standard" (or "plus",
            "rand"). seed: AutoAttack's seed; the caller's random generator state is restored after.

    Returns:
        x_adv: (B, C, H, W), detached, in [0, 1]; rows AutoAttack could not break are x itself.

    Example:
        >>> x_adv = autoattack(model.eval(), x, y, eps=8/255)
    """
    AutoAttack = require_autoattack()
    if norm not in AUTOATTACK_NORMS:
        raise ValueError(f"AutoAttack's norm must be one of {sorted(AUTOATTACK_NORMS)}, got {norm!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x = x.detach()
    if eps == 0 or len(y) == 0:
        return x
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    if num_classes < 4:
        raise ConfigError(f"AutoAttack's targeted DLR loss needs at least 4 classes, but this model has {num_classes}; "
                          "evaluate it with the other attacks (leave attack=autoattack out).")
    if norm == "l2" and not _square_l2_fits(x.shape[-2], x.shape[-1]):
        raise ConfigError(
            f"AutoAttack's L2 Square attack cannot handle {x.shape[-2]}x{x.shape[-1]} images: its initial grid of "
            "squares runs past the image edge (a limitation of the reference code; 28x28 and 32x32 work). Use "
            "norm=linf with attack=autoattack, or leave attack=autoattack out.")
    logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its warnings (e.g. zero gradients) still show
    adversary = AutoAttack(model, norm=AUTOATTACK_NORMS[norm], eps=eps, version=version, seed=seed, device=x.device)
    adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    adversary.fab.n_target_classes = min(9, num_classes - 1)
    cuda = [x.device] if x.device.type == "cuda" else []
    # parameters frozen: FAB calls .backward(), which would otherwise fill the parameters' .grad;
    # fork_rng: AutoAttack reseeds the global generators
    with frozen_parameters(model), torch.random.fork_rng(devices=cuda):
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
    return x_adv.detach()
