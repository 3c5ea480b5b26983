"""The default evaluation: AutoAttack's attacks through the reference code (advcli.autoattack), run as a cascade
in which each attack sees only what the ones before it left standing, and Square focused on the survivors
closest to the boundary (advcli.outcomes)."""

from __future__ import annotations

import math

import pytest
import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.square import SquareAttack

from advcli import config
from advcli.attacks import pgd
from advcli.autoattack import apgd, apgd_targeted, square
from advcli.errors import ConfigError
from advcli.evaluate import evaluation_attacks
from advcli.outcomes import cascade_outcomes, margin_of
from conftest import compose_config

EPS = 0.1


def broken(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_default_preset_is_autoattacks_attacks_as_a_cascade():
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1"])
    _, described = evaluation_attacks(cfg.evaluation.attacks)
    assert cfg.evaluation.name == "default" and cfg.evaluation.cascade is True
    assert list(described) == ["clean", "pgd_margin", "apgd_ce", "apgd_t", "square"]
    assert [described[n]["attack"] for n in described] == ["none", "pgd", "apgd", "apgd_targeted", "square"]
    assert described["pgd_margin"]["early_stop"] is True and described["apgd_t"]["targets"] == 3
    assert 0 < cfg.evaluation.focus.square < 1 and 0 < cfg.evaluation.escalate.when < 1
    # where gradients mislead: AutoAttack's own strength (and APGD-CE again, from more random starts)
    assert dict(cfg.evaluation.escalate.attacks) == {"apgd_ce": {"steps": 100, "restarts": 5},
                                                     "apgd_t": {"targets": 9, "steps": 100}, "square": {"queries": 5000}}
    fast = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1", "evaluation=fast"])
    assert fast.evaluation.name == "fast" and fast.evaluation.cascade is False


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_breaks_what_the_reference_breaks(robust_mlp, loss):
    model, x, y = robust_mlp
    ours = apgd(model, x, y, EPS, loss=loss, steps=20, seed=3)
    torch.manual_seed(0)  # the reference reseeds itself; this must not matter
    theirs = APGDAttack(model, n_iter=20, eps=EPS, seed=3, loss=loss, device=x.device).perturb(x, y)
    mine, reference = broken(model, ours, y), broken(model, theirs, y)
    print(f"{loss}: ours broke {int(mine.sum())}, the reference {int(reference.sum())} of {len(y)}")
    assert 0 < int(reference.sum()) < len(y)
    assert int((mine ^ reference).sum()) <= 1
    assert (ours - x).abs().max() <= EPS + 1e-6 and ours.min() >= 0 and ours.max() <= 1


def test_targeted_apgd_and_square_break_what_the_reference_breaks(robust_mlp):
    model, x, y = robust_mlp
    theirs = APGDAttack_targeted(model, n_iter=10, eps=EPS, seed=0, n_target_classes=3, device=x.device).perturb(x, y)
    ours = apgd_targeted(model, x, y, EPS, targets=3, steps=10)
    assert int((broken(model, ours, y) ^ broken(model, theirs, y)).sum()) <= 1
    theirs = SquareAttack(model, n_queries=200, eps=EPS, p_init=0.8, seed=0, resc_schedule=False,
                          device=x.device).perturb(x, y)
    ours = square(model, x, y, EPS, queries=200)
    assert 0 < int(broken(model, theirs, y).sum())
    assert int((broken(model, ours, y) ^ broken(model, theirs, y)).sum()) <= 1


def test_apgd_halves_its_step_size_where_the_reference_does(robust_mlp, monkeypatch):
    model, x, y = robust_mlp
    halvings: list[list[tuple[int, int]]] = []
    original = APGDAttack.check_oscillation

    def recorded(self, *args, **kwargs):
        flags = original(self, *args, **kwargs)
        halvings[-1].append((args[1], int(flags.sum())))  # (iteration, examples whose step halves)
        return flags

    monkeypatch.setattr(APGDAttack, "check_oscillation", recorded)
    halvings.append([])
    APGDAttack(model, n_iter=50, eps=EPS, seed=1, device=x.device).perturb(x, y)
    halvings.append([])
    apgd(model, x, y, EPS, steps=50, seed=1)
    reference, ours = halvings
    print("checkpoints (iteration, examples halved):", ours)
    assert ours == reference and sum(count for _, count in ours) > 0


def test_reference_attacks_are_for_evaluation_only():
    for name in ("apgd_ce", "apgd_t", "square"):
        cfg = compose_config("train", [f"attack={name}"])
        with pytest.raises(ConfigError, match="evaluation attack"):
            config.check_attack_fits("attack", cfg.attack, norm="linf", num_classes=10, training=True)
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1"])
    with pytest.raises(ConfigError, match="at least 4 classes.*evaluation=fast"):
        config.check_evaluation_attacks(cfg.evaluation.attacks, norm="linf", num_classes=3)
    with pytest.raises(ConfigError, match="evaluation=fast"):
        config.check_evaluation_attacks(cfg.evaluation.attacks, norm="linf", num_classes=11, adversarial_class=True)


class RowSpy:
    """An attack that records which examples (by position in ``x_all``) it was given, and breaks none."""

    def __init__(self, x_all: torch.Tensor):
        self.x_all, self.calls = x_all.flatten(1), []

    def __call__(self, model, x, y, eps):
        rows = (x.flatten(1)[:, None, :] == self.x_all[None]).all(dim=2).float().argmax(dim=1)
        self.calls.append(rows.tolist())
        return x


def test_cascade_attacks_only_what_the_attacks_before_left_standing(robust_mlp):
    model, x, y = robust_mlp
    spy = RowSpy(x)
    found = cascade_outcomes(model, [(x, y)], {"pgd": lambda m, a, b, e: pgd(m, a, b, e, steps=5), "spy": spy}, eps=EPS)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    survivors = found.correct["pgd"]
    assert 0 < int(survivors.sum()) < int(clean.sum()), "PGD should break some, not all"
    assert sorted(spy.calls[0]) == survivors.nonzero().squeeze(1).tolist()  # never a broken example
    summary = found.summary()
    assert summary["pgd"]["attacked"] == int(clean.sum()) and summary["spy"]["attacked"] == int(survivors.sum())
    assert torch.equal(found.correct["spy"], survivors) and summary["any_attack"]["acc"] == summary["spy"]["acc"]


def test_focus_takes_the_survivors_nearest_the_boundary_first_and_stops_when_a_share_breaks_nothing(robust_mlp):
    model, x, y = robust_mlp
    with torch.no_grad():
        logits = model(x)
    right = (logits.argmax(1) == y).nonzero().squeeze(1)
    spy = RowSpy(x)
    found = cascade_outcomes(model, [(x, y)], {"spy": spy}, eps=EPS, focus={"spy": 0.25})
    share = math.ceil(0.25 * len(right))
    assert len(spy.calls) == 1 and len(spy.calls[0]) == share == found.summary()["spy"]["attacked"]
    nearest = right[margin_of(logits[right], y[right]).argsort()[:share]]
    assert sorted(spy.calls[0]) == sorted(nearest.tolist())

    calls = []

    def breaks_all(model, x_rows, y_rows, eps):
        calls.append(len(y_rows))
        return torch.zeros_like(x_rows) if len(calls) < 4 else x_rows  # every share but the last breaks some

    found = cascade_outcomes(model, [(x, y)], {"strong": breaks_all}, eps=1.0, focus={"strong": 0.25})
    assert len(calls) == 4 and sum(calls) == len(right) == found.summary()["strong"]["attacked"]


def test_escalated_settings_are_used_only_where_later_attacks_broke_much_of_what_the_first_left():
    from advcli.outcomes import Escalation, misleading

    assert not misleading(100, 95, 0.05) and misleading(100, 94, 0.05) and not misleading(0, 0, 0.05)
    assert not misleading(None, 10, 0.05)  # nothing has run yet

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4, bias=False))
    torch.nn.init.eye_(model[1].weight)  # logits = the pixels: an example is class argmax(x)
    x = torch.eye(4).repeat(25, 1).view(100, 1, 1, 4)
    y = x.flatten(1).argmax(1)

    def breaks(count: int):
        def attack(model, x_rows, y_rows, eps):  # breaks the first `count` rows it is given
            out = x_rows.clone()
            out[:count] = out[:count].roll(1, dims=-1)
            return out
        return attack

    def run(second_breaks: int) -> dict:
        weak, strong = RowSpy(x), RowSpy(x)
        found = cascade_outcomes(model, [(x, y)], {"first": breaks(0), "second": breaks(second_breaks), "last": weak},
                                 eps=1.0, escalate=Escalation(0.05, {"last": strong}))
        summary = found.summary()
        assert summary["second"]["attacked"] == 100 and summary["last"]["attacked"] == 100 - second_breaks
        return {"weak": len(weak.calls), "strong": len(strong.calls), "escalated": summary["last"]["escalated"]}

    assert run(0) == run(5) == {"weak": 1, "strong": 0, "escalated": 0}  # the gradient attacks agree: no escalation
    assert run(6) == {"weak": 0, "strong": 1, "escalated": 94}  # 6% broken after the first: gradients mislead

    def rerun(second_breaks: int) -> tuple[list[int], dict]:
        again = RowSpy(x)
        found = cascade_outcomes(model, [(x, y)], {"first": breaks(0), "second": breaks(second_breaks)}, eps=1.0,
                                 escalate=Escalation(0.05, {"second": again}))
        return [len(rows) for rows in again.calls], found.summary()["second"]

    # the attack whose breaks reveal misleading gradients runs again at its escalated strength on what it left
    calls, row = rerun(6)
    assert calls == [94] and row["attacked"] == 100 + 94 and row["escalated"] == 94
    assert rerun(5)[0] == []
