"""Can this attack config run in this run? Checked before any work, from the config alone: the run's threat
model, the model's classes, an attack meant for training or only for evaluation, and AutoAttack's own rules.
Every AutoAttack applicability rule lives here (the reference attacks check their arguments with the same
helpers when called from Python)."""

from __future__ import annotations

from typing import Any, Mapping

from advcli.attacks.reference import AUTOATTACK_PARTS, autoattack_restarts_refused
from advcli.config import attack_kind, check_attack
from advcli.errors import ConfigError


# AutoAttack's attacks one at a time (advcli.attacks.reference): evaluation attacks, not adaptive to an adv_class flag
REFERENCE_ATTACKS = ("apgd", "apgd_targeted", "fab_targeted", "square")


def check_attack_fits(where: str, attack_cfg: Any, *, norm: str, num_classes: int, training: bool = False) -> None:
    """Check that an attack config can run in this run: the run's threat model, the model's classes, and (for
    the training attack) an attack meant for training. Everything here is known before any work starts."""
    kind = attack_kind(attack_cfg)
    if training and kind in REFERENCE_ATTACKS:
        raise ConfigError(
            f"{where}: {kind} is an evaluation attack of the reference AutoAttack code (it only asks whether an "
            "input can be broken and stops there); it cannot be the training attack. Train with attack=pgd (or "
            "fgsm); the final evaluation (evaluation=default) runs it on the trained model.")
    if training and kind == "autoattack":
        raise ConfigError(
            "attack=autoattack is an evaluation attack (an ensemble that only asks whether an input can be broken, "
            "and costs thousands of steps per example); it cannot be the training attack. Train with attack=pgd "
            "(or fgsm) and evaluate with advcli eval ckpt=PATH attack=autoattack, or add it to the final evaluation "
            "with +attack@evaluation.attacks.autoattack=autoattack.")
    if "norm" in attack_cfg and attack_cfg.norm != norm:
        raise ConfigError(
            f"{where}.norm={attack_cfg.norm} differs from the run's norm={norm}: eps={norm} radius would be spent in "
            f"another threat model and the run recorded under the wrong one. One run has one threat model: set "
            f"norm={attack_cfg.norm} (every attack follows it) and leave {where}.norm unset.")
    if attack_cfg.get("loss") == "dlr" and num_classes < 3:
        raise ConfigError(
            f"{where}.loss=dlr needs at least 3 classes (it divides the margin by the gap between the first and "
            f"third largest logits), but this model has {num_classes}. Use {where}.loss=margin or ce.")
    if kind == "autoattack" and int(attack_cfg.get("restarts", 1)) != 1:
        raise ConfigError(autoattack_restarts_refused(int(attack_cfg.restarts)))
    parts = attack_cfg.get("attacks") if kind == "autoattack" else None
    if parts is not None and (not parts or set(parts) - set(AUTOATTACK_PARTS)):
        raise ConfigError(f"{where}.attacks={list(parts)}: AutoAttack's attacks are {', '.join(AUTOATTACK_PARTS)}; "
                          f"pick some of them (e.g. {where}.attacks=[apgd-ce,apgd-t]) or null for the whole version.")
    if kind in ("autoattack", "apgd_targeted", "fab_targeted") and num_classes < 4:
        raise ConfigError(f"AutoAttack's targeted DLR loss needs at least 4 classes, but this model has {num_classes}; "
                          f"evaluate it with evaluation=fast (PGD on the cross-entropy and a margin loss), or leave "
                          f"{where} out.")


def check_evaluation_attacks(attack_cfgs: Mapping[str, Any], *, norm: str, num_classes: int,
                             adversarial_class: bool = False) -> None:
    """`check_attack` and `check_attack_fits` for every evaluation attack, and no AutoAttack against a model with
    an "adversarial input" output: it stops where an input lands on the flag, and counted with rejection that
    overstates the defence."""
    for name, attack_cfg in attack_cfgs.items():
        check_attack(f"evaluation.attacks.{name}", attack_cfg)
        check_attack_fits(f"evaluation.attacks.{name}", attack_cfg, norm=norm, num_classes=num_classes)
        if adversarial_class and attack_kind(attack_cfg) in ("autoattack", *REFERENCE_ATTACKS):
            raise ConfigError(
                f"evaluation.attacks.{name}: AutoAttack and its attacks are not adaptive to the adversarial-input "
                "output of this model (trainer=adv_class): they count an input as broken as soon as it lands on the "
                "flag and stop there, so its accuracy with rejection would overstate the defence. Evaluate such a "
                "model with evaluation=fast, whose adaptive PGD (evaluation.adaptive_attacks.pgd_adaptive) must "
                "avoid the flag.")
