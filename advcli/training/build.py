"""A training run's objects, built from its config: every setting checked before any work (`check_settings`),
the run directory claimed (`run_directory`), then data, model, optimiser and schedule (`build_run`).

`advcli.training.train` runs the lifecycle of what is built here: resume, epochs, the final evaluation.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from advcli import attacks, config, data, distributed, models, runtime
from advcli.attacks import checks as attack_checks
from advcli.errors import ConfigError, UserError
from advcli.evaluation.evaluate import evaluation_attack_configs
from advcli.models import sources, uses_batchnorm
from advcli.runs import checkpoint, paths, tracking
from advcli.training import averaging
from advcli.training.epoch import lr_schedule, EpochPlan, Objective, Optimisation

log = logging.getLogger(__name__)


# --- check and build ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choices:
    """What the config asks for, checked: plain values and the objective, before any work."""

    settings: config.RunSettings
    dataset: config.DatasetChoice
    info: data.DatasetInfo
    objective: Objective
    attack_name: str      # as chosen on the command line (attack=pgd_margin), for every label
    trainer_name: str
    attack_mode: str      # BatchNorm's mode during the training attack: train | eval


def check_settings(cfg: DictConfig) -> Choices:
    """Every value a run depends on, checked; bad input stops here with one paragraph."""
    dataset = config.dataset_choice(cfg.dataset)
    info = data.dataset_info(dataset.name, **dataset.options)
    settings = config.run_settings(cfg, dim=info.in_channels * info.image_size**2)
    config.check_training(cfg)
    tracking.check(cfg)  # the loggers and their libraries, before any work
    attack_name, trainer_name = config.choice_name(cfg.attack, "attack"), config.choice_name(cfg.trainer, "trainer")
    attack_checks.check_attack_fits("attack", cfg.attack, norm=settings.norm, num_classes=info.num_classes, training=True)
    attack_checks.check_attack_fits("validation.attack", cfg.validation.attack, norm=settings.norm,
                             num_classes=info.num_classes)
    objective = config.instantiate("trainer", cfg.trainer, attack=config.instantiate("attack", cfg.attack))
    flagged = bool(objective.extra_outputs)
    sources.check_model(cfg.model, info, adversarial_class=flagged)  # a class of one's own: built once, here
    if flagged and config.attack_kind(cfg.validation.attack) != "pgd":
        raise ConfigError(
            f"validation.attack={config.choice_name(cfg.validation.attack, 'attack')}: a model with an adversarial-input "
            "output (trainer=adv_class) is checked each epoch with advcli's PGD, whose adaptive variant must avoid the "
            "flag; the reference attacks are not adaptive to it. Leave validation.attack at the trainer's choice (pgd).")
    config.check_evaluation_config(cfg.evaluation)
    eval_attacks = evaluation_attack_configs(cfg.evaluation, {"adversarial_class": flagged})
    attack_checks.check_evaluation_attacks(eval_attacks, norm=settings.norm,
                                    num_classes=info.num_classes + objective.extra_outputs, adversarial_class=flagged)
    if objective.needs_attack and config.attack_kind(cfg.attack) == "none":
        raise ConfigError(f"trainer={trainer_name} trains on the training attack's outputs, but attack=none makes "
                          "none, so the run would be standard training under another name. Pick a training attack, "
                          "e.g. attack=pgd or attack=fgsm attack.random_start=true.")
    mode = objective.attack_mode if cfg.attack_mode == "auto" else cfg.attack_mode
    return Choices(settings, dataset, info, objective, attack_name, trainer_name, mode)


@dataclass
class Run:
    """The objects a run is made of, built once by `build_run`."""

    cfg: DictConfig
    choices: Choices
    ranks: distributed.Ranks
    out: Path
    spec: dict[str, Any]
    model: nn.Module                # the bare model: checkpoints, attacks, evaluation
    net: nn.Module                  # what training's forward passes go through (DDP and/or compiled)
    channels_last: bool
    opt: Optimisation
    eval_amp_dtype: torch.dtype | None
    train_set: data.ImageSet
    val_set: data.ImageSet
    test_set: data.ImageSet
    val_attacks: dict[str, attacks.Attack]
    fingerprint: dict[str, Any]     # the settings that define this run (`advcli.config.fingerprint`)
    steps_per_epoch: int
    started_from: dict[str, Any] | None = None   # init=: the weights training started from (`sources.initialise`)
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)  # logger=...: set by `train`

    @property
    def adversarial_class(self) -> bool:
        return bool(self.spec["adversarial_class"])

    @property
    def eval_model(self) -> nn.Module:
        """The model that is validated, evaluated and saved as the run's: the EMA of the weights when
        ``ema.decay`` is set, else the trained weights themselves."""
        return self.model if self.opt.ema is None else self.opt.ema.module

    def epoch_plan(self, epoch: int) -> EpochPlan:
        cfg, size = self.cfg, len(self.train_set)
        awp_gamma, awp_warmup = config.awp_settings(cfg)
        return EpochPlan(eps=self.choices.settings.eps, epoch=epoch, total=self.steps_per_epoch,
                         warmup_steps=round(float(cfg.eps_warmup) * self.steps_per_epoch),
                         steps_before=(epoch - 1) * self.steps_per_epoch, attack_mode=self.choices.attack_mode,
                         awp_gamma=awp_gamma, awp_warmup_steps=round(awp_warmup * self.steps_per_epoch),
                         global_batch_size=lambda k: min(cfg.batch_size, size - (k - 1) * cfg.batch_size),
                         progress_bar=cfg.progress and self.ranks.is_main, log_every=cfg.log_every,
                         on_sync=self.tracker.on_batches(epoch, self.steps_per_epoch) if cfg.log_batches else None)


def load_data(cfg: DictConfig, choices: Choices, device: torch.device) -> tuple[data.ImageSet, ...]:
    """Training split, held-out slice of it (the per-epoch robust check; never the test set) and test split."""
    s, dataset = choices.settings, choices.dataset
    train_full = data.load_split(dataset.name, "train", root=s.data_root, download=cfg.data.download, **dataset.options)
    test_set = data.load_split(dataset.name, "test", root=s.data_root, download=cfg.data.download, **dataset.options)
    n_val = min(int(cfg.data.val_size), len(train_full) // 10)
    train_set = train_full.subset(slice(0, len(train_full) - n_val))
    val_set = train_full.subset(slice(len(train_full) - n_val, len(train_full)))
    if cfg.data.train_size is not None:
        train_set = train_set.subset(slice(0, int(cfg.data.train_size)))
    if s.num_test is not None:
        test_set = test_set.subset(slice(0, s.num_test))
    return train_set.to(device), val_set.to(device), test_set.to(device)


def run_directory(cfg: DictConfig, ranks: distributed.Ranks) -> Path:
    """The run directory, made and claimed by rank 0 for this run (`advcli.runs.paths.claim`: another live process in
    it is refused); every rank gets it, or the same refusal, so that no rank waits for one that has given up."""
    found: Path | UserError | None = None
    if ranks.is_main:
        try:
            found = paths.output_dir(cfg)
        except UserError as error:
            found = error
    found = distributed.same_on_all_ranks(found)
    if isinstance(found, UserError):
        raise found
    return found


def build_run(cfg: DictConfig, choices: Choices, ranks: distributed.Ranks, device: torch.device, out: Path) -> Run:
    """Data, model, optimiser and schedule, on this rank's device, for the run directory ``out``."""
    if not ranks.is_main:  # one log, from rank 0
        logging.getLogger().setLevel(logging.WARNING)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    s, info = choices.settings, choices.info
    log.info("%s training with %s, eps %s (%s); device %s, %s, run directory %s%s", choices.trainer_name,
             choices.attack_name, config.format_eps(s.eps), s.norm, device, runtime.describe_precision(amp_dtype), out,
             f", {ranks.world} processes" if ranks.enabled else "")
    runtime.seed_everything(cfg.seed)
    train_set, val_set, test_set = load_data(cfg, choices, device)
    spec = sources.spec_from_config(cfg.model, info, adversarial_class=bool(choices.objective.extra_outputs))
    model = models.build_from_spec(spec)
    fresh = checkpoint.resume_point(cfg.resume, out / "checkpoint.pt") is None  # a resumed run has its weights
    started_from = None if cfg.init is None or not fresh else sources.initialise(
        model, cfg.init, cfg.init_head, spec, robustbench_dir=cfg.robustbench_dir, key=cfg.weights_key)
    model, channels_last = runtime.prepare_model(model, device, cfg.channels_last)
    net = distributed.wrap(torch.compile(model) if cfg.compile else model, ranks, device)
    if ranks.enabled:  # the same initial weights everywhere (seeded above); each rank its own random starts
        torch.manual_seed(cfg.seed + 1_000_003 * ranks.rank)
    optimizer = config.instantiate("optimizer", cfg.optimizer)(model.parameters())
    steps_per_epoch = data.num_batches(len(train_set), cfg.batch_size)
    scheduler = lr_schedule(cfg.lr_schedule, optimizer, total_steps=cfg.epochs * steps_per_epoch,
                            peak=float(cfg.lr_peak))
    val_attacks = {"clean": attacks.none, "robust": config.instantiate("validation.attack", cfg.validation.attack)}
    if spec["adversarial_class"]:  # the flag counts as a defence only against an attack that tries to avoid it
        val_attacks["pgd_adaptive"] = functools.partial(val_attacks["robust"], loss="rejection_margin")
    if choices.attack_mode == "eval" and uses_batchnorm(model):
        log.info("the training attack runs with BatchNorm in eval mode (attack_mode=%s)", cfg.attack_mode)
    decay = cfg.ema.decay
    return Run(cfg, choices, ranks, out, spec, model, net, channels_last,
               Optimisation(optimizer, scheduler, runtime.grad_scaler(device, amp_dtype), amp_dtype,
                            averaging.ema_model(model, float(decay)) if decay is not None else None),
               runtime.resolve_amp(cfg.evaluation.amp, device), train_set, val_set, test_set, val_attacks,
               config.fingerprint(cfg, precision=runtime.describe_precision(amp_dtype)), steps_per_epoch, started_from)
