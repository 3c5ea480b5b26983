"""Per-example evaluation outcomes: which examples each attack left correctly classified.

Two ways to spend the attacks' work, both on the examples the model classifies correctly without attack
(an example it already gets wrong is broken for every attack: x itself is adversarial at distance 0):

- `attack_outcomes` (``evaluation=fast``): every attack runs on all of them, so each row of the table is that
  attack's own robust accuracy and the "any attack" row is their per-example AND.
- `cascade_outcomes` (``evaluation=default``): each attack runs on every example the attacks before it left
  standing, at its full budget, so each row is the accuracy *after* that attack and the last row is the
  evaluation's number, as in AutoAttack. No example is skipped on a guess, so which examples an attack runs
  on never depends on the batch (their random starts do: the batch size is one of the evaluation's settings).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from advcli import attacks as attacks_module, distributed, runtime
from advcli.attacks import Attack
from advcli.errors import ConfigError
from advcli.runs.stats import wilson_interval

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[str], None]  # called with an attack's name each time it is done with a batch (a progress bar)


def is_clean(attack: Attack) -> bool:
    """Whether ``attack`` is `attacks.none` (possibly bound with hyper-parameters by Hydra)."""
    return getattr(attack, "func", attack) is attacks_module.none


def with_interval(row: dict, hits: int, n: int) -> dict:
    """``row`` with ``acc``, ``n`` and ``ci95`` (Wilson score interval, 95%) of ``hits`` correct out of ``n``."""
    return {**row, "acc": hits / n, "n": n, "ci95": list(wilson_interval(hits, n))}


@dataclass(kw_only=True)
class Outcomes:
    """Per-example results of one pass: which examples each attack left correctly classified, the
    cross-entropy at each attack's output, the seconds each attack took (attack + forward) and how many
    examples it ran on. ``cascade``: each row is the accuracy after that attack and the ones before it."""

    clean: torch.Tensor                                   # bool (N,): correct without attack
    correct: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool (N,)
    loss: dict[str, torch.Tensor] = field(default_factory=dict)     # name -> float (N,)
    time_s: dict[str, float] = field(default_factory=dict)
    # models with an "adversarial input" output (trainer=adv_class): attack name -> bool (N,), the model
    # predicted the flag on the attack's output; and on the clean input (false flags). Empty / None otherwise.
    flagged: dict[str, torch.Tensor] = field(default_factory=dict)
    false_flags: torch.Tensor | None = None
    attacked: dict[str, int] = field(default_factory=dict)  # name -> examples the attack ran on
    cascade: bool = False

    def summary(self) -> dict[str, dict[str, float]]:
        """``{name: {"acc", "n", "ci95", "loss", "attacked"}, ..., "any_attack": {"acc", "n", "ci95"}}``, fractions
        in [0, 1], ``ci95`` the Wilson score interval. (Times are left out, so that two seeded runs give equal
        results.)

        For a model with an "adversarial input" output each attack also gets ``flagged`` (the fraction of
        inputs predicted as the flag) and ``acc_with_rejection`` (correct or flagged: the attack failed);
        the clean row's ``flagged`` is the false-flag rate, and ``any_attack`` gets the per-example worst
        case with rejection and ``worst_attack``, the single attack with the lowest such accuracy.
        """
        n = len(self.clean)
        if n == 0:
            raise ConfigError("There were no examples to evaluate; check evaluation.num_examples and the split.")
        results = {name: with_interval({"loss": self.loss[name].sum().item() / n,
                                        "attacked": self.attacked.get(name, 0)},
                                       int(self.correct[name].sum()), n)
                   for name in self.correct}
        results["any_attack"] = with_interval({}, int(self.standing().sum()), n)
        if self.flagged:
            self._add_rejection(results, n)
        return results

    def _add_rejection(self, results: dict[str, dict[str, float]], n: int) -> None:
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

    def head(self, n: int) -> Outcomes:
        """The outcomes of the first ``n`` examples."""
        return Outcomes(clean=self.clean[:n], correct={k: v[:n] for k, v in self.correct.items()},
                        loss={k: v[:n] for k, v in self.loss.items()}, time_s=dict(self.time_s),
                        flagged={k: v[:n] for k, v in self.flagged.items()},
                        false_flags=None if self.false_flags is None else self.false_flags[:n],
                        attacked=dict(self.attacked), cascade=self.cascade)

    def standing(self) -> torch.Tensor:
        """Which examples are correct without attack and under every attack, bool (N,)."""
        unbroken = self.clean.clone()
        for hits in self.correct.values():
            unbroken &= hits
        return unbroken

    def then(self, cascade: Outcomes) -> Outcomes:
        """These outcomes (attacks run alone) followed by a cascade run on what they left standing, as one."""
        return Outcomes(clean=self.clean, correct={**self.correct, **cascade.correct},
                        loss={**self.loss, **cascade.loss}, time_s={**self.time_s, **cascade.time_s},
                        flagged=dict(self.flagged), false_flags=self.false_flags,
                        attacked={**self.attacked, **cascade.attacked}, cascade=True)

    def gathered(self) -> Outcomes:
        """Under torchrun: every rank's outcomes (each rank evaluated a contiguous share), in order."""
        names = list(self.attacked)
        counts = distributed.total_counts(*(self.attacked[k] for k in names), device=self.clean.device)
        return Outcomes(clean=distributed.gather(self.clean),
                        correct={k: distributed.gather(v) for k, v in self.correct.items()},
                        loss={k: distributed.gather(v) for k, v in self.loss.items()}, time_s=dict(self.time_s),
                        flagged={k: distributed.gather(v) for k, v in self.flagged.items()},
                        false_flags=None if self.false_flags is None else distributed.gather(self.false_flags),
                        attacked=dict(zip(names, counts)), cascade=self.cascade)
@dataclass
class _Parts:
    """One pass's per-batch pieces, concatenated into `Outcomes` at the end."""

    clean: list[torch.Tensor] = field(default_factory=list)
    correct: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    loss: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    flagged: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    false_flags: list[torch.Tensor] = field(default_factory=list)
    time_s: dict[str, float] = field(default_factory=dict)
    attacked: dict[str, int] = field(default_factory=dict)

    def outcomes(self, device: torch.device, adversarial_class: bool, cascade: bool = False) -> Outcomes:
        def cat(pieces: list[torch.Tensor], dtype=torch.bool) -> torch.Tensor:
            return torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=device)

        return Outcomes(clean=cat(self.clean), correct={k: cat(v) for k, v in self.correct.items()},
                        loss={k: cat(v, torch.float32) for k, v in self.loss.items()}, time_s=self.time_s,
                        flagged={k: cat(v) for k, v in self.flagged.items()} if adversarial_class else {},
                        false_flags=cat(self.false_flags) if adversarial_class else None,
                        attacked=self.attacked, cascade=cascade)


def _attack_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, eps: float,
                  amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at ``attack``'s output for a batch the model classifies correctly, and the attack's seconds."""
    started = time.perf_counter()
    with torch.no_grad(), runtime.autocast(x.device, amp_dtype):
        logits = model(attack(model, x, y, eps))  # input gradients enable grad inside the attack
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)  # so the time is the attack's, not a later one's
    return logits.float(), time.perf_counter() - started


def attack_outcomes(model: nn.Module, batches: Batches, attacks: Mapping[str, Attack], *, eps: float,
                    amp_dtype: torch.dtype | None = None, adversarial_class: bool = False,
                    step: Step | None = None) -> Outcomes:
    """Attack every batch with every attack and keep the per-example results (see `Outcomes`).

    Examples the model misclassifies without attack count as broken by every attack and are not
    attacked; the rest go to every attack. The model runs in eval mode and is left in the mode it came
    in, with its weights untouched. ``adversarial_class``: the model's last output means "adversarial
    input"; record which inputs it flags. ``step``: called after each attack on each batch (a progress bar's
    update: len(attacks) steps a batch).
    """
    parts = _new_parts(attacks)
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
                    parts.attacked[name] += len(right)
                elif not is_clean(attack):
                    correct = torch.zeros_like(clean)
                parts.correct[name].append(correct)
                parts.loss[name].append(loss)
                if name in parts.flagged:
                    parts.flagged[name].append(flagged)
                if step is not None:
                    step(name)
    return parts.outcomes(next(model.parameters()).device, adversarial_class)




def _new_parts(attacks: Mapping[str, Attack]) -> _Parts:
    return _Parts(correct={n: [] for n in attacks}, loss={n: [] for n in attacks}, time_s=dict.fromkeys(attacks, 0.0),
                  flagged={n: [] for n in attacks if not is_clean(attacks[n])}, attacked=dict.fromkeys(attacks, 0))


def margin_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How far each example is from being broken: its true logit minus the largest other one (< 0: broken)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)


def cascade_outcomes(model: nn.Module, batches: Batches, attacks: Mapping[str, Attack], *, eps: float,
                     standing: torch.Tensor | None = None, amp_dtype: torch.dtype | None = None,
                     step: Step | None = None) -> Outcomes:
    """Attack every batch with each attack in turn, each on every example the earlier ones left correctly
    classified, at its full budget (see the module's docstring). ``standing``: bool (N,) over all batches, the
    examples still standing before the first attack (e.g. after attacks that ran alone); default: those the
    model classifies correctly. ``correct[name]``: still correct after that attack and every one before it;
    ``loss[name]``: the cross-entropy at the worst point found up to it (the highest-loss point kept so far).
    ``step``: as in `attack_outcomes`."""
    parts = _new_parts(attacks)
    offset = 0
    with runtime.eval_mode(model):
        for x, y in batches:
            with torch.no_grad(), runtime.autocast(x.device, amp_dtype):
                logits = model(x).float()
            clean = logits.argmax(dim=1) == y
            alive = clean if standing is None else clean & standing[offset:offset + len(y)]
            offset += len(y)
            parts.clean.append(clean)
            worst = logits.clone()
            for name, attack in attacks.items():
                live = alive.nonzero().squeeze(1)
                if not is_clean(attack) and len(live):
                    found, seconds = _attack_batch(model, attacks_module.take(x, live), y[live], attack, eps, amp_dtype)
                    parts.attacked[name] += len(live)
                    parts.time_s[name] += seconds
                    worse = margin_of(found, y[live]) < margin_of(worst[live], y[live])
                    worst[live[worse]] = found[worse]
                    alive = alive.clone()
                    alive[live] = found.argmax(dim=1) == y[live]
                parts.correct[name].append(alive.clone())
                parts.loss[name].append(F.cross_entropy(worst, y, reduction="none"))
                if step is not None:
                    step(name)
    return parts.outcomes(next(model.parameters()).device, adversarial_class=False, cascade=True)
