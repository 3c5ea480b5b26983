"""Robustness evaluation: `evaluate(model, batches, attacks, eps)` and `evaluate_model` (every eps of a curve, then
the sanity report); ``advcli eval``'s job (a checkpoint, its settings, a report) is `advcli.evaluation.eval_command`.

The model runs in eval mode (BatchNorm statistics frozen, weights never updated); attacks run under
``torch.no_grad`` except for their input gradients. An example the model already misclassifies is broken for
every attack and is not attacked. How the attacks share the rest is the evaluation preset's choice
(`advcli.evaluation.cascade`):

- ``evaluation=default``: a cascade, as AutoAttack runs its attacks: APGD-CE, then targeted APGD-DLR, then the
  gradient-free Square attack, each only on what the ones before left standing; Square takes the survivors
  closest to the boundary first and stops when a share breaks nothing. Rows are accuracies *after* each attack.
- ``evaluation=fast``: every attack on every example (each row is that attack's own accuracy); "any attack"
  is their per-example AND. Quick, and easily fooled by misleading gradients.
- ``evaluation=autoattack``: the reference AutoAttack (standard version), for leaderboard numbers.

Every accuracy carries its number of examples and a Wilson 95% interval (`advcli.runs.stats`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from advcli import config, data, distributed, runtime
from advcli.attacks import checks as attack_checks, reference as autoattack, Attack
from advcli.errors import ConfigError
from advcli.evaluation import sanity
from advcli.evaluation.cascade import attack_outcomes, Batches, cascade_outcomes, Outcomes, Step



def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], attacks: Mapping[str, Attack], *,
             eps: float, amp_dtype: torch.dtype | None = None, gather: bool = False,
             adversarial_class: bool = False, cascade: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy and loss of ``model`` under each attack (pixels in [0, 1], eps in pixel units).

    Returns ``{name: {"acc", "loss"}, ..., "any_attack": {"acc"}}`` with fractions in [0, 1];
    an example misclassified without attack counts as broken by every attack. The model is left in the
    train/eval mode it came in, with its weights untouched. ``gather``: under torchrun each rank
    passed its own share of the examples; the results are over all of them. ``adversarial_class``: see
    `Outcomes.summary`. ``cascade``: run the attacks as a cascade (`outcomes.cascade_outcomes`).
    """
    if cascade:
        found = cascade_outcomes(model, batches, attacks, eps=eps, amp_dtype=amp_dtype)
    else:
        found = attack_outcomes(model, batches, attacks, eps=eps, amp_dtype=amp_dtype, adversarial_class=adversarial_class)
    return (found.gathered() if gather else found).summary()


Pass = Callable[[str, int], tuple[Batches, Step]]  # (part, attacks in it) -> a pass over the examples, its step


def outcomes_of(model: nn.Module, make_pass: Pass, attacks: Mapping[str, Attack], eps: float,
                settings: EvalSettings) -> Outcomes:
    """Per-example outcomes at ``eps``: every attack alone (`attack_outcomes`), or, for a cascade, the attacks
    named in ``settings.alone`` alone on every example, then the others as a cascade on what they left standing.
    ``make_pass(part, count)``: a fresh pass over the examples and the step its ``count`` attacks take per batch
    (a progress bar named for the part)."""
    kwargs = dict(eps=eps, amp_dtype=settings.amp_dtype)
    if not settings.cascade:
        batches, step = make_pass("attacks", len(attacks))
        return attack_outcomes(model, batches, attacks, adversarial_class=settings.adversarial_class, step=step,
                               **kwargs)
    alone = {name: attack for name, attack in attacks.items() if name in settings.alone}
    chain = {name: attack for name, attack in attacks.items() if name not in settings.alone}
    if not alone:
        batches, step = make_pass("cascade", len(chain))
        return cascade_outcomes(model, batches, chain, step=step, **kwargs)
    batches, step = make_pass("each attack alone", len(alone))
    first = attack_outcomes(model, batches, alone, step=step, **kwargs)
    if not chain:
        return first
    batches, step = make_pass("cascade", len(chain))
    return first.then(cascade_outcomes(model, batches, chain, standing=first.standing(), step=step, **kwargs))


def progress_pass(batches: Batches, *, steps: int, desc: str, enabled: bool) -> tuple[Iterator[Any], Step]:
    """``batches`` with a progress bar of ``steps`` steps, one per attack per batch, so that an evaluation whose
    every batch takes minutes still moves; the bar shows the attack last done and goes when the pass ends."""
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, disable=not enabled, dynamic_ncols=True)

    def step(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update()

    def closing() -> Iterator[Any]:
        try:
            yield from batches
        finally:
            bar.close()

    return closing(), step


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


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How `evaluate_model` runs: plain values, read from the config once (`eval_settings`); built by keyword."""

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
    preset: str = "custom"                     # the evaluation preset's name (fast, default, autoattack)
    cascade: bool = False                      # each attack only on what the ones before it left standing...
    alone: tuple[str, ...] = ()                # ...except these, each alone on every example, before the cascade
    stronger: Mapping[str, Any] | None = None  # sanity: {"attacks", "num_examples"}, the attack_converged probe


def eval_settings(evaluation_cfg: Any, s: config.RunSettings, *, amp_dtype: torch.dtype | None, channels_last: bool,
                  adversarial_class: bool, progress: bool, desc: str = "test", extra_alone: tuple[str, ...] = ()
                  ) -> EvalSettings:
    """`EvalSettings` from the ``evaluation`` config group and the run's checked settings; ``extra_alone``: attacks
    added on the command line (``attack=NAME``), which run alone on every example."""
    sanity_cfg = evaluation_cfg.get("sanity")
    stronger = sanity_cfg.get("stronger") if sanity_cfg is not None else None
    return EvalSettings(eps_values=s.eps_values, norm=s.norm, batch_size=s.eval_batch_size, channels_last=channels_last,
                        amp_dtype=amp_dtype, seed=int(evaluation_cfg.seed),
                        sanity=config.plain(sanity_cfg) if sanity_cfg is not None else None,
                        adversarial_class=adversarial_class, progress=progress, desc=desc,
                        preset=str(evaluation_cfg.get("name") or "custom"),
                        cascade=bool(evaluation_cfg.get("cascade", False)),
                        alone=(*(evaluation_cfg.get("standalone_attacks") or {}), *extra_alone),
                        stronger=config.plain(stronger) if stronger is not None else None)


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
    (``{name: attack config}``) at every eps, then run the sanity checks (`advcli.evaluation.sanity`).

    The random starts come from generators seeded with ``settings.seed``: the numbers are a function of the
    model, the settings and the seed, whatever ran before. Under torchrun each rank attacks a contiguous share
    of ``images`` and the outcomes are gathered; the sanity probes run on rank 0 alone (the others get
    ``sanity`` None).
    """
    attacks, described = evaluation_attacks(attack_cfgs)
    for name in described:
        if settings.cascade and name not in settings.alone:
            described[name]["in_cascade"] = True  # its row is the accuracy after the attacks above it, not its own
    outcomes: dict[float, Outcomes] = {}
    curve = []
    with runtime.seeded(settings.seed + ranks.rank, images.images.device):
        mine = images.subset(data.share(len(images), ranks.shard))
        for eps, text in settings.eps_values:
            label = f"{settings.desc} eps={text}" if len(settings.eps_values) > 1 else settings.desc

            def make_pass(part: str, count: int) -> tuple[Batches, Step]:
                return progress_pass(data.batches(mine, settings.batch_size, channels_last=settings.channels_last),
                                     steps=count * data.num_batches(len(mine), settings.batch_size),
                                     desc=f"{label}: {part}", enabled=settings.progress)

            found = outcomes_of(model, make_pass, attacks, eps, settings)
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
    stronger = _stronger_probe(model, probe_set, first, settings) if settings.stronger else None
    with runtime.eval_mode(model):
        return sanity.run_checks(
            model, x, y, norm=settings.norm, results=results, num_evaluated=len(images),
            correct={eps: found.correct for eps, found in first.items()}, clean=next(iter(first.values())).clean,
            described=described, measure=measure, batch_size=settings.batch_size, amp_dtype=settings.amp_dtype,
            tolerance=float(options["tolerance"]), steps_factor=int(options["steps_factor"]),
            restarts_factor=int(options["restarts_factor"]), stronger=stronger)


def _probe_fits(attack_cfg: Mapping[str, Any], settings: EvalSettings, num_classes: int, size: tuple[int, int]) -> bool:
    """Whether a probe attack can run on this model: the reference attacks need 4 classes, no adversarial-input
    output, and (L2 Square) an image size the reference code can tile. The probe leaves out what cannot."""
    kind = config.attack_kind(attack_cfg)
    if kind in attack_checks.REFERENCE_ATTACKS and settings.adversarial_class:
        return False
    if kind == "square" and settings.norm == "l2" and not autoattack.square_l2_fits(*size):
        return False
    try:
        attack_checks.check_attack_fits("evaluation.sanity.stronger", OmegaConf.create(dict(attack_cfg)), norm=settings.norm,
                                 num_classes=num_classes)
    except ConfigError:
        return False
    return True


def _stronger_probe(model: nn.Module, probe_set: data.ImageSet, evaluated: Mapping[float, Outcomes],
                    settings: EvalSettings) -> sanity.StrongerProbe | None:
    """The sanity report's attack_converged probe from ``evaluation.sanity.stronger``: its attacks as a cascade,
    drawing from seed ``evaluation.seed + 1``, on the first ``stronger.num_examples`` probe examples (all when
    unset) that the evaluation left standing (``evaluated``: its outcomes by eps); ``(label, eps -> still correct
    after the evaluation and all of them)``."""
    with torch.no_grad(), runtime.eval_mode(model):
        num_classes = model(probe_set.subset(slice(0, 1)).images.float() / 255).shape[1]
    seed = settings.seed + 1  # other random draws than the evaluation's
    fitting = {name: {**cfg, **({"seed": seed} if "seed" in cfg else {})}
               for name, cfg in settings.stronger["attacks"].items()
               if _probe_fits(cfg, settings, num_classes, probe_set.images.shape[-2:])}
    if not fitting:
        return None  # sanity falls back to its "more steps" probe
    attacks, _ = evaluation_attacks(fitting)
    if settings.stronger.get("num_examples") is not None:
        count = config.require_int("evaluation.sanity.stronger.num_examples", settings.stronger["num_examples"], minimum=1)
        probe_set = probe_set.subset(slice(0, min(count, len(probe_set))))

    def correct_after(eps: float) -> torch.Tensor:
        standing = evaluated[eps].standing()[:len(probe_set)]  # what the evaluation broke needs no second try
        found = cascade_outcomes(model, data.batches(probe_set, settings.batch_size, channels_last=settings.channels_last),
                                 attacks, eps=eps, standing=standing, amp_dtype=settings.amp_dtype)
        return found.correct[list(attacks)[-1]]

    return sanity.StrongerProbe(f"{' + '.join(attacks)} (seed {seed})", correct_after)


def evaluation_attack_configs(evaluation_cfg: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``evaluation.standalone_attacks`` and ``evaluation.attacks``, plus ``evaluation.adaptive_attacks`` for a
    model (``spec``) with an "adversarial input" output: attacks that must also avoid the flag."""
    attack_cfgs = {**(evaluation_cfg.get("standalone_attacks") or {}), **evaluation_cfg.attacks}
    if spec.get("adversarial_class"):
        attack_cfgs.update(evaluation_cfg.get("adaptive_attacks") or {})
    return attack_cfgs


MOVED = {"eval_attack_configs", "CheckpointEvaluation", "check_eval_settings", "evaluate_flagging_model_as_trained",
         "load_examples", "evaluate_checkpoint", "write_model_info", "SPLITS"}


def __getattr__(name: str):
    # ``advcli eval``'s job moved out of the library module: old imports fail saying where it went
    if name in MOVED:
        raise AttributeError(f"advcli.evaluation.evaluate.{name} moved to advcli.evaluation.eval_command.{name}; "
                             "import it from there.")
    raise AttributeError(f"module 'advcli.evaluation.evaluate' has no attribute {name!r}")
