"""Robustness evaluation: `evaluate(model, batches, attacks, eps)`, the robustness curve, the sanity
report, and the ``advcli eval`` command.

`evaluate` runs the model in eval mode (BatchNorm statistics frozen, weights never updated), attacks
every batch with every attack of a dict, and returns per attack the accuracy and mean loss on the
attacked inputs, plus ``any_attack``: the accuracy when each example counts as broken if any attack
broke it. Attacks run under ``torch.no_grad`` except for their input gradients.

What each attack spends its work on: an example the model already misclassifies is broken for every
attack (x itself is an adversarial example at distance 0), so attacks see only the correctly
classified examples of each batch. Every attack runs on all of those, so each row of the table is
that attack's own robust accuracy, and the any-attack row is the per-example AND of the rows at no
extra cost. Inside an evaluation PGD (``early_stop: true``) an example broken once stays broken: it
leaves the batch, and later restarts attack only what earlier restarts left standing.

``advcli eval ckpt=PATH`` rebuilds the model from the checkpoint alone (architecture, classes,
dataset and its normalisation are stored in it) and evaluates it; eps (one value or a list: a
robustness curve), norm, restarts, attack steps, split and number of examples can be overridden and
default to the training run's values.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from advcli import attacks as attacks_module
from advcli import checkpoint, config, data, distributed, report, runtime, sanity
from advcli.attacks import Attack
from advcli.errors import ConfigError, run_guarded

log = logging.getLogger(__name__)


@dataclass
class Outcomes:
    """Per-example results of one pass: which examples each attack left correctly classified, the
    cross-entropy at each attack's output, and the seconds each attack took (attack + forward)."""

    clean: torch.Tensor                                   # bool (N,): correct without attack
    correct: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool (N,)
    loss: dict[str, torch.Tensor] = field(default_factory=dict)     # name -> float (N,)
    time_s: dict[str, float] = field(default_factory=dict)
    # models with an "adversarial input" output (trainer=adv_class): attack name -> bool (N,), the model
    # predicted the flag on the attack's output; and on the clean input (false flags). Empty / None otherwise.
    flagged: dict[str, torch.Tensor] = field(default_factory=dict)
    false_flags: torch.Tensor | None = None

    def summary(self) -> dict[str, dict[str, float]]:
        """``{name: {"acc", "loss"}, ..., "any_attack": {"acc"}}``, fractions in [0, 1]. (Times are left out,
        so that two seeded runs give equal results.)

        For a model with an "adversarial input" output each attack also gets ``flagged`` (the fraction of
        inputs predicted as the flag) and ``acc_with_rejection`` (correct or flagged: the attack failed);
        the clean row's ``flagged`` is the false-flag rate, and ``any_attack`` gets the per-example worst
        case with rejection and ``worst_attack``, the single attack with the lowest such accuracy.
        """
        n = len(self.clean)
        if n == 0:
            raise ConfigError("There were no examples to evaluate; check evaluation.num_examples and the split.")
        results = {name: {"acc": self.correct[name].sum().item() / n, "loss": self.loss[name].sum().item() / n}
                   for name in self.correct}
        unbroken = self.clean.clone()
        for hits in self.correct.values():
            unbroken &= hits
        results["any_attack"] = {"acc": unbroken.sum().item() / n}
        if self.flagged:
            # only examples right without attack count: a falsely flagged clean input is an error, not a defence
            held = self.clean.clone()
            for name, flags in self.flagged.items():
                survived = self.clean & (self.correct[name] | flags)
                held &= survived
                results[name].update(flagged=flags.sum().item() / n, acc_with_rejection=survived.sum().item() / n)
            for name in set(self.correct) - set(self.flagged):  # the clean rows
                results[name]["flagged"] = self.false_flags.sum().item() / n
            worst = min(self.flagged, key=lambda name: results[name]["acc_with_rejection"])
            results["any_attack"].update(acc_with_rejection=held.sum().item() / n, worst_attack=worst)
        return results

    def head(self, n: int) -> Outcomes:
        """The outcomes of the first ``n`` examples."""
        return Outcomes(self.clean[:n], {k: v[:n] for k, v in self.correct.items()},
                        {k: v[:n] for k, v in self.loss.items()}, dict(self.time_s),
                        {k: v[:n] for k, v in self.flagged.items()},
                        None if self.false_flags is None else self.false_flags[:n])

    def gathered(self) -> Outcomes:
        """Under torchrun: every rank's outcomes (each rank evaluated a contiguous share), in order."""
        return Outcomes(distributed.gather(self.clean), {k: distributed.gather(v) for k, v in self.correct.items()},
                        {k: distributed.gather(v) for k, v in self.loss.items()}, dict(self.time_s),
                        {k: distributed.gather(v) for k, v in self.flagged.items()},
                        None if self.false_flags is None else distributed.gather(self.false_flags))


def is_clean(attack: Attack) -> bool:
    """Whether ``attack`` is `attacks.none` (possibly bound with hyper-parameters by Hydra)."""
    return getattr(attack, "func", attack) is attacks_module.none


def attack_outcomes(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    attacks: Mapping[str, Attack], *, eps: float, amp_dtype: torch.dtype | None = None,
                    progress: bool = False, desc: str = "eval", total: int | None = None,
                    adversarial_class: bool = False) -> Outcomes:
    """Attack every batch with every attack and keep the per-example results (see `Outcomes`).

    Examples the model misclassifies without attack count as broken by every attack and are not
    attacked; the rest go to every attack. The model is put in eval mode for the pass and left in the
    mode it came in, with its weights untouched. ``adversarial_class``: the model's last output means
    "adversarial input"; record which inputs it flags.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    clean_parts: list[torch.Tensor] = []
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in attacks}
    flag_parts: dict[str, list[torch.Tensor]] = {name: [] for name in attacks if not is_clean(attacks[name])}
    false_flag_parts: list[torch.Tensor] = []
    seconds = dict.fromkeys(attacks, 0.0)
    try:
        for x, y in tqdm(batches, desc=desc, total=total, leave=False, disable=not progress, dynamic_ncols=True):
            with torch.no_grad(), runtime.autocast(device, amp_dtype):
                logits = model(x)
            predicted = logits.argmax(dim=1)
            clean = predicted == y
            if adversarial_class:
                false_flag_parts.append(predicted == logits.shape[1] - 1)
            clean_loss = F.cross_entropy(logits.float(), y, reduction="none")
            todo = clean.nonzero().squeeze(1)  # attacks spend work only where the model is right
            x_todo, y_todo = attacks_module.take(x, todo), y[todo]
            clean_parts.append(clean)
            for name, attack in attacks.items():
                started = time.perf_counter()
                hit, loss = clean, clean_loss
                if not is_clean(attack):
                    hit, loss, flagged = torch.zeros_like(clean), clean_loss.clone(), torch.zeros_like(clean)
                if not is_clean(attack) and len(todo):
                    with torch.no_grad(), runtime.autocast(device, amp_dtype):
                        x_adv = attack(model, x_todo, y_todo, eps)  # input gradients enable grad inside
                        logits = model(x_adv)
                    predicted = logits.argmax(dim=1)
                    hit[todo] = predicted == y_todo
                    flagged[todo] = predicted == logits.shape[1] - 1
                    loss[todo] = F.cross_entropy(logits.float(), y_todo, reduction="none")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # so the time is the attack's, not a later one's
                seconds[name] += time.perf_counter() - started
                parts[name].append((hit, loss))
                if name in flag_parts:
                    flag_parts[name].append(flagged)
    finally:
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.bool, device=device)
    return Outcomes(
        clean=torch.cat(clean_parts) if clean_parts else empty,
        correct={name: torch.cat([h for h, _ in p]) if p else empty for name, p in parts.items()},
        loss={name: torch.cat([l for _, l in p]) if p else empty.float() for name, p in parts.items()},
        time_s=seconds,
        flagged={name: torch.cat(p) if p else empty for name, p in flag_parts.items()} if adversarial_class else {},
        false_flags=(torch.cat(false_flag_parts) if false_flag_parts else empty) if adversarial_class else None,
    )


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], attacks: Mapping[str, Attack], *,
             eps: float, amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval",
             total: int | None = None, gather: bool = False,
             adversarial_class: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy and loss of ``model`` under each attack (pixels in [0, 1], eps in pixel units).

    Returns ``{name: {"acc", "loss"}, ..., "any_attack": {"acc"}}`` with fractions in [0, 1];
    an example misclassified without attack counts as broken by every attack. The model is left in the
    train/eval mode it came in, with its weights untouched. ``gather``: under torchrun each rank
    passed its own share of the examples; the results are over all of them. ``adversarial_class``: see
    `Outcomes.summary`.
    """
    found = attack_outcomes(model, batches, attacks, eps=eps, amp_dtype=amp_dtype, progress=progress, desc=desc,
                            total=total, adversarial_class=adversarial_class)
    return (found.gathered() if gather else found).summary()


def evaluation_attacks(attack_cfgs: Mapping[str, Any]) -> tuple[dict[str, Attack], dict[str, dict[str, Any]]]:
    """Attack functions from ``{name: attack config}``, and each one's settings as plain data for reports."""
    attacks, described = {}, {}
    for name, attack_cfg in attack_cfgs.items():
        attacks[name] = config.instantiate(f"evaluation.attacks.{name}", attack_cfg)
        plain = config.plain(attack_cfg)
        kind = config.attack_kind(plain)
        for key in ("_target_", "_partial_", "name"):
            plain.pop(key, None)
        if kind == "fgsm":
            plain.update(steps=1, restarts=1)
        if kind == "autoattack":
            attacks_module.require_autoattack()  # a missing extra stops the run now, not after the other attacks
        if "loss" in plain:  # the loss the attack maximises; "loss" in results is the measured loss
            plain["attack_loss"] = plain.pop("loss")
        described[name] = {"attack": kind, **plain}
    return attacks, described


@dataclass
class Evaluation:
    """What `evaluate_model` found: ``results`` at the largest eps (the table), ``curve`` (one entry
    ``{"eps", "eps_text", "eps_255", "test": results}`` per eps, ascending), the sanity report, and the
    seconds spent per attack and on the sanity probes."""

    results: dict[str, dict[str, Any]]
    curve: list[dict[str, Any]]
    sanity: dict[str, Any] | None
    attack_time_s: dict[str, float] = field(default_factory=dict)  # per attack, over every eps
    sanity_time_s: float = 0.0


def evaluate_model(model: nn.Module, images: data.ImageSet, attack_cfgs: Mapping[str, Any], *,
                   eps_values: list[tuple[float, str]], norm: str, batch_size: int, channels_last: bool = False,
                   amp_dtype: torch.dtype | None = None, sanity_cfg: Any = None, progress: bool = False,
                   desc: str = "test", adversarial_class: bool = False, seed: int = 0,
                   ranks: distributed.Ranks = distributed.Ranks()) -> Evaluation:
    """Evaluate ``model`` on ``images`` against every attack of ``attack_cfgs`` at every eps, then run
    the sanity checks (`advcli.sanity`) unless ``sanity_cfg.enabled`` is false.

    Args:
        images: the examples, on the model's device. attack_cfgs: ``{name: attack config}``.
        eps_values: ``[(eps, as typed), ...]`` in pixel units. norm: "linf" or "l2" (for the probes).
        sanity_cfg: ``evaluation.sanity`` (enabled, num_examples, tolerance, steps_factor, restarts_factor).
        adversarial_class: the model's last output means "adversarial input" (see `Outcomes.summary`).
        seed: the random starts' seed (each rank adds its rank): the numbers are a function of the model,
            these arguments and the seed, whatever ran before.
        ranks: under torchrun each rank attacks a contiguous share of ``images`` and the outcomes are
            gathered; the sanity probes run on rank 0 alone (the others get ``sanity`` None).
    """
    with runtime.seeded(seed + ranks.rank, images.images.device):
        return _evaluate_model(model, images, attack_cfgs, eps_values=eps_values, norm=norm, batch_size=batch_size,
                               channels_last=channels_last, amp_dtype=amp_dtype, sanity_cfg=sanity_cfg,
                               progress=progress, desc=desc, adversarial_class=adversarial_class, ranks=ranks)


def _evaluate_model(model, images, attack_cfgs, *, eps_values, norm, batch_size, channels_last, amp_dtype, sanity_cfg,
                    progress, desc, adversarial_class, ranks) -> Evaluation:
    attacks, described = evaluation_attacks(attack_cfgs)
    eps_values = sorted(dict(eps_values).items())  # ascending, each value once
    outcomes: dict[float, Outcomes] = {}
    curve = []
    for eps, text in eps_values:
        label = f"{desc} eps={text}" if len(eps_values) > 1 else desc
        mine = images.subset(data.share(len(images), ranks.shard))
        outcomes[eps] = attack_outcomes(model, data.batches(mine, batch_size, channels_last=channels_last), attacks,
                                        eps=eps, amp_dtype=amp_dtype, progress=progress, desc=label,
                                        total=data.num_batches(len(mine), batch_size),
                                        adversarial_class=adversarial_class)
        if ranks.enabled:
            outcomes[eps] = outcomes[eps].gathered()
        results = outcomes[eps].summary()
        for name in described:
            results[name].update(described[name])
        curve.append({"eps": eps, "eps_text": text, "eps_255": eps * 255, "test": results})
    report_, started = None, time.perf_counter()
    if ranks.is_main and (sanity_cfg is None or sanity_cfg.get("enabled", True)):
        report_ = sanity_report(model, images, outcomes, {entry["eps"]: entry["test"] for entry in curve}, described,
                                norm=norm, batch_size=batch_size, channels_last=channels_last, amp_dtype=amp_dtype,
                                sanity_cfg=sanity_cfg)
    seconds = {name: sum(found.time_s[name] for found in outcomes.values()) for name in attacks}
    return Evaluation(results=curve[-1]["test"], curve=curve, sanity=report_, attack_time_s=seconds,
                      sanity_time_s=time.perf_counter() - started)


def sanity_report(model: nn.Module, images: data.ImageSet, outcomes: Mapping[float, Outcomes],
                  results: Mapping[float, Any], described: Mapping[str, Any], *, norm: str, batch_size: int,
                  channels_last: bool, amp_dtype: torch.dtype | None, sanity_cfg: Any = None) -> dict[str, Any]:
    """`sanity.run_checks` on the first ``sanity_cfg.num_examples`` examples, with probes run like the evaluation."""
    settings = {"num_examples": 500, "tolerance": 0.01, "steps_factor": 5, "restarts_factor": 2}
    if sanity_cfg is not None:
        settings.update({k: sanity_cfg[k] for k in settings if sanity_cfg.get(k) is not None})
    n = min(len(images), config.require_int("evaluation.sanity.num_examples", settings["num_examples"], minimum=1))
    probe_set = images.subset(slice(0, n))
    x, y = next(data.batches(probe_set, n, channels_last=channels_last))
    was_training = model.training
    model.eval()

    def measure(attack: Attack, eps: float) -> torch.Tensor:
        found = attack_outcomes(model, data.batches(probe_set, batch_size, channels_last=channels_last),
                                {"probe": attack}, eps=eps, amp_dtype=amp_dtype)
        return found.correct["probe"]

    try:
        first = {eps: found.head(n) for eps, found in outcomes.items()}
        return sanity.run_checks(
            model, x, y, norm=norm, results=results, num_evaluated=len(images),
            correct={eps: found.correct for eps, found in first.items()}, clean=next(iter(first.values())).clean,
            described=described, measure=measure, batch_size=batch_size, amp_dtype=amp_dtype,
            tolerance=float(settings["tolerance"]), steps_factor=int(settings["steps_factor"]),
            restarts_factor=int(settings["restarts_factor"]))
    finally:
        model.train(was_training)


def eps_list(cfg: DictConfig, *, norm: str, dim: int) -> list[tuple[float, str]]:
    """``cfg.eps`` as ``[(eps, as typed), ...]``: one value, or a list (``eps=[0,1/255,2/255]``)."""
    texts = [str(v) for v in cfg.eps] if OmegaConf.is_list(cfg.eps) else [str(cfg.eps)]
    if not texts:
        raise ConfigError("eps=[] is an empty list; give one eps (eps=8/255) or several (eps=0,2/255,4/255,8/255).")
    return [(config.parse_eps(text, norm=norm, dim=dim), text) for text in texts]


def evaluation_attack_configs(evaluation_cfg: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``evaluation.attacks``, plus ``evaluation.adaptive_attacks`` for a model (``spec``) with an
    "adversarial input" output: attacks that must also avoid the flag."""
    attack_cfgs = dict(evaluation_cfg.attacks)
    if spec.get("adversarial_class"):
        attack_cfgs.update(evaluation_cfg.get("adaptive_attacks") or {})
    return attack_cfgs


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


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """``advcli eval``: load ``cfg.ckpt``, fill unset values from its training config, evaluate."""
    started = time.perf_counter()
    if cfg.ckpt is None:
        raise ConfigError("No checkpoint given: pass ckpt=PATH (a checkpoint.pt from a run directory).")
    payload = checkpoint.load(cfg.ckpt)
    trained = payload["config"]
    # unset values follow the training run, so interpolations like ${eps} resolve to them
    for key in ("eps", "norm", "restarts"):
        if cfg[key] is None:
            cfg[key] = trained[key]
    spec = payload["model_spec"]
    dim = spec["in_channels"] * spec["image_size"] ** 2
    norm = config.require_choice("norm", cfg.norm, config.NORMS)
    eps_values = eps_list(cfg, norm=norm, dim=dim)
    single = copy.deepcopy(cfg)  # the shared checks take one eps; each value of a list was checked above
    single.eps = eps_values[-1][1]
    s = config.run_settings(single, dim=dim)
    attack_cfgs = eval_attack_configs(cfg, spec)
    config.check_evaluation_attacks(attack_cfgs, norm=norm, num_classes=checkpoint.num_outputs(spec),
                                    adversarial_class=bool(spec.get("adversarial_class")))
    split = config.require_choice("split", cfg.split, ("train", "test"))
    ranks = distributed.from_environment()
    device = distributed.start(ranks, runtime.resolve_device(cfg.device))
    try:
        return _evaluate_checkpoint(cfg, payload, attack_cfgs, eps_values, s, split, ranks, device, started)
    finally:
        distributed.stop()


def _evaluate_checkpoint(cfg: DictConfig, payload: dict[str, Any], attack_cfgs: dict[str, Any],
                         eps_values: list[tuple[float, str]], s: config.RunSettings, split: str,
                         ranks: distributed.Ranks, device: torch.device, started: float) -> dict[str, Any]:
    trained, spec = payload["config"], payload["model_spec"]
    out = distributed.same_on_all_ranks(config.output_dir(cfg) if ranks.is_main else None)
    amp_dtype = runtime.resolve_amp(cfg.evaluation.amp, device)

    dataset = config.dataset_choice(trained["dataset"])
    images = data.load_split(dataset.name, split, root=s.data_root, download=cfg.data.download, **dataset.options)
    if s.num_test is not None:
        images = images.subset(slice(0, s.num_test))
    model, channels_last = runtime.prepare_model(checkpoint.rebuild_model(payload, cfg.ckpt), device, cfg.channels_last)
    images = images.to(device)
    if tuple(images.images.shape[1:]) != (spec["in_channels"], spec["image_size"], spec["image_size"]):
        raise checkpoint.CheckpointError(
            f"Checkpoint {cfg.ckpt} expects {spec['in_channels']}x{spec['image_size']}x{spec['image_size']} images, "
            f"but {dataset.name} has {'x'.join(map(str, images.images.shape[1:]))}."
        )

    found = evaluate_model(model, images, attack_cfgs, eps_values=eps_values, norm=s.norm,
                           batch_size=s.eval_batch_size, channels_last=channels_last, amp_dtype=amp_dtype,
                           sanity_cfg=cfg.evaluation.get("sanity"), progress=cfg.progress and ranks.is_main,
                           desc=split, adversarial_class=bool(spec.get("adversarial_class")),
                           seed=int(cfg.evaluation.seed), ranks=ranks)
    top = found.curve[-1]
    metrics = {
        "command": "eval", "checkpoint": str(cfg.ckpt), "dataset": dataset.name, "model": spec["name"], "split": split,
        "eps": top["eps"], "eps_text": top["eps_text"], "eps_255": top["eps_255"], "norm": s.norm,
        "restarts": s.restarts, "num_examples": len(images), "trained_epochs": payload.get("epoch"),
        "test": found.results,
    }
    if len(found.curve) > 1:
        metrics["curve"] = found.curve
    metrics.update({"sanity": found.sanity, "attack_time_s": found.attack_time_s, "sanity_time_s": found.sanity_time_s,
                    "wall_time_s": time.perf_counter() - started, "device": str(device),
                    "precision": runtime.describe_precision(amp_dtype), "torch": torch.__version__})
    if ranks.enabled:
        metrics["processes"] = ranks.world
    if not ranks.is_main:
        return metrics
    lines = [f"\n{cfg.ckpt}: {dataset.name} {split} split ({len(images)} examples)"]
    if len(found.curve) > 1:
        report.write_curve_csv(out / "robustness_curve.csv", found.curve)
        report.plot_curve(out / "robustness_curve.png", found.curve, norm=s.norm,
                          title=f"{spec['name']} on {dataset.name} ({split}, {len(images)} examples)")
        lines += [report.curve_table(found.curve, norm=s.norm),
                  f"wrote {out / 'robustness_curve.csv'} and {out / 'robustness_curve.png'}"]
    else:
        lines.append(report.results_table(found.results, eps=s.eps, norm=s.norm))
    if found.sanity is not None:
        lines.append(report.sanity_table(found.sanity))
    report.write_json(out / "metrics.json", metrics)
    print("\n".join([*lines, f"wrote {out / 'metrics.json'}"]))
    return metrics


def eps_list_as_typed(args: list[str]) -> list[str]:
    """``eps=0,1/255,2/255`` -> ``eps=[0,1/255,2/255]`` unless ``-m``/``--multirun`` asks for a sweep.

    Hydra reads a comma list as a sweep and refuses it without ``-m``; ``advcli eval`` takes it as the
    eps values of one robustness curve, as typed. Sweep functions (``eps=range(...)``) stay as they are.
    """
    if any(arg in ("-m", "--multirun") for arg in args):
        return args
    rewritten = []
    for arg in args:
        value = arg[len("eps="):] if arg.startswith("eps=") else ""
        if "," in value and not value.lstrip().startswith("[") and "(" not in value:
            arg = f"eps=[{value}]"
        rewritten.append(arg)
    return rewritten


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="eval")
def hydra_main(cfg: DictConfig) -> float:
    """Returns the PGD robust accuracy (at the largest eps), so Hydra sweepers can optimise it."""
    metrics = run_guarded(evaluate_checkpoint, cfg)
    return metrics["test"].get("pgd", metrics["test"]["clean"])["acc"]


def main() -> Any:
    """``advcli eval`` and ``python -m advcli.evaluate``: Hydra's app, with an eps list taken as typed."""
    sys.argv = [sys.argv[0], *eps_list_as_typed(sys.argv[1:])]
    return hydra_main()


if __name__ == "__main__":
    main()
