"""Attacks on a tiny fixed model: threat-model constraints, strength ordering, and no side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advcli import attacks
from advcli.attacks import fgsm, input_gradient, none, pgd, project_l2, project_linf


def per_example_loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def distance(x_adv, x, norm):
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("linf", 0.3), ("l2", 0.5), ("l2", 2.0)])
@pytest.mark.parametrize("attack", [fgsm, pgd])
@pytest.mark.parametrize("random_start", [False, True])
def test_attack_stays_in_ball_and_pixel_box(tiny_model, tiny_batch, attack, norm, eps, random_start):
    x, y = tiny_batch
    x_adv = attack(tiny_model, x, y, eps, norm=norm, random_start=random_start)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (distance(x_adv, x, norm) <= eps + 1e-5).all()
    assert (x_adv != x).any(), "the attack did not move at all"


@pytest.mark.parametrize("attack", [fgsm, pgd, none])
def test_eps_zero_returns_the_input(tiny_model, tiny_batch, attack):
    x, y = tiny_batch
    assert torch.equal(attack(tiny_model, x, y, 0.0), x)


def test_pgd_raises_the_loss_above_fgsm(tiny_model, tiny_batch):
    x, y = tiny_batch
    eps = 0.1
    clean = per_example_loss(tiny_model, x, y).mean()
    torch.manual_seed(0)
    loss_fgsm = per_example_loss(tiny_model, fgsm(tiny_model, x, y, eps), y).mean()
    loss_pgd = per_example_loss(tiny_model, pgd(tiny_model, x, y, eps, steps=20), y).mean()
    print(f"loss clean {clean:.4f} fgsm {loss_fgsm:.4f} pgd {loss_pgd:.4f}")
    assert clean < loss_fgsm < loss_pgd


def test_restarts_never_lower_the_per_example_loss(tiny_model, tiny_batch):
    x, y = tiny_batch
    torch.manual_seed(3)
    one = per_example_loss(tiny_model, pgd(tiny_model, x, y, 0.1, steps=3, restarts=1), y)
    torch.manual_seed(3)  # the first of the five restarts draws the same start as the single run
    five = per_example_loss(tiny_model, pgd(tiny_model, x, y, 0.1, steps=3, restarts=5), y)
    assert (five >= one - 1e-6).all()
    assert (five > one + 1e-6).any(), "restarts found no better perturbation for any example"


def test_fgsm_is_one_pgd_step_from_zero_with_alpha_eps(tiny_model, tiny_batch):
    x, y = tiny_batch
    one_step = pgd(tiny_model, x, y, 0.1, alpha=0.1, steps=1, random_start=False)
    assert torch.equal(fgsm(tiny_model, x, y, 0.1), one_step)
    x_req = x.clone().requires_grad_(True)
    F.cross_entropy(tiny_model(x_req), y, reduction="sum").backward()
    assert torch.allclose(fgsm(tiny_model, x, y, 0.1), (x + 0.1 * x_req.grad.sign()).clamp(0, 1))


def test_input_gradient_equals_plain_backward(tiny_model, tiny_batch):
    x, y = tiny_batch
    delta = torch.rand_like(x) * 0.01
    x_req = (x + delta).requires_grad_(True)
    F.cross_entropy(tiny_model(x_req), y, reduction="sum").backward()
    assert torch.allclose(input_gradient(tiny_model, x, y, delta), x_req.grad, atol=1e-6)


@pytest.mark.parametrize("attack", [fgsm, pgd])
def test_attacks_leave_parameters_and_mode_untouched(tiny_model, tiny_batch, attack):
    x, y = tiny_batch
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    for training in (False, True):
        tiny_model.train(training)
        attack(tiny_model, x, y, 0.1)
        assert tiny_model.training is training
    for name, p in tiny_model.named_parameters():
        assert p.grad is None, f"{name}.grad was written"
        assert p.requires_grad, f"{name}.requires_grad was not restored"
        assert torch.equal(p, before[name])


def test_parameters_are_unfrozen_even_when_the_attack_fails(tiny_model, tiny_batch):
    x, y = tiny_batch
    with pytest.raises(IndexError):
        pgd(tiny_model, x, y + 10, 0.1)  # labels out of range
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_margin_loss_pgd_breaks_at_least_as_many_as_cross_entropy(tiny_model, tiny_batch):
    x, y = tiny_batch
    torch.manual_seed(0)
    ce = (tiny_model(pgd(tiny_model, x, y, 0.05, steps=20)).argmax(1) == y).float().mean()
    torch.manual_seed(0)
    margin = (tiny_model(pgd(tiny_model, x, y, 0.05, steps=20, loss="margin")).argmax(1) == y).float().mean()
    assert margin <= ce


def test_projections_are_nearest_points():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(16, 3, 4, 4, generator=g)
    linf = project_linf(delta, 0.2)
    assert linf.abs().max() <= 0.2 and torch.equal(project_linf(linf, 0.2), linf)
    l2 = project_l2(delta, 0.5)
    assert torch.allclose(l2.flatten(1).norm(dim=1), torch.full((16,), 0.5), atol=1e-5)
    small = delta * 1e-3
    assert torch.equal(project_l2(small, 0.5), small), "points inside the ball must not move"


def test_random_l2_start_is_inside_the_ball():
    x = torch.zeros(256, 1, 8, 8)
    start = attacks.random_l2(x, 1.5)
    norms = start.flatten(1).norm(dim=1)
    assert (norms <= 1.5 + 1e-5).all() and norms.mean() > 1.0  # uniform in a 64-d ball: mass near the surface


def test_attack_runs_under_cpu_bf16_autocast(tiny_model, tiny_batch):
    x, y = tiny_batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(tiny_model, x, y, 0.1, steps=5)
    assert x_adv.dtype == torch.float32
    assert (distance(x_adv, x, "linf") <= 0.1 + 1e-6).all()
    assert per_example_loss(tiny_model, x_adv, y).mean() > per_example_loss(tiny_model, x, y).mean()


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(restarts=0), dict(norm="l1")])
def test_bad_hyper_parameters_are_refused(tiny_model, tiny_batch, kwargs):
    x, y = tiny_batch
    with pytest.raises(ValueError):
        pgd(tiny_model, x, y, 0.1, **kwargs)


# --- evaluation PGD (early_stop=True): an example broken once stays broken ---------------------

class AttackRecorder(torch.nn.Module):
    """Wraps a model; names the clean example behind each row it is asked about (nearest neighbour:
    the perturbations are far smaller than the distances between examples) and remembers which
    examples it has already seen misclassified."""

    def __init__(self, model, x, y):
        super().__init__()
        self.model, self.x, self.y = model, x.flatten(1), y
        self.calls: list[torch.Tensor] = []  # per forward pass: the example indices in the batch
        self.broken_before: list[torch.Tensor] = []  # per pass: was any of them misclassified in an earlier pass?
        self.broken = torch.zeros(len(y), dtype=torch.bool)

    def forward(self, inputs):
        ids = torch.cdist(inputs.detach().flatten(1), self.x, p=float("inf")).argmin(dim=1)
        logits = self.model(inputs)
        self.calls.append(ids)
        self.broken_before.append(self.broken[ids].clone())
        self.broken[ids[logits.detach().argmax(dim=1) != self.y[ids]]] = True
        return logits

    def rows(self) -> int:
        return sum(len(ids) for ids in self.calls)


def test_early_stop_pgd_never_attacks_a_broken_example_again(tiny_model, tiny_batch):
    x, y = tiny_batch
    recorder = AttackRecorder(tiny_model, x, y)
    torch.manual_seed(0)
    x_adv = pgd(recorder, x, y, 0.05, steps=10, restarts=5, early_stop=True)
    assert len(recorder.calls) > 11, "restarts after the first did not run"
    assert not any(before.any() for before in recorder.broken_before), "an example broken earlier was attacked again"
    with torch.no_grad():
        wrong = tiny_model(x_adv).argmax(dim=1) != y
    assert torch.equal(wrong, recorder.broken), "every example seen misclassified must come back misclassified"
    assert 0 < wrong.sum() < len(y)  # the test means something only when some, not all, examples break
    assert (distance(x_adv, x, "linf") <= 0.05 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1


def test_early_stop_restarts_cost_falls_with_the_robust_fraction(tiny_model, tiny_batch):
    x, y = tiny_batch
    steps, restarts = 10, 5
    one, five = AttackRecorder(tiny_model, x, y), AttackRecorder(tiny_model, x, y)
    torch.manual_seed(0)
    pgd(one, x, y, 0.05, steps=steps, restarts=1, early_stop=True)
    robust_after_one = int((~one.broken).sum())
    torch.manual_seed(0)  # the first of the five restarts is the single run, draw for draw
    pgd(five, x, y, 0.05, steps=steps, restarts=restarts, early_stop=True)
    # restarts 2..5 attack only the examples the first left standing: at most steps + 1 passes each
    assert five.rows() <= one.rows() + (restarts - 1) * (steps + 1) * robust_after_one
    assert five.rows() < restarts * (steps + 1) * len(y) / 2  # far below what attacking everyone costs
    assert five.broken.sum() >= one.broken.sum()


def test_early_stop_restarts_never_raise_accuracy(tiny_model, tiny_batch):
    x, y = tiny_batch
    accuracy = []
    for restarts in (1, 3, 6):
        torch.manual_seed(0)
        x_adv = pgd(tiny_model, x, y, 0.05, steps=5, restarts=restarts, early_stop=True)
        accuracy.append((tiny_model(x_adv).argmax(1) == y).float().mean().item())
    assert accuracy[0] >= accuracy[1] >= accuracy[2]


def test_early_stop_breaks_at_least_what_training_pgd_breaks(tiny_model, tiny_batch):
    x, y = tiny_batch
    torch.manual_seed(0)
    plain = pgd(tiny_model, x, y, 0.05, steps=10)
    torch.manual_seed(0)
    stopped = pgd(tiny_model, x, y, 0.05, steps=10, early_stop=True)
    with torch.no_grad():
        # the same path until an example breaks; it then keeps that misclassified point
        assert ((tiny_model(stopped).argmax(1) != y) >= (tiny_model(plain).argmax(1) != y)).all()


def test_early_stop_leaves_parameters_alone_and_runs_without_autograd_state(tiny_model, tiny_batch):
    x, y = tiny_batch
    pgd(tiny_model, x, y, 0.1, steps=3, restarts=2, early_stop=True)
    assert all(p.grad is None and p.requires_grad for p in tiny_model.parameters())


def test_dlr_loss_is_scale_invariant_and_positive_once_misclassified():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 5, generator=g), torch.randint(0, 5, (64,), generator=g)
    assert torch.allclose(attacks.dlr(logits, y), attacks.dlr(7 * logits, y), atol=1e-5)
    assert torch.equal(attacks.dlr(logits, y) > 0, logits.argmax(1) != y)


def test_fp16_input_gradients_of_a_confident_model_do_not_underflow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        model[1].weight.mul_(40.0)  # p(y) within ~1e-12 of 1: the loss gradient at the logits is below fp16's range
        y = model(x).argmax(dim=1)
    exact = input_gradient(model, x, y, torch.zeros_like(x))
    assert (exact.flatten(1).abs().sum(dim=1) > 0).all()
    with torch.autocast("cpu", dtype=torch.float16):
        half = input_gradient(model, x, y, torch.zeros_like(x))
    assert (half.flatten(1).abs().sum(dim=1) > 0).all(), "the fp16 gradient underflowed to zero"
    agree = (half.sign() == exact.sign()).float().mean()
    assert agree > 0.99  # the direction an attack step takes is the fp32 one
    with torch.autocast("cpu", dtype=torch.float16):
        x_adv = pgd(model, x, y, 0.3, steps=5)
    assert (x_adv - x).abs().amax() > 0.1  # and the attack moves


def test_fgsm_restarts_keep_the_highest_loss_start(tiny_model, tiny_batch):
    x, y = tiny_batch
    torch.manual_seed(5)
    best = fgsm(tiny_model, x, y, 0.1, random_start=True, restarts=3)
    torch.manual_seed(5)
    singles = [fgsm(tiny_model, x, y, 0.1, random_start=True) for _ in range(3)]
    with torch.no_grad():
        loss = F.cross_entropy(tiny_model(best), y, reduction="none")
        losses = torch.stack([F.cross_entropy(tiny_model(s), y, reduction="none") for s in singles])
    torch.testing.assert_close(loss, losses.max(dim=0).values)
    with pytest.raises(ValueError, match="random_start"):
        fgsm(tiny_model, x, y, 0.1, restarts=3)


# --- where an attack starts: start="uniform" | "zero" | ("gaussian", std), or random_start / start_std ----------

def test_each_start_gives_its_documented_first_delta():
    x = torch.full((256, 3, 8, 8), 0.5)  # mid-grey: no start is clipped by the pixel box
    torch.manual_seed(0)
    uniform = attacks.start_point(x, 0.1, "linf", start="uniform")
    assert uniform.abs().max() <= 0.1 and uniform.abs().max() > 0.09  # fills the ball...
    assert abs(uniform.mean().item()) < 0.005 and abs(uniform.std().item() - 0.1 / 3 ** 0.5) < 0.005  # ...uniformly
    assert torch.equal(attacks.start_point(x, 0.1, "linf", start="zero"), torch.zeros_like(x))
    gaussian = attacks.start_point(x, 0.1, "linf", start=("gaussian", 0.01))
    assert abs(gaussian.mean().item()) < 0.001 and abs(gaussian.std().item() - 0.01) < 0.001
    l2 = attacks.start_point(x, 0.5, "l2", start=["gaussian", 1.0])  # a config's list; far outside: projected
    torch.testing.assert_close(l2.flatten(1).norm(dim=1), torch.full((256,), 0.5))
    with pytest.raises(ValueError, match="is not a start"):
        attacks.Start("uniform", std=0.1)  # a std means nothing to a uniform start


def test_an_attack_starting_at_zero_does_not_draw_and_a_random_start_does(tiny_model, tiny_batch):
    x, y = tiny_batch
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append([pgd(tiny_model, x, y, 0.1, steps=2, start=start) for start in ("zero", "uniform")])
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("flags,start", [
    (dict(random_start=True), "uniform"), (dict(random_start=False), "zero"),
    (dict(random_start=False, start_std=0.01), ("gaussian", 0.01)), (dict(start_std=0.01), "uniform"),
    (dict(random_start=True, start_std=0.01), "uniform")])
def test_the_configs_start_flags_give_the_same_attack_as_start(tiny_model, tiny_batch, flags, start):
    x, y = tiny_batch
    torch.manual_seed(3)
    by_flags = pgd(tiny_model, x, y, 0.1, steps=2, restarts=2, **flags)
    torch.manual_seed(3)
    by_start = pgd(tiny_model, x, y, 0.1, steps=2, restarts=2, start=start)
    assert torch.equal(by_flags, by_start)
    assert attacks.start_from_flags(flags.get("random_start"), flags.get("start_std"), "uniform") == \
        attacks.as_start(start)


def test_fgsm_start_flags_keep_its_own_default_of_starting_at_x(tiny_model, tiny_batch):
    x, y = tiny_batch
    torch.manual_seed(4)
    gaussian = fgsm(tiny_model, x, y, 0.1, start_std=0.01)  # random_start left out: FGSM's default, no random start
    torch.manual_seed(4)
    assert torch.equal(gaussian, fgsm(tiny_model, x, y, 0.1, start=("gaussian", 0.01)))
    assert torch.equal(fgsm(tiny_model, x, y, 0.1), fgsm(tiny_model, x, y, 0.1, start="zero"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(start="random"), "start='random' is not a start"), (dict(start=("gaussian", 0)), "STD > 0"),
    (dict(random_start=False, start_std=-1), "STD > 0"),
    (dict(start="uniform", random_start=False), "both say where the attack starts")])
def test_a_start_that_is_unknown_or_given_twice_is_refused(tiny_model, tiny_batch, kwargs, match):
    x, y = tiny_batch
    with pytest.raises(ValueError, match=match):
        pgd(tiny_model, x, y, 0.1, **kwargs)


def test_an_attack_config_may_spell_the_start_either_way_and_a_misspelt_key_is_still_refused(tiny_model, tiny_batch):
    from advcli import config
    from advcli.errors import ConfigError
    x, y = tiny_batch
    for start in (dict(random_start=False, start_std=0.01), dict(start=["gaussian", 0.01])):
        attack = config.instantiate("attack", {"_target_": "advcli.attacks.fgsm", "_partial_": True, **start})
        torch.manual_seed(2)
        found = attack(tiny_model, x, y, 0.1)
        torch.manual_seed(2)
        assert torch.equal(found, fgsm(tiny_model, x, y, 0.1, start=("gaussian", 0.01)))
    with pytest.raises(ConfigError, match="attack.random_strat is not a setting"):
        config.instantiate("attack", {"_target_": "advcli.attacks.pgd", "_partial_": True, "random_strat": True})
