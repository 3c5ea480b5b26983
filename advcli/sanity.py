"""The gradient-masking report: checks that a robustness number deserves trust.

A weak attack or a masked gradient makes a model look robust when it is not. The checks below come
from Athalye, Carlini & Wagner 2018 ("Obfuscated gradients give a false sense of security") and
Carlini et al. 2019 ("On evaluating adversarial robustness"); each returns a verdict, ``pass`` or
``warn``, a detail with the numbers, and for a warning the likely cause.

Most checks read numbers the evaluation already has (per-example outcomes of every attack at every
eps); the rest run cheap probes on the first ``num_examples`` evaluated examples: one input gradient,
the strongest PGD at a large eps and at twice the largest eps, and the same PGD with more steps and
restarts. Probes count an example misclassified without any attack as broken, as the evaluation does.

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
from typing import Any, Callable, Mapping

import torch
from torch import nn

from advcli import attacks, runtime
from advcli.config import format_eps

# A probe: (attack, eps) -> per-example "still correctly classified" on the probe examples, bool (n,).
Measure = Callable[[attacks.Attack, float], torch.Tensor]

ITERATIVE = ("pgd",)  # AutoAttack has its own check: with it here, its strength would hide a weak PGD


def large_eps(norm: str, dim: int) -> float:
    """A radius that allows every image of [0, 1]^dim from any x: 1 for L-inf, the cube's diagonal for L2."""
    return 1.0 if norm == "linf" else math.sqrt(dim)


def check(name: str, statement: str, ok: bool, detail: str, cause: str) -> dict[str, Any]:
    return {"name": name, "check": statement, "verdict": "pass" if ok else "warn", "detail": detail,
            "likely_cause": None if ok else cause}


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def allowed(tolerance: float, n: int) -> float:
    """The accuracy difference taken as noise: ``tolerance``, and never less than one example in ``n``."""
    return max(tolerance, 1.0 / max(n, 1))


def base_attack(described: Mapping[str, Mapping[str, Any]], acc_at: Mapping[str, float]) -> tuple[str, dict[str, Any]]:
    """The strongest evaluation PGD (lowest accuracy at the largest eps) and its settings as `pgd` keywords.
    Without one, a 20-step margin-loss PGD."""
    candidates = [name for name, row in described.items() if row.get("attack") == "pgd"]
    if not candidates:
        return "pgd-20 (probe)", dict(steps=20, loss="margin", restarts=1)
    name = min(candidates, key=lambda n: acc_at.get(n, 1.0))
    row = described[name]
    kwargs = {key: row[key] for key in ("alpha", "steps", "norm", "random_start", "restarts") if key in row}
    kwargs["loss"] = row.get("attack_loss", "ce")
    return name, kwargs


def gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, *, batch_size: int,
                   amp_dtype: torch.dtype | None, tolerance: float) -> dict[str, Any]:
    """Input gradient of the logit margin at every correctly classified probe example (one backward pass).

    The margin, not the cross-entropy: a confident model's cross-entropy gradient underflows to exactly
    zero in fp32, while the margin's gradient is zero only where the network's own gradient is.
    """
    bad, total = 0, 0
    x, y = x[clean], y[clean]
    with attacks.frozen_parameters(model):
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            with runtime.autocast(xb.device, amp_dtype):
                grad = attacks.input_gradient(model, xb, yb, torch.zeros_like(xb), attacks.margin)
            size = grad.flatten(1).abs().sum(dim=1)
            bad += int(((size == 0) | ~torch.isfinite(size)).sum())
            total += len(yb)
    ok = bad <= tolerance * total
    return check(
        "gradients_nonzero", "input gradients are non-zero and finite", ok,
        f"{bad} of {total} correctly classified examples have a zero or non-finite input gradient",
        "shattered gradients (Athalye et al. 2018): a non-differentiable step in the forward pass (rounding, "
        "quantisation, thresholding, JPEG, argmax) stops the gradient, so gradient attacks cannot move. "
        "Attack through a differentiable approximation of that step (BPDA), and trust gradient-free attacks "
        "(Square, in attack=autoattack) over PGD here.")


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str,
               results: Mapping[float, Mapping[str, Mapping[str, Any]]], num_evaluated: int,
               correct: Mapping[float, Mapping[str, torch.Tensor]], clean: torch.Tensor,
               described: Mapping[str, Mapping[str, Any]], measure: Measure, batch_size: int = 500,
               amp_dtype: torch.dtype | None = None, tolerance: float = 0.01, steps_factor: int = 5,
               restarts_factor: int = 2) -> dict[str, Any]:
    """Every check, as ``{"verdict": "pass"|"warn", "num_examples", "checks": [{name, check, verdict,
    detail, likely_cause}, ...]}``.

    Args:
        model: the evaluated model, in eval mode. x, y: the probe examples, (n, C, H, W) in [0, 1] and (n,),
            the first n evaluated examples.
        results: per eps, the evaluation's summary ``{attack: {"acc", ...}, "any_attack": {"acc"}}``, over
            all ``num_evaluated`` examples.
        correct: per eps, per attack, which probe examples the attack left correctly classified, bool (n,).
        clean: which probe examples are correctly classified without attack, bool (n,).
        described: each evaluation attack's settings (``attack`` kind, steps, restarts, ...).
        measure: runs an attack at an eps on the probe examples (see `Measure`).
        tolerance: accuracy differences (fractions) up to this, or one example, count as noise.
        steps_factor, restarts_factor: how much stronger the "more steps" probe is.
    """
    n = len(y)
    eps_values = sorted(results)
    top = eps_values[-1]
    on_probe, on_all = allowed(tolerance, n), allowed(tolerance, num_evaluated)
    acc = lambda hits: hits.float().mean().item()  # noqa: E731
    checks = [gradient_check(model, x, y, clean, batch_size=batch_size, amp_dtype=amp_dtype, tolerance=tolerance)]

    # iterative attacks at least as strong as single-step ones: the whole set, every eps > 0
    kinds = {name: row.get("attack") for name, row in described.items()}
    single = [name for name, kind in kinds.items() if kind == "fgsm"]
    iterative = [name for name, kind in kinds.items() if kind in ITERATIVE]
    lines, ok = [], True
    for eps in (e for e in eps_values if e > 0):
        if single and iterative:
            fgsm_acc = min(results[eps][name]["acc"] for name in single)
            best = min(iterative, key=lambda name: results[eps][name]["acc"])
            best_acc, slack = results[eps][best]["acc"], on_all
        else:  # not among the evaluation attacks: probe both
            best, fgsm_acc = "pgd-20", acc(measure(attacks.fgsm, eps))
            best_acc, slack = acc(measure(_pgd(steps=20, norm=norm), eps)), on_probe
        ok &= best_acc <= fgsm_acc + slack
        lines.append(f"eps={format_eps(eps)}: FGSM {pct(fgsm_acc)}, {best} {pct(best_acc)}")
    if lines:
        checks.append(check(
            "iterative_beats_single_step", "iterative attacks are at least as strong as single-step ones", ok,
            "; ".join(lines),
            "gradient masking: the loss is flat or noisy near x, so small gradient steps get nowhere while one "
            "large step happens to land (Athalye et al. 2018; Carlini et al. 2019). Less often, a PGD step size "
            "(alpha) far too small for its number of steps."))

    # AutoAttack, when evaluated, finds (almost) nothing the PGD attacks missed
    ensembles = [name for name, kind in kinds.items() if kind == "autoattack"]
    pgds = [name for name, kind in kinds.items() if kind == "pgd"]
    if ensembles and pgds:
        lines, ok = [], True
        for eps in (e for e in eps_values if e > 0):
            best = min(pgds, key=lambda name: results[eps][name]["acc"])
            ours, theirs = results[eps][best]["acc"], min(results[eps][name]["acc"] for name in ensembles)
            ok &= theirs >= ours - on_all
            lines.append(f"eps={format_eps(eps)}: {best} {pct(ours)}, AutoAttack {pct(theirs)}")
        checks.append(check(
            "autoattack_agrees_with_pgd", "AutoAttack breaks (almost) nothing that PGD missed", ok, "; ".join(lines),
            "gradient masking, or a PGD too weak for this model: AutoAttack's step-size-free APGD, its targeted "
            "losses or its gradient-free Square attack found what PGD could not (Croce & Hein 2020). Trust the "
            "AutoAttack number, and look for what blocks PGD's gradient."))

    # probes with the strongest evaluation PGD on the probe examples: its accuracy by eps, up to a huge eps
    base_name, base = base_attack(described, {k: v["acc"] for k, v in results[top].items() if k in described})
    base = {**base, "norm": norm}
    probe = _pgd(**base)
    big = large_eps(norm, x[0].numel())
    curve = [(0.0, acc(clean))]
    for eps in (e for e in eps_values if e > 0):
        hits = correct[eps].get(base_name)
        curve.append((eps, acc(hits) if hits is not None else acc(measure(probe, eps))))
    base_acc = dict(curve)
    if 0 < 2 * top < big:
        curve.append((2 * top, acc(measure(probe, 2 * top))))
    large_acc = acc(measure(probe, big))
    curve.append((big, large_acc))

    # accuracy does not rise with eps: the probe curve, and each attack's own curve over the eps list
    rises = [f"{base_name} {pct(a0)} at eps={format_eps(e0)} -> {pct(a1)} at eps={format_eps(e1)}"
             for (e0, a0), (e1, a1) in zip(curve, curve[1:]) if a1 > a0 + on_probe]
    for name in described:
        accs = [(eps, results[eps][name]["acc"]) for eps in eps_values]
        rises += [f"{name} {pct(a0)} at eps={format_eps(e0)} -> {pct(a1)} at eps={format_eps(e1)}"
                  for (e0, a0), (e1, a1) in zip(accs, accs[1:]) if a1 > a0 + on_all]
    shown = ", ".join(f"{format_eps(eps)}: {pct(a)}" for eps, a in curve)
    checks.append(check(
        "accuracy_falls_with_eps", "accuracy does not rise as eps grows", not rises,
        f"{base_name} on {n} examples by eps: {shown}" + (f"; rises: {'; '.join(rises)}" if rises else ""),
        "gradient masking: a larger budget can never help the model, so the attack is not finding the worst "
        "case (Carlini et al. 2019). Check also that the attack's step size scales with eps."))

    # a budget that allows any image leaves nothing correct
    checks.append(check(
        "large_eps_reaches_zero", f"at eps={big:.4g} ({norm}), where every image is allowed, accuracy is ~0%",
        large_acc <= on_probe, f"{base_name} at eps={big:.4g} on {n} examples: {pct(large_acc)} still correct",
        "gradient masking or a broken attack: with an unbounded budget a working attack reaches 0% (Athalye "
        "et al. 2018; Carlini et al. 2019). Look for a non-differentiable or saturating layer in the forward "
        "pass, or check the attack's clamping and projection."))

    # more steps and restarts: never higher accuracy, and (almost) nothing the evaluation missed
    if top > 0:
        steps = int(base.get("steps", 20)) * steps_factor
        restarts = int(base.get("restarts", 1)) * restarts_factor
        label = f"{base_name} with {steps} steps x {restarts} restart(s)"
        stronger = measure(_pgd(**{**base, "steps": steps, "restarts": restarts}), top)
        strong_acc = acc(stronger)
        checks.append(check(
            "more_steps_do_not_raise_accuracy", "more steps or restarts do not raise accuracy",
            strong_acc <= base_acc[top] + on_probe,
            f"eps={format_eps(top)}, {n} examples: {base_name} {pct(base_acc[top])}, {label} {pct(strong_acc)}",
            "a randomised model or defence: each forward pass differs, so more iterations land on lucky draws. "
            "Average gradients over the randomness (EOT, Athalye et al. 2018) and report the worst case."))
        unbroken = torch.stack(list(correct[top].values())).all(dim=0) if correct[top] else clean
        missed = int((unbroken & ~stronger).sum())
        checks.append(check(
            "attack_converged", "a stronger PGD breaks (almost) nothing that every evaluation attack missed",
            missed <= on_probe * n,
            f"eps={format_eps(top)}, {n} examples: {label} broke {missed} example(s) no evaluation attack broke "
            f"(any attack {pct(acc(unbroken))}, {label} {pct(strong_acc)})",
            "the evaluation attacks are too weak or have not converged, so the robust accuracy reported is too "
            "high: raise evaluation.attacks.pgd.steps and restarts, or add attack=autoattack (Carlini et al. "
            "2019: run attacks until they converge)."))

    return {"verdict": "warn" if any(c["verdict"] == "warn" for c in checks) else "pass", "num_examples": n,
            "checks": checks}


def _pgd(**kwargs: Any) -> attacks.Attack:
    """An evaluation PGD (early stop) with these settings, as ``attack(model, x, y, eps)``."""
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    return lambda model, x, y, eps: attacks.pgd(model, x, y, eps, **{**kwargs, "early_stop": True})
