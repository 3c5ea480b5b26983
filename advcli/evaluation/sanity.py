"""The gradient-masking report: checks that a robustness number deserves trust.

A weak attack or a masked gradient makes a model look robust when it is not. The checks below come
from Athalye, Carlini & Wagner 2018 ("Obfuscated gradients give a false sense of security") and
Carlini et al. 2019 ("On evaluating adversarial robustness"); each returns a verdict, ``pass`` or
``warn``, a detail with the numbers, and for a warning the likely cause.

Most checks read numbers the evaluation already has (per-example outcomes of every attack at every
eps); the rest run cheap probes on the first ``num_examples`` evaluated examples: one input gradient,
the strongest PGD at a large eps and at twice the largest eps, and the same PGD with more steps and
restarts. Probes count an example misclassified without any attack as broken, as the evaluation does.
`run_checks` gathers what they read as an `Evidence`; each check is one function of it, named as below.

| check | what it asks | a warning usually means |
|---|---|---|
| ``gradients_nonzero`` | input gradients are non-zero and finite | shattered gradients: a non-differentiable step in the forward pass |
| ``iterative_beats_single_step`` | PGD is at least as strong as FGSM | masked or noisy loss surface; PGD step size too small |
| ``accuracy_falls_with_eps`` | accuracy does not rise as eps grows | gradient masking, or a broken attack |
| ``large_eps_reaches_zero`` | at eps = 1 (L-inf; the cube diagonal for L2) accuracy is ~0% | gradient masking, or a broken attack |
| ``more_steps_do_not_raise_accuracy`` | 5x steps and 2x restarts never raise accuracy | a randomised model or defence (use EOT) |
| ``attack_converged`` | that stronger PGD breaks (almost) nothing the evaluation missed | the evaluation attacks are too weak |
| ``autoattack_agrees_with_pgd`` | (with attack=autoattack) AutoAttack breaks (almost) nothing PGD missed | gradient masking, or a weak PGD |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from advcli import attacks, runtime
from advcli.config import format_eps
from advcli.runs import stats
from advcli.runs.report import percent

# A probe: (attack, eps) -> per-example "still correctly classified" on the probe examples, bool (n,).
Measure = Callable[[attacks.Attack, float], torch.Tensor]


class StrongerProbe(NamedTuple):
    """Stronger attacks than the evaluation's (e.g. the default preset's, checking the fast one): a label, and
    eps -> which probe examples they leave correctly classified, bool (n,)."""

    label: str
    correct_at: Callable[[float], torch.Tensor]

ITERATIVE = ("pgd",)  # AutoAttack has its own check: with it here, its strength would hide a weak PGD

pct = partial(percent, digits=1)  # the report's percentages: 87.3%


@dataclass
class Evidence:
    """What the checks read: the evaluation's numbers, and the probe examples with a way to attack them again.

    Fields:
        model: the evaluated model, in eval mode. x, y: the probe examples, (n, C, H, W) in [0, 1] and (n,),
            the first n evaluated examples.
        norm: the threat model's norm, ``linf`` or ``l2``.
        results: per eps, the evaluation's summary ``{attack: {"acc", ...}, "any_attack": {"acc"}}``, over
            all ``num_evaluated`` examples.
        correct: per eps, per attack, which probe examples the attack left correctly classified, bool (n,).
        clean: which probe examples are correctly classified without attack, bool (n,).
        described: each evaluation attack's settings (``attack`` kind, steps, restarts, ...).
        measure: runs an attack at an eps on the probe examples (see `Measure`).
        batch_size, amp_dtype: how the gradient check runs its backward passes.
        tolerance: accuracy differences (fractions) up to this, or one example, count as noise.
        steps_factor, restarts_factor: how much stronger the "more steps" probe is.
        stronger: the attack_converged probe's attacks; None: the "more steps" probe.
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    norm: str
    results: Mapping[float, Mapping[str, Mapping[str, Any]]]
    num_evaluated: int
    correct: Mapping[float, Mapping[str, torch.Tensor]]
    clean: torch.Tensor
    described: Mapping[str, Mapping[str, Any]]
    measure: Measure
    batch_size: int = 500
    amp_dtype: torch.dtype | None = None
    tolerance: float = 0.01
    steps_factor: int = 5
    restarts_factor: int = 2
    stronger: StrongerProbe | None = None

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def eps_values(self) -> list[float]:
        return sorted(self.results)

    @property
    def attacked(self) -> list[float]:
        """The eps values above 0, ascending."""
        return [eps for eps in self.eps_values if eps > 0]

    @property
    def top(self) -> float:
        return self.eps_values[-1]

    @property
    def on_probe(self) -> float:
        """The accuracy difference taken as noise on the probe examples."""
        return allowed(self.tolerance, self.n)

    @property
    def on_all(self) -> float:
        """The accuracy difference taken as noise on every evaluated example."""
        return allowed(self.tolerance, self.num_evaluated)

    def of_kind(self, *kinds: str) -> list[str]:
        """The evaluation attacks of these kinds (``pgd``, ``fgsm``, ``autoattack``) whose rows are their own
        accuracy (not a cascade's running one), in evaluation order."""
        return [name for name, row in self.described.items()
                if row.get("attack") in kinds and not row.get("in_cascade")]

    def acc(self, eps: float, name: str) -> float:
        """The evaluation's accuracy of attack ``name`` at ``eps``, over every evaluated example."""
        return self.results[eps][name]["acc"]


class Probe(NamedTuple):
    """The strongest evaluation PGD on the probe examples: its accuracy by eps, up to ``large_eps``."""

    name: str
    settings: dict[str, Any]  # as `pgd` keywords, norm included
    curve: list[tuple[float, float]]  # (eps, accuracy) from eps 0, ending at large_eps
    large_eps: float
    at_top: float  # accuracy at the evaluation's largest eps

    @property
    def large_acc(self) -> float:
        return self.curve[-1][1]


class Stronger(NamedTuple):
    """The probe PGD with more steps and restarts, at the evaluation's largest eps."""

    label: str
    correct: torch.Tensor  # which probe examples it left correctly classified, bool (n,)


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **evidence: Any) -> dict[str, Any]:
    """Every check, as ``{"verdict": "pass"|"warn", "num_examples", "checks": [{name, check, verdict,
    detail, likely_cause}, ...]}``.

    Args:
        model, x, y, evidence: the fields of `Evidence`, the rest by keyword.
    """
    found = Evidence(model, x, y, **evidence)
    checks = [gradients_nonzero(found), iterative_beats_single_step(found), autoattack_agrees_with_pgd(found)]
    probe = probe_curve(found)
    checks += [accuracy_falls_with_eps(found, probe), large_eps_reaches_zero(found, probe)]
    if found.top > 0:
        more = stronger_probe(found, probe)
        checks.append(more_steps_do_not_raise_accuracy(found, probe, more))
        if found.stronger is not None:
            more = Stronger(found.stronger.label, found.stronger.correct_at(found.top))
        checks.append(attack_converged(found, more))
    checks = [item for item in checks if item is not None]  # a check without the attacks it compares
    return {"verdict": "warn" if any(c["verdict"] == "warn" for c in checks) else "pass", "num_examples": found.n,
            "checks": checks}


def large_eps(norm: str, dim: int) -> float:
    """A radius that allows every image of [0, 1]^dim from any x: 1 for L-inf, the cube's diagonal for L2."""
    return 1.0 if norm == "linf" else math.sqrt(dim)


def check(name: str, statement: str, ok: bool, detail: str, cause: str) -> dict[str, Any]:
    return {"name": name, "check": statement, "verdict": "pass" if ok else "warn", "detail": detail,
            "likely_cause": None if ok else cause}


def accuracy(hits: torch.Tensor) -> float:
    """The fraction of a bool (n,) "correctly classified" tensor that is True."""
    return hits.float().mean().item()


def noise(a: torch.Tensor, b: torch.Tensor) -> str:
    """Whether two attacks' per-example outcomes on the same examples (bool, "still correct") differ by more
    than chance: the exact McNemar test on the examples only one of them broke."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    p = stats.mcnemar_p_value(only_a, only_b)
    verdict = "outside noise" if p < 0.05 else "within noise"
    return f"{verdict} (McNemar p = {p:.2g}; {only_b} vs {only_a} examples broken by one only)"


def _paired_noise(evidence: Evidence, name: str, other: torch.Tensor) -> str:
    """``; <noise>`` comparing evaluation attack ``name`` at the largest eps with ``other`` on the probe examples,
    or nothing where ``name`` did not run in the evaluation."""
    mine = evidence.correct.get(evidence.top, {}).get(name)
    return f"; {noise(mine, other)}" if mine is not None else ""


def allowed(tolerance: float, n: int) -> float:
    """The accuracy difference taken as noise: ``tolerance``, and never less than one example in ``n``."""
    return max(tolerance, 1.0 / max(n, 1))


def base_attack(described: Mapping[str, Mapping[str, Any]], acc_at: Mapping[str, float]) -> tuple[str, dict[str, Any]]:
    """The strongest evaluation PGD (lowest accuracy at the largest eps) and its settings as `pgd` keywords.
    Without one, a 20-step margin-loss PGD."""
    candidates = [name for name, row in described.items() if row.get("attack") == "pgd" and not row.get("in_cascade")]
    if not candidates:
        return "pgd-20 (probe)", dict(steps=20, loss="margin", restarts=1)
    name = min(candidates, key=lambda n: acc_at.get(n, 1.0))
    row = described[name]
    kwargs = {key: row[key] for key in ("alpha", "steps", "norm", "random_start", "restarts") if key in row}
    kwargs["loss"] = row.get("attack_loss", "ce")
    return name, kwargs


# --- the checks, in the report's order ------------------------------------------------------------

def gradients_nonzero(evidence: Evidence) -> dict[str, Any]:
    """Input gradient of the logit margin at every correctly classified probe example (one backward pass).

    The margin, not the cross-entropy: a confident model's cross-entropy gradient underflows to exactly
    zero in fp32, while the margin's gradient is zero only where the network's own gradient is.
    """
    bad, total = 0, 0
    x, y = evidence.x[evidence.clean], evidence.y[evidence.clean]
    size = evidence.batch_size
    with attacks.frozen_parameters(evidence.model):
        for start in range(0, len(y), size):
            xb, yb = x[start:start + size], y[start:start + size]
            with runtime.autocast(xb.device, evidence.amp_dtype):
                grad = attacks.input_gradient(evidence.model, xb, yb, torch.zeros_like(xb), attacks.margin)
            norms = grad.flatten(1).abs().sum(dim=1)
            bad += int(((norms == 0) | ~torch.isfinite(norms)).sum())
            total += len(yb)
    return check(
        "gradients_nonzero", "input gradients are non-zero and finite", bad <= evidence.tolerance * total,
        f"{bad} of {total} correctly classified examples have a zero or non-finite input gradient",
        "shattered gradients (Athalye et al. 2018): a non-differentiable step in the forward pass (rounding, "
        "quantisation, thresholding, JPEG, argmax) stops the gradient, so gradient attacks cannot move. "
        "Attack through a differentiable approximation of that step (BPDA), and trust gradient-free attacks "
        "(Square, in attack=autoattack) over PGD here.")


def iterative_beats_single_step(evidence: Evidence) -> dict[str, Any] | None:
    """Iterative attacks at least as strong as single-step ones: the whole set, every eps > 0. Where the
    evaluation lacks either kind, FGSM and a 20-step PGD are both probed. None without an eps > 0."""
    single, iterative = evidence.of_kind("fgsm"), evidence.of_kind(*ITERATIVE)
    lines, ok = [], True
    for eps in evidence.attacked:
        if single and iterative:
            fgsm_acc = min(evidence.acc(eps, name) for name in single)
            best = min(iterative, key=lambda name: evidence.acc(eps, name))
            best_acc, slack = evidence.acc(eps, best), evidence.on_all
        else:  # not among the evaluation attacks: probe both
            best, fgsm_acc = "pgd-20", accuracy(evidence.measure(attacks.fgsm, eps))
            best_acc = accuracy(evidence.measure(_pgd(steps=20, norm=evidence.norm), eps))
            slack = evidence.on_probe
        ok &= best_acc <= fgsm_acc + slack
        lines.append(f"eps={format_eps(eps)}: FGSM {pct(fgsm_acc)}, {best} {pct(best_acc)}")
    if not lines:
        return None
    return check(
        "iterative_beats_single_step", "iterative attacks are at least as strong as single-step ones", ok,
        "; ".join(lines),
        "gradient masking: the loss is flat or noisy near x, so small gradient steps get nowhere while one "
        "large step happens to land (Athalye et al. 2018; Carlini et al. 2019). Less often, a PGD step size "
        "(alpha) far too small for its number of steps.")


def autoattack_agrees_with_pgd(evidence: Evidence) -> dict[str, Any] | None:
    """AutoAttack, when evaluated, finds (almost) nothing the PGD attacks missed. None without both."""
    ensembles, pgds = evidence.of_kind("autoattack"), evidence.of_kind("pgd")
    if not (ensembles and pgds):
        return None
    lines, ok = [], True
    for eps in evidence.attacked:
        best = min(pgds, key=lambda name: evidence.acc(eps, name))
        ours, theirs = evidence.acc(eps, best), min(evidence.acc(eps, name) for name in ensembles)
        ok &= theirs >= ours - evidence.on_all
        lines.append(f"eps={format_eps(eps)}: {best} {pct(ours)}, AutoAttack {pct(theirs)}")
    return check(
        "autoattack_agrees_with_pgd", "AutoAttack breaks (almost) nothing that PGD missed", ok, "; ".join(lines),
        "gradient masking, or a PGD too weak for this model: AutoAttack's step-size-free APGD, its targeted "
        "losses or its gradient-free Square attack found what PGD could not (Croce & Hein 2020). Trust the "
        "AutoAttack number, and look for what blocks PGD's gradient.")


def probe_curve(evidence: Evidence) -> Probe:
    """The strongest evaluation PGD's accuracy on the probe examples by eps: the evaluation's own outcomes
    where it ran, a probe elsewhere, then probes at twice the largest eps and at a radius allowing any image."""
    top = evidence.top
    acc_at_top = {name: row["acc"] for name, row in evidence.results[top].items() if name in evidence.described}
    name, settings = base_attack(evidence.described, acc_at_top)
    settings = {**settings, "norm": evidence.norm}
    attack = _pgd(**settings)
    big = large_eps(evidence.norm, evidence.x[0].numel())
    curve = [(0.0, accuracy(evidence.clean))]
    for eps in evidence.attacked:
        hits = evidence.correct[eps].get(name)
        curve.append((eps, accuracy(hits) if hits is not None else accuracy(evidence.measure(attack, eps))))
    at_top = curve[-1][1]  # the largest eps's (eps 0's when it is the only one)
    if 0 < 2 * top < big:
        curve.append((2 * top, accuracy(evidence.measure(attack, 2 * top))))
    curve.append((big, accuracy(evidence.measure(attack, big))))
    return Probe(name, settings, curve, big, at_top)


def accuracy_falls_with_eps(evidence: Evidence, probe: Probe) -> dict[str, Any]:
    """Accuracy does not rise with eps: the probe curve, and each attack's own curve over the eps list."""
    rises = _rises(probe.name, probe.curve, evidence.on_probe)
    for name in evidence.described:
        rises += _rises(name, [(eps, evidence.acc(eps, name)) for eps in evidence.eps_values], evidence.on_all)
    shown = ", ".join(f"{format_eps(eps)}: {pct(a)}" for eps, a in probe.curve)
    return check(
        "accuracy_falls_with_eps", "accuracy does not rise as eps grows", not rises,
        f"{probe.name} on {evidence.n} examples by eps: {shown}" + (f"; rises: {'; '.join(rises)}" if rises else ""),
        "gradient masking: a larger budget can never help the model, so the attack is not finding the worst "
        "case (Carlini et al. 2019). Check also that the attack's step size scales with eps.")


def _rises(name: str, curve: list[tuple[float, float]], slack: float) -> list[str]:
    """Each step of an (eps, accuracy) curve where accuracy rises by more than ``slack``, as text."""
    return [f"{name} {pct(a0)} at eps={format_eps(e0)} -> {pct(a1)} at eps={format_eps(e1)}"
            for (e0, a0), (e1, a1) in zip(curve, curve[1:]) if a1 > a0 + slack]


def large_eps_reaches_zero(evidence: Evidence, probe: Probe) -> dict[str, Any]:
    """A budget that allows any image leaves nothing correct."""
    big = probe.large_eps
    return check(
        "large_eps_reaches_zero", f"at eps={big:.4g} ({evidence.norm}), where every image is allowed, accuracy is ~0%",
        probe.large_acc <= evidence.on_probe,
        f"{probe.name} at eps={big:.4g} on {evidence.n} examples: {pct(probe.large_acc)} still correct",
        "gradient masking or a broken attack: with an unbounded budget a working attack reaches 0% (Athalye "
        "et al. 2018; Carlini et al. 2019). Look for a non-differentiable or saturating layer in the forward "
        "pass, or check the attack's clamping and projection.")


def stronger_probe(evidence: Evidence, probe: Probe) -> Stronger:
    """The probe PGD with ``steps_factor`` x its steps and ``restarts_factor`` x its restarts, at the largest eps."""
    steps = int(probe.settings.get("steps", 20)) * evidence.steps_factor
    restarts = int(probe.settings.get("restarts", 1)) * evidence.restarts_factor
    attack = _pgd(**{**probe.settings, "steps": steps, "restarts": restarts})
    return Stronger(f"{probe.name} with {steps} steps x {restarts} restart(s)", evidence.measure(attack, evidence.top))


def more_steps_do_not_raise_accuracy(evidence: Evidence, probe: Probe, stronger: Stronger) -> dict[str, Any]:
    """More steps and restarts never give a higher accuracy."""
    strong_acc = accuracy(stronger.correct)
    return check(
        "more_steps_do_not_raise_accuracy", "more steps or restarts do not raise accuracy",
        strong_acc <= probe.at_top + evidence.on_probe,
        f"eps={format_eps(evidence.top)}, {evidence.n} examples: {probe.name} {pct(probe.at_top)}, "
        f"{stronger.label} {pct(strong_acc)}" + _paired_noise(evidence, probe.name, stronger.correct),
        "a randomised model or defence: each forward pass differs, so more iterations land on lucky draws. "
        "Average gradients over the randomness (EOT, Athalye et al. 2018) and report the worst case.")


def attack_converged(evidence: Evidence, stronger: Stronger) -> dict[str, Any]:
    """A stronger attack (``evidence.stronger``, else the "more steps" PGD) breaks (almost) nothing that every
    evaluation attack missed."""
    outcomes = evidence.correct[evidence.top]
    unbroken = torch.stack(list(outcomes.values())).all(dim=0) if outcomes else evidence.clean
    n = len(stronger.correct)  # the stronger probe may run on the first few probe examples only
    unbroken = unbroken[:n]
    missed = int((unbroken & ~stronger.correct).sum())
    label = stronger.label
    return check(
        "attack_converged", "a stronger attack breaks (almost) nothing that every evaluation attack missed",
        missed <= allowed(evidence.tolerance, n) * n,
        f"eps={format_eps(evidence.top)}, {n} examples: {label} broke {missed} example(s) no evaluation "
        f"attack broke (any attack {pct(accuracy(unbroken))}, {label} {pct(accuracy(stronger.correct))}; together "
        f"{pct(accuracy(unbroken & stronger.correct))}, {noise(unbroken, unbroken & stronger.correct)})",
        "the evaluation attacks are too weak or have not converged, so the robust accuracy reported is too "
        "high: use the default evaluation (evaluation=default) with its budgets, whose AutoAttack attacks a "
        "misleading gradient does not fool, or evaluation=autoattack; where the default itself warns, its random "
        "draws missed what the probe's found: give every attack more starts with restarts=N (Carlini et al. 2019: "
        "run attacks until they converge).")


def _pgd(**kwargs: Any) -> attacks.Attack:
    """An evaluation PGD (early stop) with these settings, as ``attack(model, x, y, eps)``."""
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    return lambda model, x, y, eps: attacks.pgd(model, x, y, eps, **{**kwargs, "early_stop": True})
