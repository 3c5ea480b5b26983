"""The attacks wing: the inner maximisation, one signature for all, ``attack(model, x, y, eps, ...) -> x_adv``.

- `gradient`: the attacks advcli writes (FGSM, PGD), on `losses` (what they maximise) and `balls` (the threat
  models, where an attack starts, how it steps);
- `reference`: AutoAttack's attacks (APGD-CE, APGD-T, FAB-T, Square, AutoAttack itself) from the reference code.

Imports only the shared top level (`advcli.errors`); knows nothing of data, models, runs, evaluation or training.
The names below are re-exported so ``from advcli import attacks; attacks.pgd(...)`` reads as it always did.
"""

from advcli.attacks.gradient import (Attack, cross_entropy, margin, dlr, kl_divergence, rejection_margin, LOSSES,
    still_safe, project_linf, project_l2, random_linf, random_l2, ascent_linf, ascent_l2, ThreatModel,
    THREAT_MODELS, frozen_parameters, gradient_and_logits, input_gradient, take, start_point, none, pgd, fgsm,
    Start, as_start, START_FLAGS, start_from_flags, takes_start_flags, Ascent)
from advcli.attacks.reference import (AUTOATTACK_NORMS, require_autoattack, square_l2_fits,
    autoattack_restarts_refused, AUTOATTACK_PARTS, autoattack, until_broken, apgd, apgd_targeted, fab_targeted,
    square)

__all__ = [name for name in dir()
           if not name.startswith("_") and name not in ("gradient", "reference", "losses", "balls", "annotations")]
