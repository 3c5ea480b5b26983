"""``advcli eval``: a checkpoint (or weights, or a RobustBench model), the settings to evaluate it with (unset ones
from its training run), the evaluation (`advcli.evaluation.evaluate.evaluate_model`) and its report.

``advcli eval ckpt=PATH`` rebuilds the model from the checkpoint alone (architecture, classes, dataset and its
normalisation are stored in it) and evaluates it; eps (one value or a list: a robustness curve), norm, restarts,
attack steps, split and number of examples can be overridden and default to the training run's values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from omegaconf import DictConfig

from advcli import config, data, distributed, models, runtime
from advcli.attacks import checks as attack_checks
from advcli.errors import ConfigError
from advcli.evaluation import leaderboard
from advcli.evaluation.evaluate import eval_settings, evaluate_model, evaluation_attack_configs
from advcli.models import sources
from advcli.runs import checkpoint, paths, report, tracking

SPLITS = ("train", "test")

log = logging.getLogger(__name__)


def eval_attack_configs(cfg: DictConfig, spec: Mapping[str, Any]) -> dict[str, Any]:
    """`evaluation_attack_configs` plus the attack picked with ``attack=NAME`` (e.g. ``attack=autoattack``)."""
    attack_cfgs = evaluation_attack_configs(cfg.evaluation, spec)
    extra = cfg.get("attack")
    if extra is not None:
        name = config.choice_name(extra, "attack")
        if name in attack_cfgs:
            raise ConfigError(
                f"attack={name}: the evaluation already runs an attack named {name}; change it with "
                f"evaluation.attacks.{name}.KEY=VALUE (e.g. evaluation.attacks.{name}.steps=100) instead.")
        config.check_attack("attack", extra)
        attack_cfgs[name] = extra
    return attack_cfgs


@dataclass
class CheckpointEvaluation:
    """What `evaluate_checkpoint` checked before any work: the checkpoint and the settings to evaluate it with."""

    cfg: DictConfig
    payload: dict[str, Any]
    settings: config.RunSettings
    attack_cfgs: dict[str, Any]
    split: str
    where: str            # the model's name in reports: the checkpoint's path, the weights' or robustbench:NAME

    @property
    def spec(self) -> dict[str, Any]:
        return self.payload["model_spec"]


def check_eval_settings(cfg: DictConfig) -> CheckpointEvaluation:
    """Load the model (`sources.eval_payload`: ckpt, weights or robustbench), fill unset eps/norm/restarts from its
    training run, check every value (each eps once)."""
    tracking.check(cfg)  # the loggers and their libraries, before any work
    config.check_evaluation_config(cfg.evaluation)
    payload, where = sources.eval_payload(cfg)
    if payload["model_spec"].get("adversarial_class"):
        evaluate_flagging_model_as_trained(cfg, where)
    config.fill_from_training_run(cfg, payload["config"], ("eps", "norm", "restarts"))
    sources.check_eps_known(cfg, where)
    spec = payload["model_spec"]
    s = config.run_settings(cfg, dim=spec["in_channels"] * spec["image_size"] ** 2, allow_eps_list=True)
    attack_cfgs = eval_attack_configs(cfg, spec)
    attack_checks.check_evaluation_attacks(attack_cfgs, norm=s.norm, num_classes=models.num_outputs(spec),
                                    adversarial_class=bool(spec.get("adversarial_class")))
    split = config.require_choice("split", cfg.split, SPLITS)
    if cfg.model_info.path is not None:
        cascaded = set(cfg.evaluation.attacks) if cfg.evaluation.get("cascade") else set()
        leaderboard.check_protocol(attack_cfgs, num_examples=s.num_test, split=split, eps_values=s.eps_values,
                                   amp=cfg.evaluation.amp, cascaded=cascaded)
    return CheckpointEvaluation(cfg, payload, s, attack_cfgs, split, where)


def evaluate_flagging_model_as_trained(cfg: DictConfig, where: str) -> None:
    """A model with an adversarial-input output (trainer=adv_class) gets the evaluation advcli train gives it,
    ``fast`` with its adaptive attacks, in place of the default, whose reference attacks are not adaptive to
    the flag; the settings every preset shares (num_examples, batch_size, seed, amp) are carried over."""
    if cfg.evaluation.get("name") != "default" or cfg.get("adv_class_evaluation") is None:
        return
    shared = {key: cfg.evaluation[key] for key in ("num_examples", "batch_size", "seed", "amp")}
    cfg.evaluation = cfg.adv_class_evaluation
    cfg.evaluation.update(shared)
    log.info("%s has an adversarial-input output (trainer=adv_class): evaluating it with evaluation=fast and its "
             "adaptive attacks, as advcli train does", where)


def load_examples(job: CheckpointEvaluation, device: torch.device) -> tuple[str, data.ImageSet]:
    """The dataset's name and the examples to evaluate on (the split's first ``evaluation.num_examples``)."""
    dataset = config.dataset_choice(job.payload["config"]["dataset"])
    if job.spec.get("classes"):  # named classes (an image folder): the labels mean what they meant in training
        now = list(data.dataset_info(dataset.name, **dataset.options).classes or [])
        if now != job.spec["classes"]:
            raise checkpoint.CheckpointError(
                f"{job.where} was trained on the classes {job.spec['classes']}, and the data now has {now}: its "
                "outputs would be scored against other labels. Evaluate it on the data it was trained on.")
    images = data.load_split(dataset.name, job.split, root=job.settings.data_root, download=job.cfg.data.download,
                             **dataset.options)
    if job.settings.num_test is not None:
        images = images.subset(slice(0, job.settings.num_test))
    spec = job.spec
    if tuple(images.images.shape[1:]) != (spec["in_channels"], spec["image_size"], spec["image_size"]):
        raise checkpoint.CheckpointError(
            f"{job.where} expects {spec['in_channels']}x{spec['image_size']}x{spec['image_size']} "
            f"images, but {dataset.name} has {'x'.join(map(str, images.images.shape[1:]))}.")
    return dataset.name, images.to(device)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """``advcli eval``: the checkpoint's model on its dataset, at the asked (or trained) settings; metrics.json."""
    started = time.perf_counter()
    job = check_eval_settings(cfg)
    with distributed.joined(runtime.resolve_device(cfg.device)) as (ranks, device):
        out = distributed.same_on_all_ranks(paths.output_dir(cfg) if ranks.is_main else None)
        rebuilt = models.rebuild_model(job.payload, job.where, recorded=cfg.get("ckpt") is not None)
        dataset, images = load_examples(job, device)
        model, channels_last = runtime.prepare_model(rebuilt, device, cfg.channels_last)
        if cfg.save_checkpoint is not None and ranks.is_main:
            sources.save_imported(job.payload, cfg.save_checkpoint)
        amp_dtype = runtime.resolve_amp(cfg.evaluation.amp, device)
        added = (config.choice_name(cfg.attack, "attack"),) if cfg.get("attack") is not None else ()
        settings = eval_settings(cfg.evaluation, job.settings, amp_dtype=amp_dtype, channels_last=channels_last,
                                 adversarial_class=bool(job.spec.get("adversarial_class")),
                                 progress=cfg.progress and ranks.is_main, desc=job.split, extra_alone=added)
        found = evaluate_model(model, images, job.attack_cfgs, settings, ranks)
        metrics = {
            "command": "eval", "checkpoint": job.where, **sources.described(job.payload), "dataset": dataset,
            "model": job.spec["name"],
            "split": job.split, "evaluation": settings.preset, "cascade": settings.cascade,
            "eps": job.settings.eps, "eps_text": job.settings.eps_text,
            "eps_255": job.settings.eps * 255, "norm": job.settings.norm, "restarts": job.settings.restarts,
            "num_examples": len(images), "trained_epochs": job.payload.get("epoch"), "test": found.results,
            **({"curve": found.curve} if len(found.curve) > 1 else {}), "sanity": found.sanity,
            "attack_time_s": found.attack_time_s, "sanity_time_s": found.sanity_time_s,
            "wall_time_s": time.perf_counter() - started, "device": str(device),
            "precision": runtime.describe_precision(amp_dtype), "torch": torch.__version__,
            **({"processes": ranks.world} if ranks.enabled else {})}
        if ranks.is_main:
            report.write_eval_report(out, metrics, found.curve,
                                     title=f"{job.spec['name']} on {dataset} ({job.split}, {len(images)} examples)")
            if cfg.model_info.path is not None:
                write_model_info(cfg.model_info, metrics)
            tracking.record_evaluation(cfg, out, metrics)  # logger=...: nested under the checkpoint's run if logged
        return metrics


def write_model_info(about: Any, metrics: dict[str, Any]) -> None:
    """RobustBench out: the result as a leaderboard ``model_info`` entry at ``about.path``."""
    entry = leaderboard.model_info(metrics, config.plain(about))
    report.write_json(about.path, entry)
    print(f"wrote RobustBench's model_info entry to {about.path}")
