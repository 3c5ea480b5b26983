"""Robustness evaluation: `evaluate(model, batches, attacks, eps)`, `evaluate_model` (every eps of a curve, then
the sanity report) and `evaluate_checkpoint` (what ``advcli eval`` runs: a checkpoint, its settings, a report).

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

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from advcli import attacks as attacks_module
from advcli import autoattack, checkpoint, config, data, distributed, paths, report, runtime, sanity
from advcli.attacks import Attack
from advcli.errors import ConfigError

SPLITS = ("train", "test")

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


@dataclass
class _Parts:
    """One pass's per-batch pieces, concatenated into `Outcomes` at the end."""

    clean: list[torch.Tensor] = field(default_factory=list)
    correct: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    loss: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    flagged: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    false_flags: list[torch.Tensor] = field(default_factory=list)
    time_s: dict[str, float] = field(default_factory=dict)

    def outcomes(self, device: torch.device, adversarial_class: bool) -> Outcomes:
        def cat(pieces: list[torch.Tensor], dtype=torch.bool) -> torch.Tensor:
            return torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=device)

        return Outcomes(clean=cat(self.clean), correct={k: cat(v) for k, v in self.correct.items()},
                        loss={k: cat(v, torch.float32) for k, v in self.loss.items()}, time_s=self.time_s,
                        flagged={k: cat(v) for k, v in self.flagged.items()} if adversarial_class else {},
                        false_flags=cat(self.false_flags) if adversarial_class else None)


def _attack_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, eps: float,
                  amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at ``attack``'s output for a batch the model classifies correctly, and the attack's seconds."""
    started = time.perf_counter()
    with torch.no_grad(), runtime.autocast(x.device, amp_dtype):
        logits = model(attack(model, x, y, eps))  # input gradients enable grad inside the attack
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)  # so the time is the attack's, not a later one's
    return logits.float(), time.perf_counter() - started


def attack_outcomes(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    attacks: Mapping[str, Attack], *, eps: float, amp_dtype: torch.dtype | None = None,
                    adversarial_class: bool = False) -> Outcomes:
    """Attack every batch with every attack and keep the per-example results (see `Outcomes`).

    Examples the model misclassifies without attack count as broken by every attack and are not
    attacked; the rest go to every attack. The model runs in eval mode and is left in the mode it came
    in, with its weights untouched. ``adversarial_class``: the model's last output means "adversarial
    input"; record which inputs it flags. (Wrap ``batches`` in tqdm for a progress bar.)
    """
    parts = _Parts(correct={n: [] for n in attacks}, loss={n: [] for n in attacks}, time_s=dict.fromkeys(attacks, 0.0),
                   flagged={n: [] for n in attacks if not is_clean(attacks[n])})
    with runtime.eval_mode(model):
        for x, y in batches:
            with torch.no_grad(), runtime.autocast(x.device, amp_dtype):
                logits = model(x).float()
            clean, clean_loss = logits.argmax(dim=1) == y, F.cross_entropy(logits, y, reduction="none")
            parts.clean.append(clean)
            parts.false_flags.append(logits.argmax(dim=1) == logits.shape[1] - 1)
            right = clean.nonzero().squeeze(1)  # attacks spend work only where the model is right
            x_right, y_right = attacks_module.take(x, right), y[right]
            for name, attack in attacks.items():
                correct, loss, flagged = clean, clean_loss, torch.zeros_like(clean)
                if not is_clean(attack) and len(right):
                    attacked, seconds = _attack_batch(model, x_right, y_right, attack, eps, amp_dtype)
                    correct, loss = torch.zeros_like(clean), clean_loss.clone()
                    correct[right] = attacked.argmax(dim=1) == y_right
                    flagged[right] = attacked.argmax(dim=1) == attacked.shape[1] - 1
                    loss[right] = F.cross_entropy(attacked, y_right, reduction="none")
                    parts.time_s[name] += seconds
                elif not is_clean(attack):
                    correct = torch.zeros_like(clean)
                parts.correct[name].append(correct)
                parts.loss[name].append(loss)
                if name in parts.flagged:
                    parts.flagged[name].append(flagged)
    return parts.outcomes(next(model.parameters()).device, adversarial_class)


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], attacks: Mapping[str, Attack], *,
             eps: float, amp_dtype: torch.dtype | None = None, gather: bool = False,
             adversarial_class: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy and loss of ``model`` under each attack (pixels in [0, 1], eps in pixel units).

    Returns ``{name: {"acc", "loss"}, ..., "any_attack": {"acc"}}`` with fractions in [0, 1];
    an example misclassified without attack counts as broken by every attack. The model is left in the
    train/eval mode it came in, with its weights untouched. ``gather``: under torchrun each rank
    passed its own share of the examples; the results are over all of them. ``adversarial_class``: see
    `Outcomes.summary`.
    """
    found = attack_outcomes(model, batches, attacks, eps=eps, amp_dtype=amp_dtype, adversarial_class=adversarial_class)
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
            plain.update(steps=1)
        if kind == "autoattack":
            autoattack.require_autoattack()  # a missing extra stops the run now, not after the other attacks
        if "loss" in plain:  # the loss the attack maximises; "loss" in results is the measured loss
            plain["attack_loss"] = plain.pop("loss")
        described[name] = {"attack": kind, **plain}
    return attacks, described


@dataclass(frozen=True)
class EvalSettings:
    """How `evaluate_model` runs: plain values, read from the config once (`eval_settings`)."""

    eps_values: tuple[tuple[float, str], ...]  # (value, as typed), ascending
    norm: str
    batch_size: int = 500
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    seed: int = 0                              # the random starts' seed (each rank adds its rank)
    sanity: Mapping[str, Any] | None = None    # evaluation.sanity; None (or enabled: false): no sanity report
    adversarial_class: bool = False            # the model's last output means "adversarial input"
    progress: bool = False
    desc: str = "test"


def eval_settings(evaluation_cfg: Any, s: config.RunSettings, *, amp_dtype: torch.dtype | None, channels_last: bool,
                  adversarial_class: bool, progress: bool, desc: str = "test") -> EvalSettings:
    """`EvalSettings` from the ``evaluation`` config group and the run's checked settings."""
    sanity_cfg = evaluation_cfg.get("sanity")
    return EvalSettings(s.eps_values, s.norm, s.eval_batch_size, channels_last, amp_dtype, int(evaluation_cfg.seed),
                        config.plain(sanity_cfg) if sanity_cfg is not None else None, adversarial_class, progress, desc)


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


def evaluate_model(model: nn.Module, images: data.ImageSet, attack_cfgs: Mapping[str, Any], settings: EvalSettings,
                   ranks: distributed.Ranks = distributed.Ranks()) -> Evaluation:
    """Evaluate ``model`` on ``images`` (on the model's device) against every attack of ``attack_cfgs``
    (``{name: attack config}``) at every eps, then run the sanity checks (`advcli.sanity`).

    The random starts come from generators seeded with ``settings.seed``: the numbers are a function of the
    model, the settings and the seed, whatever ran before. Under torchrun each rank attacks a contiguous share
    of ``images`` and the outcomes are gathered; the sanity probes run on rank 0 alone (the others get
    ``sanity`` None).
    """
    attacks, described = evaluation_attacks(attack_cfgs)
    outcomes: dict[float, Outcomes] = {}
    curve = []
    with runtime.seeded(settings.seed + ranks.rank, images.images.device):
        mine = images.subset(data.share(len(images), ranks.shard))
        for eps, text in settings.eps_values:
            label = f"{settings.desc} eps={text}" if len(settings.eps_values) > 1 else settings.desc
            batches = tqdm(data.batches(mine, settings.batch_size, channels_last=settings.channels_last), desc=label,
                           total=data.num_batches(len(mine), settings.batch_size), leave=False,
                           disable=not settings.progress, dynamic_ncols=True)
            found = attack_outcomes(model, batches, attacks, eps=eps, amp_dtype=settings.amp_dtype,
                                    adversarial_class=settings.adversarial_class)
            outcomes[eps] = found.gathered() if ranks.enabled else found
            results = outcomes[eps].summary()
            for name in described:
                results[name].update(described[name])
            curve.append({"eps": eps, "eps_text": text, "eps_255": eps * 255, "test": results})
        started, report_ = time.perf_counter(), None
        if ranks.is_main and settings.sanity is not None and settings.sanity.get("enabled", True):
            report_ = sanity_report(model, images, outcomes, {entry["eps"]: entry["test"] for entry in curve},
                                    described, settings)
    seconds = {name: sum(found.time_s[name] for found in outcomes.values()) for name in attacks}
    return Evaluation(results=curve[-1]["test"], curve=curve, sanity=report_, attack_time_s=seconds,
                      sanity_time_s=time.perf_counter() - started)


def sanity_report(model: nn.Module, images: data.ImageSet, outcomes: Mapping[float, Outcomes],
                  results: Mapping[float, Any], described: Mapping[str, Any], settings: EvalSettings) -> dict[str, Any]:
    """`sanity.run_checks` on the first ``settings.sanity.num_examples`` examples, probes run like the evaluation."""
    options = {"num_examples": 500, "tolerance": 0.01, "steps_factor": 5, "restarts_factor": 2}
    options.update({k: settings.sanity[k] for k in options if settings.sanity.get(k) is not None})
    n = min(len(images), config.require_int("evaluation.sanity.num_examples", options["num_examples"], minimum=1))
    probe_set = images.subset(slice(0, n))
    x, y = next(data.batches(probe_set, n, channels_last=settings.channels_last))

    def measure(attack: Attack, eps: float) -> torch.Tensor:
        found = attack_outcomes(model, data.batches(probe_set, settings.batch_size, channels_last=settings.channels_last),
                                {"probe": attack}, eps=eps, amp_dtype=settings.amp_dtype)
        return found.correct["probe"]

    first = {eps: found.head(n) for eps, found in outcomes.items()}
    with runtime.eval_mode(model):
        return sanity.run_checks(
            model, x, y, norm=settings.norm, results=results, num_evaluated=len(images),
            correct={eps: found.correct for eps, found in first.items()}, clean=next(iter(first.values())).clean,
            described=described, measure=measure, batch_size=settings.batch_size, amp_dtype=settings.amp_dtype,
            tolerance=float(options["tolerance"]), steps_factor=int(options["steps_factor"]),
            restarts_factor=int(options["restarts_factor"]))


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


# --- advcli eval: a checkpoint, its settings, a report ---------------------------------------------------

@dataclass
class CheckpointEvaluation:
    """What `evaluate_checkpoint` checked before any work: the checkpoint and the settings to evaluate it with."""

    cfg: DictConfig
    payload: dict[str, Any]
    settings: config.RunSettings
    attack_cfgs: dict[str, Any]
    split: str

    @property
    def spec(self) -> dict[str, Any]:
        return self.payload["model_spec"]


def check_eval_settings(cfg: DictConfig) -> CheckpointEvaluation:
    """Load ``cfg.ckpt``, fill unset eps/norm/restarts from its training run, check every value (each eps once)."""
    payload = checkpoint.load(cfg.ckpt)
    config.fill_from_training_run(cfg, payload["config"], ("eps", "norm", "restarts"))
    spec = payload["model_spec"]
    s = config.run_settings(cfg, dim=spec["in_channels"] * spec["image_size"] ** 2, allow_eps_list=True)
    attack_cfgs = eval_attack_configs(cfg, spec)
    config.check_evaluation_attacks(attack_cfgs, norm=s.norm, num_classes=checkpoint.num_outputs(spec),
                                    adversarial_class=bool(spec.get("adversarial_class")))
    return CheckpointEvaluation(cfg, payload, s, attack_cfgs, config.require_choice("split", cfg.split, SPLITS))


def load_examples(job: CheckpointEvaluation, device: torch.device) -> tuple[str, data.ImageSet]:
    """The dataset's name and the examples to evaluate on (the split's first ``evaluation.num_examples``)."""
    dataset = config.dataset_choice(job.payload["config"]["dataset"])
    images = data.load_split(dataset.name, job.split, root=job.settings.data_root, download=job.cfg.data.download,
                             **dataset.options)
    if job.settings.num_test is not None:
        images = images.subset(slice(0, job.settings.num_test))
    spec = job.spec
    if tuple(images.images.shape[1:]) != (spec["in_channels"], spec["image_size"], spec["image_size"]):
        raise checkpoint.CheckpointError(
            f"Checkpoint {job.cfg.ckpt} expects {spec['in_channels']}x{spec['image_size']}x{spec['image_size']} "
            f"images, but {dataset.name} has {'x'.join(map(str, images.images.shape[1:]))}.")
    return dataset.name, images.to(device)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """``advcli eval``: the checkpoint's model on its dataset, at the asked (or trained) settings; metrics.json."""
    started = time.perf_counter()
    job = check_eval_settings(cfg)
    with distributed.joined(runtime.resolve_device(cfg.device)) as (ranks, device):
        out = distributed.same_on_all_ranks(paths.output_dir(cfg) if ranks.is_main else None)
        dataset, images = load_examples(job, device)
        model, channels_last = runtime.prepare_model(checkpoint.rebuild_model(job.payload, cfg.ckpt), device,
                                                     cfg.channels_last)
        amp_dtype = runtime.resolve_amp(cfg.evaluation.amp, device)
        settings = eval_settings(cfg.evaluation, job.settings, amp_dtype=amp_dtype, channels_last=channels_last,
                                 adversarial_class=bool(job.spec.get("adversarial_class")),
                                 progress=cfg.progress and ranks.is_main, desc=job.split)
        found = evaluate_model(model, images, job.attack_cfgs, settings, ranks)
        metrics = {
            "command": "eval", "checkpoint": str(cfg.ckpt), "dataset": dataset, "model": job.spec["name"],
            "split": job.split, "eps": job.settings.eps, "eps_text": job.settings.eps_text,
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
        return metrics


if __name__ == "__main__":  # python -m advcli.evaluate (and torchrun -m advcli.evaluate): the same as advcli eval
    from advcli.cli import eps_list_as_typed, eval_app

    sys.argv = [sys.argv[0], *eps_list_as_typed(sys.argv[1:])]
    eval_app()
