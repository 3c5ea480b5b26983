"""The fast paths change speed, not results: channels_last, the on-device loader, bf16, the fast preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf

import advcli.training.train as train_module
from advcli import attacks, data
from advcli.models import build_model
from advcli.runs import checkpoint
from advcli.runtime import prepare_model
from advcli.training.epoch import lr_schedule, train_epoch, EpochPlan, Optimisation
from advcli.training.guards import never_robust, overfitting
from advcli.training.objectives import MinMax
from advcli.training.train import train
from conftest import compose_config, tiny_overrides


def seeded_losses(batches, *, channels_last: bool, steps: int = 4) -> list[float]:
    """Losses of a few PGD-training steps of the Madry CNN, fp32, from fixed weights and attack noise."""
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, image_size=28, num_classes=10, mean=(0.1307,), std=(0.3081,))
    model, _ = prepare_model(model, torch.device("cpu"), channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    torch.manual_seed(1)
    for (x, y), _ in zip(batches, range(steps)):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # L2 steps move continuously with the gradient; an L-inf sign() would turn float rounding into flips
        x_adv = attacks.pgd(model, x, y, 1.0, steps=3, norm="l2")
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_on_device_loader_and_channels_last_give_the_dataloader_losses(real_data_root):
    """fp32: torchvision's dataset + DataLoader + contiguous tensors vs advcli's uint8 tensors + channels_last."""
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(5))
    reference = torchvision.datasets.MNIST(str(real_data_root), train=True, download=False,
                                           transform=torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(reference, order.tolist()), batch_size=64,
                                         generator=torch.Generator())  # keeps the global RNG for the attacks
    ours = data.load_split("mnist", "train", root=str(real_data_root), download=False).subset(order)
    baseline = seeded_losses(loader, channels_last=False)
    fast = seeded_losses(data.batches(ours, 64, channels_last=True), channels_last=True)
    assert fast == pytest.approx(baseline, rel=1e-4, abs=1e-5)
    assert baseline[-1] != baseline[0], "the steps did not train anything"


def test_bf16_training_reaches_fp32_accuracy_on_real_data(tmp_path, real_data_root):
    def clean_accuracy(amp: str) -> float:
        metrics = train(compose_config("train", [
            "dataset=mnist", "model=small_cnn", "attack=none", f"amp={amp}", f"data.root={real_data_root}",
            "data.download=false", "data.train_size=16000", "data.val_size=100", "batch_size=128", "lr=3e-3", "lr_schedule=constant",
            "ema.decay=null", "epochs=1", "evaluation.num_examples=2000",
            "evaluation=fast", "evaluation.attacks.pgd.steps=1", "evaluation.attacks.pgd_margin.steps=1", "evaluation.sanity.enabled=false",
            "device=cpu", "progress=false", f"output_dir={tmp_path / amp}"]))
        return metrics["test"]["clean"]["acc"]

    fp32, bf16 = clean_accuracy("off"), clean_accuracy("bf16")
    print(f"clean accuracy after one epoch on 16,000 MNIST images: fp32 {fp32:.4f}, bf16 {bf16:.4f}")
    assert fp32 > 0.9 and abs(bf16 - fp32) <= 0.01


def test_train_epoch_matches_a_plain_loop_in_fp32(tiny_batch):
    """advcli's step (frozen parameters during the attack, device-side metrics) trains exactly like a naive loop."""
    x, y = tiny_batch
    def model_and_opt():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    model, optimizer = model_and_opt()
    torch.manual_seed(2)
    train_epoch(model, [(x, y)] * 3, MinMax(lambda m, a, b, e: attacks.pgd(m, a, b, e, steps=2)),
                Optimisation.fp32(optimizer), EpochPlan(eps=0.1, progress_bar=False))
    plain, plain_opt = model_and_opt()
    torch.manual_seed(2)
    for _ in range(3):
        x_adv = attacks.pgd(plain, x, y, 0.1, steps=2)
        loss = F.cross_entropy(plain(x_adv), y)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_overfitting_guard_fires_on_a_collapse_only():
    guard = OmegaConf.create({"drop": 0.2, "action": "rollback"})
    rising = [{"epoch": i + 1, "val_robust_acc": a} for i, a in enumerate([0.3, 0.5, 0.6, 0.55])]
    assert overfitting(rising, guard) is None
    collapsed = rising + [{"epoch": 5, "val_robust_acc": 0.05}]
    found = overfitting(collapsed, guard)
    assert found["triggered"] and found["best_epoch"] == 3 and found["epoch"] == 5
    assert overfitting(collapsed, OmegaConf.create({"drop": 0.2, "action": "off"})) is None


def test_rollback_restores_the_best_epoch_and_a_rerun_keeps_it(tmp_path, monkeypatch):
    def collapse_at_epoch_3(history, guard):
        if history[-1]["epoch"] == 3:
            return {"triggered": True, "epoch": 3, "best_epoch": 1, "action": guard.action}
        return None

    monkeypatch.setattr(train_module, "overfitting", collapse_at_epoch_3)
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "epochs=5")))
    assert metrics["overfit_guard"]["triggered"] and len(metrics["history"]) == 3
    best, last = checkpoint.load(tmp_path / "best.pt"), checkpoint.load(tmp_path / "checkpoint.pt")
    assert last["stopped"]["epoch"] == 3
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, last["model"][name]), name
    again = train(compose_config("train", tiny_overrides(tmp_path, "epochs=5")))
    assert len(again["history"]) == 3 and again["test"]["clean"]["acc"] == metrics["test"]["clean"]["acc"]


@pytest.mark.parametrize("peak", [0.4, 0.5])
def test_onecycle_rises_linearly_to_lr_at_its_peak_then_falls_to_zero(peak):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    scheduler = lr_schedule("onecycle", optimizer, total_steps=100, peak=peak)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    top = round(100 * peak)
    assert rates[0] == 0.0 and max(rates) == pytest.approx(0.2) and rates.index(max(rates)) == top
    assert rates[top // 2] == pytest.approx(0.1)  # linear on the way up
    assert all(a > b for a, b in zip(rates[top:], rates[top + 1:])) and rates[-1] < 0.01


def test_never_robust_flags_adversarial_training_whose_held_out_pgd_stays_at_zero():
    def history(pgd: list[float], clean: float = 0.97) -> list[dict]:
        return [{"epoch": i + 1, "val_clean_acc": clean, "val_robust_acc": p} for i, p in enumerate(pgd)]

    message = never_robust(history([0.012, 0.0, 0.0]), "fgsm")
    assert message and "never rose above 1.2%" in message and "3 epoch(s) of fgsm" in message
    assert never_robust(history([0.0, 0.0, 0.3]), "fgsm") is None  # it recovered
    assert never_robust(history([0.0, 0.0]), "none") is None  # standard training is not meant to be robust
    assert never_robust(history([0.0, 0.0], clean=0.2), "pgd") is None  # not even the clean task learned yet
    flagged = never_robust(history([0.01, 0.02]), "pgd", adversarial_class=True)
    assert "adaptive attack" in flagged and "with rejection" in flagged


def test_fast_at_preset_composes_and_runs(tmp_path):
    tiny = [o for o in tiny_overrides(tmp_path, "experiment=fast_at", "epochs=2") if not o.startswith("lr_schedule=")]
    cfg = compose_config("train", tiny)  # the preset's own schedule
    assert cfg.attack._target_ == "advcli.attacks.fgsm" and cfg.attack.random_start is True and cfg.ema.decay is None
    assert cfg.lr_schedule == "onecycle" and cfg.overfit_guard.action == "rollback"
    assert compose_config("train", ["experiment=fast_at"]).model.name == "cnn"  # whatever the default model
    assert compose_config("train", ["experiment=fast_at", "model=small_cnn"]).model.name == "small_cnn"
    metrics = train(cfg)
    assert metrics["attack"] == "fgsm" and len(metrics["history"]) == 2
    assert metrics["history"][0]["lr"] == 0.0  # the one-cycle schedule starts from zero
