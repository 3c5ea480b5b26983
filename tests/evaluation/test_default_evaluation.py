"""The default evaluation: FGSM and PGD alone, then AutoAttack's attacks through the reference code
(advcli.attacks.reference) at AutoAttack's own budgets, as a cascade in which each attack runs on every example the
ones before it left standing (advcli.evaluation.cascade)."""

from __future__ import annotations

import pytest
import torch
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from advcli import config
from advcli.attacks import checks as attack_checks, pgd
from advcli.attacks.reference import apgd, apgd_targeted, fab_targeted, square
from advcli.errors import ConfigError
from advcli.evaluation.cascade import cascade_outcomes
from advcli.evaluation.evaluate import evaluation_attacks
from conftest import compose_config

EPS = 0.1


def broken(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_default_preset_is_fgsm_and_pgd_alone_then_autoattacks_attacks_at_its_budgets_as_a_cascade(robust_mlp):
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1", "eps=0.1"])
    assert cfg.evaluation.name == "default" and cfg.evaluation.cascade is True
    _, alone = evaluation_attacks(cfg.evaluation.standalone_attacks)
    _, chain = evaluation_attacks(cfg.evaluation.attacks)
    assert [alone[n]["attack"] for n in alone] == ["none", "fgsm", "pgd"]
    assert [chain[n]["attack"] for n in chain] == ["pgd", "apgd", "apgd_targeted", "fab_targeted", "square"]
    # every reference attack at the budget standard AutoAttack gives it (read from the reference code itself)
    reference = AutoAttack(robust_mlp[0], norm="Linf", eps=0.1, version="standard", seed=0)
    assert reference.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (chain["apgd_ce"]["steps"], chain["apgd_ce"]["restarts"]) == (reference.apgd.n_iter, reference.apgd.n_restarts)
    apgd_t, fab_t, sq = chain["apgd_t"], chain["fab_t"], chain["square"]
    assert (apgd_t["targets"], apgd_t["steps"], apgd_t["restarts"]) == (
        reference.apgd_targeted.n_target_classes, reference.apgd_targeted.n_iter, reference.apgd_targeted.n_restarts)
    assert (fab_t["targets"], fab_t["steps"], fab_t["restarts"]) == (
        reference.fab.n_target_classes, reference.fab.n_iter, reference.fab.n_restarts)
    assert (sq["queries"], sq["p_init"], sq["restarts"]) == (
        reference.square.n_queries, reference.square.p_init, reference.square.n_restarts)
    assert "focus" not in cfg.evaluation and "escalate" not in cfg.evaluation
    fast = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1", "evaluation=fast"])
    assert fast.evaluation.name == "fast" and fast.evaluation.cascade is False


def test_restarts_and_the_evaluation_seed_reach_every_attack_that_has_them():
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=3", "evaluation.seed=7"])
    _, described = evaluation_attacks({**cfg.evaluation.standalone_attacks, **cfg.evaluation.attacks})
    restarts = {name: row["restarts"] for name, row in described.items() if "restarts" in row}
    assert restarts == {"fgsm": 1, "pgd": 3, "pgd_margin": 3, "apgd_ce": 3, "apgd_t": 3, "fab_t": 3, "square": 3}
    assert {name: row["seed"] for name, row in described.items() if "seed" in row} == dict.fromkeys(
        ["apgd_ce", "apgd_t", "fab_t", "square"], 7)
    aa = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=3", "evaluation=autoattack", "evaluation.seed=7"])
    assert aa.evaluation.attacks.autoattack.seed == 7
    with pytest.raises(ConfigError, match="restarts=3 cannot reach AutoAttack"):
        attack_checks.check_evaluation_attacks(aa.evaluation.attacks, norm="linf", num_classes=10)


@pytest.mark.parametrize("key", ["+evaluation.focus.square=0.1", "+evaluation.escalate.when=0.05"])
def test_retired_settings_that_skipped_examples_on_a_guess_are_refused(key):
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1", key])
    with pytest.raises(ConfigError, match="is no longer a setting"):
        config.check_evaluation_config(cfg.evaluation)


def test_one_name_for_an_attack_alone_and_in_the_cascade_is_refused():
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1", "+attack@evaluation.attacks.pgd=pgd"])
    with pytest.raises(ConfigError, match="one name for two attacks"):
        config.check_evaluation_config(cfg.evaluation)


def test_the_evaluation_batch_size_is_part_of_what_a_run_is():
    from advcli.runs import seeds

    small, large = (compose_config("train", [f"evaluation.batch_size={size}"]) for size in (100, 500))
    assert config.fingerprint(small, precision="fp32") != config.fingerprint(large, precision="fp32")
    assert seeds.settings_id(config.plain(small)) != seeds.settings_id(config.plain(large))


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
            attack_checks.check_attack_fits("attack", cfg.attack, norm="linf", num_classes=10, training=True)
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1"])
    with pytest.raises(ConfigError, match="at least 4 classes.*evaluation=fast"):
        attack_checks.check_evaluation_attacks(cfg.evaluation.attacks, norm="linf", num_classes=3)
    with pytest.raises(ConfigError, match="evaluation=fast"):
        attack_checks.check_evaluation_attacks(cfg.evaluation.attacks, norm="linf", num_classes=11, adversarial_class=True)


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


def test_every_survivor_gets_every_attack_whatever_the_batch_size(robust_mlp):
    model, x, y = robust_mlp
    attacked = []
    for size in (7, 64, len(y)):
        spy = RowSpy(x)
        batches = [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]
        found = cascade_outcomes(model, batches, {"pgd": lambda m, a, b, e: pgd(m, a, b, e, steps=5, random_start=False),
                                                  "spy": spy}, eps=EPS)
        rows = sorted(row for call in spy.calls for row in call)  # positions in x
        assert rows == found.correct["pgd"].nonzero().squeeze(1).tolist()  # every survivor, none skipped
        attacked.append(rows)
    assert attacked[0] == attacked[1] == attacked[2]


def test_a_cascade_starts_from_what_the_attacks_run_alone_left_standing(robust_mlp):
    model, x, y = robust_mlp
    standing = torch.zeros(len(y), dtype=torch.bool)
    standing[::3] = True
    spy = RowSpy(x)
    found = cascade_outcomes(model, [(x, y)], {"spy": spy}, eps=EPS, standing=standing)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert sorted(spy.calls[0]) == (clean & standing).nonzero().squeeze(1).tolist()
    assert torch.equal(found.correct["spy"], clean & standing)


def test_fab_t_breaks_what_the_reference_breaks(robust_mlp):
    model, x, y = robust_mlp
    x, y = x[:64], y[:64]
    theirs = FABAttack_PT(model, n_restarts=1, n_iter=10, eps=EPS, seed=0, targeted=True, n_target_classes=3,
                          device=x.device).perturb(x, y)
    ours = fab_targeted(model, x, y, EPS, targets=3, steps=10)
    assert 0 < int(broken(model, theirs, y).sum())
    assert int((broken(model, ours, y) ^ broken(model, theirs, y)).sum()) <= 1
    assert (ours - x).abs().max() <= EPS + 1e-6
