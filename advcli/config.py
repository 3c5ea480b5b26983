"""Config values as the user types them -> checked plain values, before any work starts.

Hydra hands us strings like ``eps=8/255``; `advcli.values` turns single values into numbers with
`fractions.Fraction` (never `eval`), and this module checks every setting a run depends on, so that bad input
stops the run at once with a one-paragraph `ConfigError` instead of failing an hour later. It also says what a
run is: the fingerprint a resumed run must match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

import hashlib
import inspect
import json

import hydra
from omegaconf import OmegaConf

from advcli.errors import ConfigError
from advcli.values import (format_eps, parse_eps, require_between, require_choice, require_int,  # noqa: F401
                           require_positive)

NORMS = ("linf", "l2")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LR_SCHEDULES = ("constant", "onecycle", "cosine")
ATTACK_MODES = ("auto", "train", "eval")


def check_trainer(trainer_cfg: Any) -> None:
    """Check the training objective's own settings (`advcli.training.objectives`)."""
    if "beta" in trainer_cfg:
        require_between("trainer.beta", trainer_cfg.beta, 0, None,
                        "TRADES and MART weigh their KL term by beta: 6 in both papers on CIFAR-10; a smaller beta "
                        "keeps more clean accuracy.")
    if "adv_weight" in trainer_cfg:
        require_between("trainer.adv_weight", trainer_cfg.adv_weight, 0, 1,
                        "It is the weight of the adversarial half of the loss; the clean half gets 1 - adv_weight.")


def awp_settings(cfg: Any) -> tuple[float, float]:
    """``(awp.gamma, awp.warmup)`` checked: adversarial weight perturbation's relative size (0: off) and the
    epochs trained without it first (`advcli.training.awp`)."""
    gamma = require_between("awp.gamma", cfg.awp.gamma, 0, None,
                            "It is the size of the weight perturbation relative to each layer's weights: 0 turns "
                            "it off; the paper uses 5e-3 (TRADES) to 1e-2 (PGD training).")
    warmup = require_between("awp.warmup", cfg.awp.warmup, 0, None,
                             "It is the number of epochs trained without the perturbation before it starts "
                             "(0: from the first step).")
    if gamma > 0 and warmup >= float(cfg.epochs):
        raise ConfigError(
            f"awp.warmup={cfg.awp.warmup} is not below epochs={cfg.epochs}: adversarial weight perturbation "
            f"(awp.gamma={cfg.awp.gamma}) would never start, yet the run would be recorded as an AWP run. Lower "
            "awp.warmup (the epochs trained without it first), raise epochs, or set awp.gamma=0 to train without it.")
    return gamma, warmup


def check_attack(where: str, attack_cfg: Any) -> None:
    """Check the hyper-parameters an attack config may carry (steps, restarts, norm, alpha, random start)."""
    if attack_cfg is None:
        return
    if "steps" in attack_cfg:
        require_int(f"{where}.steps", attack_cfg.steps, minimum=1, hint="An iterative attack needs at least one step.")
    if "restarts" in attack_cfg:
        require_int(f"{where}.restarts", attack_cfg.restarts, minimum=1, hint="restarts=1 runs the attack once.")
    if "norm" in attack_cfg:
        require_choice(f"{where}.norm", attack_cfg.norm, NORMS)
    if attack_cfg.get("alpha") is not None:
        require_positive(f"{where}.alpha", attack_cfg.alpha, "Leave it unset (null) for the default, a multiple of eps.")
    # the start as the configs spell it (random_start) or as the attacks do (start: advcli.attacks.balls.Start)
    at_x, random = ("random_start=false", "random_start=true") if attack_cfg.get("random_start") is False else \
        ("start=zero", "start=uniform") if attack_cfg.get("start") == "zero" else (None, None)
    if int(attack_cfg.get("restarts", 1)) > 1 and at_x:
        raise ConfigError(
            f"{where}.restarts={attack_cfg.restarts} with {where}.{at_x}: without a random start the "
            f"attack is deterministic, so every restart finds the same point and the restarts would be recorded but "
            f"never happen. Set {where}.{random} to restart from random points of the ball, or "
            f"{where}.restarts=1 (restarts=N on the command line also sets the evaluation PGD's restarts).")


# evaluation settings of earlier versions, which made the number depend on guesses (README "Evaluating a checkpoint")
RETIRED_EVALUATION_KEYS = {
    "focus": "Square took the survivors closest to the boundary a share at a time and stopped at the first share "
             "that broke nothing, a guess that can miss what it could break",
    "escalate": "stronger settings were used only for batches where gradients looked misleading, a per-batch guess",
}


def check_evaluation_config(evaluation_cfg: Any) -> None:
    """Refuse settings that would not reach an attack: retired keys, and one name used twice."""
    for key, why in RETIRED_EVALUATION_KEYS.items():
        if evaluation_cfg.get(key):
            raise ConfigError(
                f"evaluation.{key} is no longer a setting ({why}); every attack of the default evaluation now runs "
                f"on every example the attacks before it left standing, at its full budget. Remove evaluation.{key}; "
                "for a cheaper evaluation lower an attack's budget (e.g. evaluation.attacks.square.queries=1000), "
                "which the results then show, or use evaluation=fast.")
    alone, chained = set(evaluation_cfg.get("standalone_attacks") or {}), set(evaluation_cfg.get("attacks") or {})
    if alone & chained:
        name = sorted(alone & chained)[0]
        raise ConfigError(f"evaluation.standalone_attacks.{name} and evaluation.attacks.{name}: one name for two "
                          "attacks would make one row hide the other. Rename one of them.")


# --- from config to objects: one place, so a config's `name` never reaches a function as a keyword ----------

def attack_kind(node: Any) -> str:
    """The function behind an attack (or objective) config: ``advcli.attacks.pgd`` -> ``pgd``."""
    return str(node["_target_"]).rsplit(".", 1)[-1]


def choice_name(node: Any, group: str = "") -> str:
    """What a config of a group was called on the command line: its ``name`` key (every config advcli ships
    has one), else Hydra's runtime choice for ``group``, else the function behind it."""
    if node.get("name"):
        return str(node["name"])
    from hydra.core.hydra_config import HydraConfig

    if group and HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    return attack_kind(node)


def training_label(run_cfg: Any) -> str:
    """How a run was trained, from its (stored) config: ``pgd-trained``, ``trades (pgd)``, ``adv_class (fgsm)``;
    for a model advcli did not train (`advcli.models.sources`), ``imported (its file or zoo name)``."""
    if "imported" in run_cfg:
        return f"imported ({run_cfg['imported']})"
    attack = choice_name(run_cfg["attack"], "attack")
    trainer = renamed_choice("trainer", choice_name(run_cfg["trainer"], "trainer")) if "trainer" in run_cfg else "minmax"
    return f"{attack}-trained" if trainer == "minmax" else f"{trainer} ({attack})"


def plain(node: Any) -> dict[str, Any]:
    """A config node as a plain, resolved dict."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def instantiate(where: str, node: Any, **extra: Any) -> Any:
    """``hydra.utils.instantiate`` of an attack or objective config, without its ``name``; a key the function
    does not take stops the run here with a ConfigError (a partial would only fail at its first call)."""
    settings = {k: v for k, v in plain(node).items() if k != "name"}
    target = hydra.utils.get_method(settings["_target_"]) if "." in settings["_target_"] else None
    if target is not None:
        keywords = {k: v for k, v in settings.items() if not k.startswith("_")}
        parameters = inspect.signature(target).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [k for k in [*keywords, *extra] if k not in parameters and not takes_any]
        if unknown:
            known = [k for k, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                     or (p.default is not inspect.Parameter.empty and k != "eps")]
            raise ConfigError(
                f"{where}.{unknown[0]} is not a setting of {attack_kind(settings)}; its settings are: "
                f"{', '.join(known) or 'none'}. Remove it (or pick another {where.split('.')[0]} config).")
    return hydra.utils.instantiate(settings, **extra)


@dataclass(frozen=True)
class DatasetChoice:
    """The dataset a run uses: its name, generator options (synthetic only) and augmentation."""

    name: str
    options: dict
    crop_padding: int
    flip: bool


def dataset_choice(dataset_cfg: Any) -> DatasetChoice:
    plain = OmegaConf.to_container(dataset_cfg, resolve=True) if OmegaConf.is_config(dataset_cfg) else dict(dataset_cfg)
    name = plain.pop("name")
    crop_padding = require_int("dataset.crop_padding", plain.pop("crop_padding", 0), minimum=0)
    flip = bool(plain.pop("flip", False))
    return DatasetChoice(name=name, options=plain, crop_padding=crop_padding, flip=flip)


def data_root(value: Any) -> str:
    """The data folder as an absolute path (``~`` expanded); relative paths are from the working directory."""
    return str(Path(os.path.expanduser(str(value))).resolve())


@dataclass(frozen=True)
class RunSettings:
    """The checked, plain values a training or evaluation run needs from its config."""

    eps_values: tuple[tuple[float, str], ...]  # (value, as typed), ascending; training has one
    norm: str
    restarts: int
    eval_batch_size: int
    num_test: int | None
    data_root: str

    @property
    def eps(self) -> float:
        """The run's eps (for an evaluation over a list: the largest, whose results fill the table)."""
        return self.eps_values[-1][0]

    @property
    def eps_text(self) -> str:
        return self.eps_values[-1][1]


def eps_values(value: Any, *, norm: str, dim: int | None, allow_list: bool) -> tuple[tuple[float, str], ...]:
    """``eps`` as ``((value, as typed), ...)``, ascending and each value once: one eps, or for an evaluation a
    list (``eps=[0,1/255,2/255]``, a robustness curve)."""
    texts = [str(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [str(value)]
    if not texts:
        raise ConfigError("eps=[] is an empty list; give one eps (eps=8/255) or several (eps=0,2/255,4/255,8/255).")
    if len(texts) > 1 and not allow_list:
        raise ConfigError(f"eps={','.join(texts)}: a training run has one eps. Sweep over several with -m "
                          f"(advcli train -m eps={','.join(texts)}), one run each.")
    parsed = {parse_eps(text, norm=norm, dim=dim): text for text in texts}
    return tuple(sorted(parsed.items()))


def run_settings(cfg: Any, *, dim: int | None = None, allow_eps_list: bool = False) -> RunSettings:
    """Check the values shared by ``advcli train`` and ``advcli eval`` (eps, norm, restarts, sizes, attacks);
    every eps is parsed here, once."""
    norm = require_choice("norm", cfg.norm, NORMS)
    eps = eps_values(cfg.eps, norm=norm, dim=dim, allow_list=allow_eps_list)
    restarts = require_int("restarts", cfg.restarts, minimum=1, hint="restarts=1 runs each attack once.")
    eval_batch_size = require_int("evaluation.batch_size", cfg.evaluation.batch_size, minimum=1)
    num_test = cfg.evaluation.num_examples
    if num_test is not None:
        num_test = require_int("evaluation.num_examples", num_test, minimum=1, hint="Use null for the whole split.")
    for name, attack_cfg in cfg.evaluation.attacks.items():
        check_attack(f"evaluation.attacks.{name}", attack_cfg)
    require_choice("evaluation.amp", cfg.evaluation.amp, AMP_MODES)
    require_int("evaluation.seed", cfg.evaluation.seed, minimum=0)
    return RunSettings(eps_values=eps, norm=norm, restarts=restarts, eval_batch_size=eval_batch_size,
                       num_test=num_test, data_root=data_root(cfg.data.root))


def fill_from_training_run(cfg: Any, trained: Mapping[str, Any], keys: tuple[str, ...] = ("eps", "norm")) -> None:
    """Set the ``keys`` left unset (null) in an ``advcli eval``/``viz`` config to the training run's values, so that
    interpolations such as ``${eps}`` and ``${norm}`` in the attack configs resolve to them."""
    for key in keys:
        if cfg[key] is None:
            cfg[key] = trained[key]


def check_training(cfg: Any) -> None:
    """Check the values only ``advcli train`` uses."""
    require_int("epochs", cfg.epochs, minimum=1)
    require_int("batch_size", cfg.batch_size, minimum=1)
    require_choice("amp", cfg.amp, AMP_MODES)
    require_positive("lr", cfg.lr)
    require_int("seed", cfg.seed, minimum=0)
    if float(cfg.eps_warmup) < 0:
        raise ConfigError(f"eps_warmup={cfg.eps_warmup} is negative; it is a number of epochs (0: no warm-up).")
    require_choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    if not 0 < float(cfg.lr_peak) < 1:
        raise ConfigError(f"lr_peak={cfg.lr_peak} must lie strictly between 0 and 1: it is the fraction of training "
                          "at which the one-cycle learning rate peaks (0.5: the middle).")
    require_choice("attack_mode", cfg.attack_mode, ATTACK_MODES)
    require_int("data.val_size", cfg.data.val_size, minimum=0)
    if cfg.data.train_size is not None:
        require_int("data.train_size", cfg.data.train_size, minimum=1, hint="Use null for the whole split.")
    require_choice("overfit_guard.action", cfg.overfit_guard.action, ("rollback", "stop", "warn", "off"))
    decay = (cfg.get("ema") or {}).get("decay")
    if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay < 1):
        raise ConfigError(f"ema.decay={decay} must lie strictly between 0 and 1 (e.g. ema.decay=0.995: an average "
                          "over the last ~200 steps), or be null to evaluate the trained weights themselves.")
    require_choice("init_head", cfg.init_head, ("auto", "reset", "keep"))
    check_attack("attack", cfg.attack)
    check_attack("validation.attack", cfg.validation.attack)
    check_trainer(cfg.trainer)
    awp_settings(cfg)


# --- what a run is: the settings that define it ------------------------------------------------------

# Settings of the process, not of the experiment: they change neither what is trained nor how it is judged.
NOT_IN_FINGERPRINT = ("device", "threads", "channels_last", "compile", "resume", "keep_epochs", "output_dir", "progress",
                      "log_every", "debug", "data.root", "data.download", "robustbench_dir",
                      "logger", "log_batches")  # the trackers a run logs to never block resuming it
# Settings a resumed run may change: more (or fewer) epochs stretch what is left of the learning-rate schedule;
# the final evaluation's attacks, size and sanity probes apply to the evaluation that ends the run (its precision
# and seed also drive the per-epoch held-out check, so they stay).
MAY_CHANGE_ON_RESUME = ("epochs", "evaluation.name", "evaluation.attacks", "evaluation.adaptive_attacks",
                        "evaluation.standalone_attacks", "evaluation.batch_size",
                        "evaluation.cascade", "evaluation.focus", "evaluation.escalate", "evaluation.num_examples",
                        "evaluation.sanity")


def may_change_on_resume(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in MAY_CHANGE_ON_RESUME)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fingerprint(cfg: Any, *, precision: str) -> dict[str, Any]:
    """The settings that define a training run, as flat dotted keys: everything that changes what is trained
    or how it is evaluated (`NOT_IN_FINGERPRINT` aside). ``amp`` becomes the ``precision`` it resolved to on this
    machine, ``eps`` its value (``8/255`` and ``0.0313725...`` are the same run)."""
    flat = flatten(plain(cfg))
    kept = {key: value for key, value in flat.items()
            if not any(key == left or key.startswith(left + ".") for left in NOT_IN_FINGERPRINT)}
    kept["amp"] = precision
    kept["eps"] = float(Fraction(str(kept["eps"])))
    return kept


def fingerprint_id(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of a fingerprint (metrics.json carries it: a sweep matches results to jobs by it)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Settings added after runs were checkpointed without them, with the value that reproduces what those runs did:
# an old run continues under its defaults, and under nothing else.
ADDED_LATER = {"model.normalize": "dataset", "init": None, "init_head": "auto", "dataset.shuffle_seed": None,
               "awp.gamma": 0.0, "awp.warmup": 0, "weights_key": None}


# Where a recorded ``_target_`` now lives (the package moved into wings): a run recorded before names the same
# function by its old path, and continues as the same run.
MOVED_TARGETS = {"advcli.autoattack.": "advcli.attacks.", "advcli.objectives.": "advcli.training.objectives.",
                 "advcli.sweep.": "advcli.runs.sweep."}


# A config group's choice renamed since runs recorded it (group -> {old name: new name}): the old name still composes
# (configs/trainer/standard.yaml), and a run recorded under it is the same run, labelled by the new name.
RENAMED_CHOICES = {"trainer": {"standard": "minmax"}}


def renamed_choice(group: str, name: Any) -> Any:
    """A recorded choice of ``group`` under its current name: ``("trainer", "standard")`` -> ``"minmax"``."""
    return RENAMED_CHOICES.get(group, {}).get(name, name) if isinstance(name, str) else name


def renamed_target(value: Any) -> Any:
    """A recorded ``_target_`` under its current path."""
    for old, new in MOVED_TARGETS.items():
        if isinstance(value, str) and value.startswith(old):
            return new + value[len(old):]
    return value


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every key that differs (a missing key reads as ``<unset>``, or as its
    `ADDED_LATER` default; a moved target or renamed choice in ``old`` reads as its current name)."""
    missing = "<unset>"
    old = {**{k: v for k, v in ADDED_LATER.items() if k not in old and k in new}, **old}
    old = {key: renamed_target(value) if key.endswith("_target_")
           else renamed_choice(key.removesuffix(".name"), value) if key.endswith(".name") else value
           for key, value in old.items()}
    return [(key, old.get(key, missing), new.get(key, missing)) for key in sorted({*old, *new})
            if old.get(key, missing) != new.get(key, missing)]
