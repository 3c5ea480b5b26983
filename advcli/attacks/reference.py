"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks") and its parts, run by the authors' own code: the ``pyautoattack`` package.

- `autoattack`: the whole ensemble (standard: APGD-CE, APGD-T, FAB-T, Square), as the leaderboards run it.
- `apgd`, `apgd_targeted`, `fab_targeted`, `square`: its attacks one at a time, through the reference classes,
  so an evaluation can run them as a cascade after cheaper attacks (``evaluation=default``: each runs only on
  what the ones before it left standing, at AutoAttack's own budget; `advcli.evaluation.cascade`).

Each follows advcli's signature, ``attack(model, x, y, eps, ...) -> x_adv`` with pixels in [0, 1], and is an
evaluation attack: call it with the model in eval mode. Each seeds its own generator from ``seed`` and leaves
the caller's random state as it was.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from advcli.attacks import frozen_parameters
from advcli.errors import ConfigError, MissingExtra

AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}

# one run of an attack on some rows: (x, y) -> (points, broken); points are adversarial where broken and the
# highest-loss point found elsewhere (inside the ball), broken is bool (rows,)
Run = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def require_autoattack() -> type:
    """The ``AutoAttack`` class of the ``pyautoattack`` package, or a `MissingExtra` saying how to install it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as error:
        raise MissingExtra(
            f"The reference AutoAttack code (the package pyautoattack, a dependency of advcli: the default "
            f"evaluation's APGD, APGD-T and Square come from it) cannot be imported ({error}). Reinstall advcli "
            "with its dependencies: pip install advcli (or pip install -e . in a checkout), or pip install "
            "pyautoattack; evaluation=fast runs without it."
        ) from None
    return AutoAttack


def square_l2_fits(h: int, w: int) -> bool:
    """Whether the reference Square attack's L2 initialisation (a grid of s x s squares, s = h // 5, from an
    offset (h - 5s) // 2) stays inside an h x w image; it indexes past the edge otherwise and crashes."""
    s = h // 5
    if s < 1:
        return False
    offset = (h - 5 * s) // 2
    return offset + (h // s) * s <= h and offset + (w // s) * s <= w


def autoattack_restarts_refused(restarts: int) -> str:
    return (f"restarts={restarts} cannot reach AutoAttack: each of its versions fixes its attacks' restarts (standard: "
            "one per attack and target class), so the run would be recorded with restarts it never had. Use "
            "restarts=1 with attack=autoattack / evaluation=autoattack, or the default evaluation, whose APGD-CE, "
            "APGD-T, FAB-T and Square each take restarts=N.")


AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
               version: str = "standard", seed: int = 0, attacks: Sequence[str] | None = None,
               restarts: int = 1) -> torch.Tensor:
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
        attacks: a part of the version's attacks, with its settings (e.g. ``["apgd-ce", "apgd-t"]``, the
            figure papers quote as "AutoAttack (APGD-CE + APGD-T)"); None: all of them.
        restarts: must be 1: each version fixes its attacks' restarts (accepted so that a run's ``restarts``
            setting is checked against it rather than silently ignored).

    Returns:
        x_adv: (B, C, H, W), detached, in [0, 1]; rows AutoAttack could not break are x itself.

    Example:
        >>> x_adv = autoattack(model.eval(), x, y, eps=8/255)
    """
    AutoAttack = require_autoattack()
    if restarts != 1:
        raise ConfigError(autoattack_restarts_refused(restarts))
    if norm not in AUTOATTACK_NORMS:
        raise ValueError(f"AutoAttack's norm must be one of {sorted(AUTOATTACK_NORMS)}, got {norm!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x = x.detach()
    if eps == 0 or len(y) == 0:
        return x
    num_classes = _autoattack_fits(model, x, norm)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its warnings (e.g. zero gradients) still show
    adversary = AutoAttack(model, norm=AUTOATTACK_NORMS[norm], eps=eps, version=version, seed=seed, device=x.device)
    adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    adversary.fab.n_target_classes = min(9, num_classes - 1)
    if attacks is not None:
        adversary.attacks_to_run = _autoattack_parts(attacks)
    cuda = [x.device] if x.device.type == "cuda" else []
    # parameters frozen: FAB calls .backward(), which would otherwise fill the parameters' .grad;
    # fork_rng: AutoAttack reseeds the global generators
    with frozen_parameters(model), torch.random.fork_rng(devices=cuda):
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
    return x_adv.detach()


def _autoattack_fits(model: nn.Module, x: torch.Tensor, norm: str) -> int:
    """The model's number of classes, once it is known AutoAttack can run on it and on images of x's size."""
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    if num_classes < 4:
        raise ConfigError(f"AutoAttack's targeted DLR loss needs at least 4 classes, but this model has {num_classes}; "
                          "evaluate it with the other attacks (leave attack=autoattack out).")
    if norm == "l2" and not square_l2_fits(x.shape[-2], x.shape[-1]):
        raise ConfigError(
            f"AutoAttack's L2 Square attack cannot handle {x.shape[-2]}x{x.shape[-1]} images: its initial grid of "
            "squares runs past the image edge (a limitation of the reference code; 28x28 and 32x32 work). Use "
            "norm=linf with attack=autoattack, or leave attack=autoattack out.")
    return num_classes


def _autoattack_parts(attacks: Sequence[str]) -> list[str]:
    """``attacks`` as AutoAttack's list of attacks to run, once each is known to be one of its parts."""
    unknown = sorted(set(attacks) - set(AUTOATTACK_PARTS))
    if unknown or not attacks:
        raise ConfigError(f"AutoAttack's attacks={list(attacks)}: {', '.join(unknown) or 'an empty list'} is not "
                          f"among {', '.join(AUTOATTACK_PARTS)}; e.g. attacks=[apgd-ce,apgd-t], or null for "
                          "the whole version.")
    return list(attacks)


@contextmanager
def _reference_run(model: nn.Module, x: torch.Tensor, seed: int) -> Iterator[None]:
    """Frozen parameters (no .grad filled), and the reference code's reseeding kept away from the caller's
    generators: the attack draws from ``seed`` alone."""
    cuda = [x.device] if x.device.type == "cuda" else []
    with frozen_parameters(model), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _check(norm: str, eps: float) -> str:
    if norm not in AUTOATTACK_NORMS:
        raise ValueError(f"norm must be one of {sorted(AUTOATTACK_NORMS)}, got {norm!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return AUTOATTACK_NORMS[norm]


def until_broken(x: torch.Tensor, y: torch.Tensor, runs: Iterator[Run]) -> torch.Tensor:
    """Run each of ``runs`` in turn on the rows no earlier run broke; every row's last point.

    An example broken once stays broken (its adversarial point is kept), so later restarts and target
    classes spend work only on what is still standing, as in the reference code.
    """
    x_adv, live = x.clone(), torch.arange(len(y), device=x.device)
    for run in runs:
        if not len(live):
            break
        points, broken = run(x[live], y[live])
        x_adv[live] = points.to(x_adv.dtype)
        live = live[~broken]
    return x_adv


def _apgd_run(attack) -> Run:
    """One run of a reference APGD object from a fresh random start: its adversarial point where it broke the
    example, its highest-loss point elsewhere (so a caller can rank what survived by how close it came)."""
    def run(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attack.init_hyperparam(x)
        highest_loss, still_right, _, adversarial = attack.attack_single_run(x.float(), y)
        broken = still_right == 0
        return torch.where(broken.view(-1, *[1] * (x.dim() - 1)), adversarial, highest_loss).detach(), broken
    return run


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf", loss: str = "ce",
         steps: int = 100, restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """APGD (Croce & Hein 2020): projected gradient ascent on ``loss`` (``ce`` or ``dlr``) with momentum and a
    step size that halves at checkpoints where the loss stopped rising; the reference ``APGDAttack``.

    Args:
        model: (B, C, H, W) pixels in [0, 1] -> (B, K) logits, in eval mode. x: (B, C, H, W) in [0, 1].
        y: (B,) int64. eps: radius in pixel units. norm: ``linf`` or ``l2``. steps: iterations per restart.
        restarts: random restarts, each only on the examples earlier ones left correctly classified.
        seed: the random starts' seed.

    Returns:
        (B, C, H, W), detached, inside the eps-ball of x and [0, 1]: adversarial where the attack succeeded,
        elsewhere the highest-loss point it found.
    """
    require_autoattack()
    from pyautoattack.autopgd_base import APGDAttack

    reference_norm = _check(norm, eps)
    if eps == 0 or len(y) == 0:
        return x.detach()
    attack = APGDAttack(model, n_iter=steps, norm=reference_norm, n_restarts=1, eps=eps, seed=seed, loss=loss,
                        device=x.device)
    with _reference_run(model, x, seed):
        return until_broken(x.detach(), y, (_apgd_run(attack) for _ in range(restarts)))


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                  targets: int = 9, steps: int = 100, restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, towards each of the ``targets`` classes the
    model ranks highest after the true one (the 2nd, 3rd, ... logit), in turn, each only on the examples no
    earlier target broke; the reference ``APGDAttackTargeted``. Needs at least 4 classes (DLR-T reads the 3rd
    and 4th largest logits). Arguments and result as `apgd`."""
    require_autoattack()
    from pyautoattack.autopgd_base import APGDAttack_targeted

    reference_norm = _check(norm, eps)
    if eps == 0 or len(y) == 0:
        return x.detach()
    attack = APGDAttack_targeted(model, n_iter=steps, norm=reference_norm, n_restarts=1, eps=eps, seed=seed,
                                n_target_classes=targets, device=x.device)
    base = _apgd_run(attack)

    def towards(rank: int) -> Run:
        def run(x_live: torch.Tensor, y_live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                attack.y_target = model(x_live).sort(dim=1)[1][:, -rank]
            return base(x_live, y_live)
        return run

    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    ranks = range(2, min(targets, num_classes - 1) + 2)
    with _reference_run(model, x, seed):
        return until_broken(x.detach(), y, (towards(rank) for rank in ranks for _ in range(restarts)))


def fab_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                 targets: int = 9, steps: int = 100, restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """FAB-T (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
    attack"): steps towards the linearised decision boundary with each of the ``targets`` classes the model
    ranks highest after the true one, in turn, each only on what earlier targets left standing; the reference
    ``FABAttack_PT`` with AutoAttack's settings (its third attack). A point it finds beyond eps is discarded.

    Returns:
        (B, C, H, W), detached, inside the eps-ball of x and [0, 1]: adversarial where the attack succeeded,
        x itself elsewhere. Other arguments as `apgd_targeted`.
    """
    require_autoattack()
    from pyautoattack.fab_pt import FABAttack_PT

    reference_norm = _check(norm, eps)
    if eps == 0 or len(y) == 0:
        return x.detach()
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    attack = FABAttack_PT(model, norm=reference_norm, n_restarts=restarts, n_iter=steps, eps=eps, seed=seed,
                          targeted=True, n_target_classes=min(targets, num_classes - 1), device=x.device)
    with _reference_run(model, x, seed):
        return attack.perturb(x.detach().float(), y).detach()


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
           queries: int = 5000, p_init: float = 0.8, restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """Square Attack (Andriushchenko et al. 2020): a gradient-free random search on the margin loss, changing
    one square patch per query and keeping it when the margin falls; the reference ``SquareAttack`` with
    AutoAttack's settings. It needs no gradient, so a model whose gradients mislead cannot fool it.

    Args:
        queries: model queries per example (AutoAttack: 5,000); it stops early on each broken example.
        p_init: the first patch's share of the image; the schedule that shrinks it follows 10,000 queries,
            as in AutoAttack. Other arguments as `apgd`.

    Returns:
        (B, C, H, W), detached, in the eps-ball of x and [0, 1]; rows it could not break are x itself.
    """
    require_autoattack()
    from pyautoattack.square import SquareAttack

    reference_norm = _check(norm, eps)
    if eps == 0 or len(y) == 0:
        return x.detach()
    if norm == "l2" and not square_l2_fits(x.shape[-2], x.shape[-1]):
        raise ConfigError(
            f"The L2 Square attack cannot handle {x.shape[-2]}x{x.shape[-1]} images: its initial grid of squares "
            "runs past the image edge (a limitation of the reference code; 28x28 and 32x32 work).")
    attack = SquareAttack(model, norm=reference_norm, n_queries=queries, eps=eps, p_init=p_init, n_restarts=restarts,
                          seed=seed, loss="margin", resc_schedule=False, device=x.device)
    with _reference_run(model, x, seed), torch.no_grad():
        return attack.perturb(x.detach().float(), y).detach()
