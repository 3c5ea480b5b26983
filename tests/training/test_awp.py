"""Adversarial weight perturbation (awp.gamma, advcli/awp.py): its size per layer, the exact restore, where the
step's gradient is taken, and runs with it (one process, two gloo processes)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advcli import attacks, config
from advcli.training import awp, objectives
from advcli.training.epoch import train_step, EpochPlan, Optimisation
from advcli.training.train import train
from conftest import compose_config, tiny_overrides

GAMMA = 5e-3


class ConvBnNet(nn.Module):
    """Conv, BatchNorm and linear layers on 1x8x8 inputs: weights AWP perturbs and ones it leaves alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def adversarial_ce(found: objectives.Examples):
    return lambda model: objectives.MinMax().loss(model, found).loss.mean()


@pytest.fixture
def found(tiny_batch):
    x, y = tiny_batch
    return objectives.Examples(x, attacks.fgsm(ConvBnNet().eval(), x, y, 0.1, random_start=False), y)


def test_perturbation_is_gamma_times_each_layer_norm_along_the_loss_gradient(found):
    model = ConvBnNet()
    before = copy.deepcopy(model.state_dict())
    diff = awp.perturbation(model, adversarial_ce(found), GAMMA)
    # conv and linear weights; no biases, no BatchNorm
    assert [id(w) for w in diff.weights] == [id(model.conv.weight), id(model.fc.weight)]
    twin = copy.deepcopy(model)
    grads = torch.autograd.grad(adversarial_ce(found)(twin), [twin.conv.weight, twin.fc.weight])
    for weight, step, grad in zip(diff.weights, diff.steps, grads):
        assert abs(step.norm().item() / (GAMMA * weight.norm().item()) - 1) < 1e-6
        assert F.cosine_similarity(step.flatten(), grad.flatten(), dim=0) > 1 - 1e-5  # up the loss
    for key, value in model.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(value, before[key]), key
    assert awp.perturbation(model, adversarial_ce(found), 0.0).weights == []


def test_perturbed_weights_are_restored_bit_for_bit(found):
    model = ConvBnNet()
    before = copy.deepcopy(model.state_dict())
    diff = awp.perturbation(model, adversarial_ce(found), 0.05)
    with awp.perturbed(diff):
        torch.testing.assert_close(model.conv.weight, before["conv.weight"] + diff.steps[0], rtol=0, atol=1e-7)
        assert not torch.equal(model.fc.weight, before["fc.weight"])
        model(found.x_adv)  # a forward pass in between, as in a training step
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) or key.startswith("bn."), key  # train-mode BN stats may move
    for name in ("conv.weight", "conv.bias", "fc.weight", "fc.bias"):
        assert torch.equal(model.state_dict()[name], before[name]), name
    with pytest.raises(RuntimeError, match="inside"), awp.perturbed(diff):
        raise RuntimeError("inside")
    assert torch.equal(model.fc.weight, before["fc.weight"])  # restored on the way out of an error too


def test_awp_step_applies_the_gradient_at_the_perturbed_weights_to_the_weights(tiny_batch):
    x, y = tiny_batch
    objective = objectives.MinMax(deterministic_fgsm)
    model = ConvBnNet()
    reference = copy.deepcopy(model)
    opt = Optimisation.fp32(torch.optim.SGD(model.parameters(), lr=0.1))
    train_step(model, x, y, objective, opt, eps=0.1, awp_gamma=GAMMA)

    examples = objective.examples(reference, x, y, 0.1)
    diff = awp.perturbation(reference, adversarial_ce(examples), GAMMA)
    with awp.perturbed(diff):
        grads = torch.autograd.grad(adversarial_ce(examples)(reference), list(reference.parameters()))
    with torch.no_grad():
        expected = [w - 0.1 * g for w, g in zip(reference.parameters(), grads)]
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    plain = copy.deepcopy(reference)  # and it differs from the step without AWP
    train_step(plain, x, y, objective, Optimisation.fp32(torch.optim.SGD(plain.parameters(), lr=0.1)), eps=0.1)
    assert not torch.allclose(plain.fc.weight, model.fc.weight, rtol=0, atol=1e-7)


def deterministic_fgsm(model, x, y, eps):
    return attacks.fgsm(model, x, y, eps, random_start=False)


def test_awp_starts_after_its_warmup():
    plan = EpochPlan(eps=0.1, epoch=2, steps_before=10, awp_gamma=GAMMA, awp_warmup_steps=12)
    assert [plan.awp_gamma_at(batch) for batch in (1, 2, 3)] == [0.0, 0.0, GAMMA]
    assert EpochPlan(eps=0.1, awp_gamma=GAMMA).awp_gamma_at(1) == GAMMA


def test_awp_training_runs_end_to_end_and_is_part_of_the_run(tmp_path):
    overrides = tiny_overrides(tmp_path / "awp", "awp.gamma=0.005", "awp.warmup=0", "trainer=trades",
                               "evaluation.sanity.enabled=false")
    metrics = train(compose_config("train", overrides))
    assert metrics["awp_gamma"] == 0.005 and metrics["awp_warmup"] == 0
    assert metrics["test"]["clean"]["acc"] > 0.4
    cfg = compose_config("train", overrides)
    settings = config.fingerprint(cfg, precision="fp32")
    assert settings["awp.gamma"] == 0.005 and settings["awp.warmup"] == 0
    # a run checkpointed before AWP existed continues as the run without it
    older = {k: v for k, v in config.fingerprint(compose_config("train", []), precision="fp32").items()
             if not k.startswith("awp.")}
    assert config.fingerprint_changes(older, config.fingerprint(compose_config("train", []), precision="fp32")) == []
    assert config.fingerprint_changes(older, settings) != []


def test_two_gloo_processes_with_awp_train_the_same_weights_as_one(tmp_path):
    from test_distributed import COMMON, run

    with_awp = [*COMMON, "awp.gamma=0.01", "epochs=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "advcli", "train", *with_awp, f"output_dir={one}"], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "advcli", "train",
         *with_awp, f"output_dir={two}"], tmp_path)
    single = torch.load(one / "checkpoint.pt", weights_only=True)["model"]
    double = torch.load(two / "checkpoint.pt", weights_only=True)["model"]
    for name, weight in single.items():
        torch.testing.assert_close(double[name], weight, rtol=1e-4, atol=1e-5, msg=name)
