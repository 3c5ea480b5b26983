"""The gradient-masking report: a normal model passes every check, a masked one is flagged with a cause."""

from __future__ import annotations

import json

import torch

from advcli import data
from advcli.evaluation.evaluate import evaluate_model, EvalSettings
from advcli.runs import report
from advcli.training.train import train
from conftest import compose_config, tiny_overrides


class Quantized(torch.nn.Module):
    """``model`` behind a non-differentiable quantisation of its input to 5 grey levels: as accurate, and its
    input gradient is exactly zero (the textbook shattered gradient of Athalye et al. 2018)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def sanity_of(model, x, y, eps=0.05, *overrides):
    cfg = compose_config("eval", ["evaluation=fast", "ckpt=unused", "norm=linf", "restarts=1", *overrides])
    images = data.ImageSet((x * 255).round().to(torch.uint8), y)
    attack_cfgs = dict(cfg.evaluation.attacks)
    if cfg.get("attack") is not None:
        attack_cfgs["autoattack"] = cfg.attack
    torch.manual_seed(0)
    found = evaluate_model(model, images, attack_cfgs, EvalSettings(eps_values=((eps, str(eps)),), norm="linf",
                                                                    batch_size=256, sanity=cfg.evaluation.sanity))
    print(report.results_table(found.results, eps=eps, norm="linf"))
    print(report.sanity_table(found.sanity))
    return found.sanity, {check["name"]: check for check in found.sanity["checks"]}


def test_a_normal_trained_model_passes_every_check(robust_mlp):
    sanity, checks = sanity_of(*robust_mlp)
    assert set(checks) == {"gradients_nonzero", "iterative_beats_single_step", "accuracy_falls_with_eps",
                           "large_eps_reaches_zero", "more_steps_do_not_raise_accuracy", "attack_converged"}
    assert sanity["verdict"] == "pass", [c for c in checks.values() if c["verdict"] == "warn"]
    assert all(c["likely_cause"] is None for c in checks.values())


def test_a_gradient_masked_model_is_flagged_with_a_likely_cause(robust_mlp):
    model, x, y = robust_mlp
    masked = Quantized(model).eval()
    with torch.no_grad():
        assert (masked(x).argmax(1) == y).float().mean() > 0.8, "the quantised model must still classify well"
    sanity, checks = sanity_of(masked, x, y)
    assert sanity["verdict"] == "warn"
    assert checks["gradients_nonzero"]["verdict"] == "warn"
    assert checks["large_eps_reaches_zero"]["verdict"] == "warn"
    for check in checks.values():
        assert check["verdict"] in ("pass", "warn")
        assert (check["likely_cause"] is None) == (check["verdict"] == "pass")
    assert "shattered gradients" in checks["gradients_nonzero"]["likely_cause"]


def test_autoattack_beating_pgd_is_flagged(robust_mlp):
    model, x, y = robust_mlp
    sanity, checks = sanity_of(Quantized(model).eval(), x[:64], y[:64], 0.1, "attack=autoattack")
    assert checks["autoattack_agrees_with_pgd"]["verdict"] == "warn"  # Square needs no gradient


def test_every_training_run_prints_and_saves_the_sanity_report(tmp_path, capsys):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "evaluation.num_examples=64",
                                                           "evaluation.sanity.num_examples=32")))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["sanity"] == metrics["sanity"]
    assert on_disk["sanity"]["num_examples"] == 32
    assert all({"name", "verdict", "detail", "likely_cause"} <= set(c) for c in on_disk["sanity"]["checks"])
    assert [c["name"] for c in on_disk["sanity"]["checks"]] == [
        "gradients_nonzero", "iterative_beats_single_step", "accuracy_falls_with_eps", "large_eps_reaches_zero",
        "more_steps_do_not_raise_accuracy", "attack_converged"]
    printed = capsys.readouterr().out
    assert "sanity checks" in printed
    assert f"on the first 32 examples: {on_disk['sanity']['verdict'].upper()}" in printed
    for check in on_disk["sanity"]["checks"]:  # each check saved with the verdict and numbers it printed
        assert f"{check['verdict'].upper():<5} {check['check']}: {check['detail']}" in printed, check["name"]


def test_the_report_can_be_switched_off(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "evaluation.num_examples=32",
                                                           "evaluation.sanity.enabled=false")))
    assert metrics["sanity"] is None


def default_sanity_of(model, x, y, attack_cfgs, eps=0.05):
    """The default preset's sanity report (its attack_converged probe: standard AutoAttack) on ``attack_cfgs``
    run as a cascade after the clean row."""
    cfg = compose_config("eval", ["ckpt=unused", "norm=linf", "restarts=1", f"eps={eps}",
                                  "evaluation.sanity.num_examples=128", "evaluation.sanity.stronger.num_examples=128"])
    images = data.ImageSet((x * 255).round().to(torch.uint8), y)
    settings = EvalSettings(eps_values=((eps, str(eps)),), norm="linf", batch_size=256, sanity=cfg.evaluation.sanity,
                            cascade=True, alone=("clean",), stronger=cfg.evaluation.sanity.stronger)
    found = evaluate_model(model, images, {"clean": cfg.evaluation.standalone_attacks.clean, **attack_cfgs(cfg)},
                           settings)
    print(report.results_table(found.results, eps=eps, norm="linf", cascade=True))
    print(report.sanity_table(found.sanity))
    return {check["name"]: check for check in found.sanity["checks"]}["attack_converged"]


def test_the_default_sanity_probe_is_autoattack_and_warns_where_the_cascade_misses_what_it_finds(robust_mlp):
    # a cascade weakened by hand (one tiny margin-PGD step): it misses examples AutoAttack breaks
    weak = default_sanity_of(*robust_mlp, lambda cfg: {"pgd_margin": {**cfg.evaluation.attacks.pgd_margin,
                                                                      "steps": 1, "alpha": 0.001}})
    assert "autoattack (seed 1)" in weak["detail"]
    assert weak["verdict"] == "warn" and "too weak" in weak["likely_cause"]
    # the default cascade itself: the probe finds (almost) nothing it missed
    full = default_sanity_of(*robust_mlp, lambda cfg: dict(cfg.evaluation.attacks))
    assert full["verdict"] == "pass", full["detail"]
