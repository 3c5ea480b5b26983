"""Training objectives (trainer=minmax | trades | mart | adv_class) and the evaluation of a model with an
"adversarial input" output."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from advcli import attacks, models
from advcli.errors import ConfigError
from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.runs import checkpoint
from advcli.training import objectives
from advcli.training.train import train
from conftest import compose_config, tiny_overrides

# --- TRADES ----------------------------------------------------------------------------------------


def test_kl_attack_moves_the_prediction_away_from_the_clean_one(tiny_model, tiny_batch):
    x, _ = tiny_batch
    with torch.no_grad():
        clean_probs = F.softmax(tiny_model(x), dim=1)
    x_adv = attacks.pgd(tiny_model, x, clean_probs, 0.1, steps=10, loss="kl")
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    x_random = (x + attacks.random_linf(x, 0.1).sign() * 0.1).clamp(0, 1)  # a corner of the ball at random
    with torch.no_grad():
        start = attacks.kl_divergence(tiny_model(x), clean_probs)
        reached = attacks.kl_divergence(tiny_model(x_adv), clean_probs)
        by_chance = attacks.kl_divergence(tiny_model(x_random), clean_probs)
    assert start.abs().max() < 1e-5  # KL of a distribution to itself
    print("KL: attack", reached.mean().item(), "random corner", by_chance.mean().item())
    assert reached.mean() > 3 * by_chance.mean() and (reached > start).all()
    with pytest.raises(ValueError, match="early_stop"):
        attacks.pgd(tiny_model, x, clean_probs, 0.1, loss="kl", early_stop=True)


def test_trades_loss_is_clean_ce_plus_beta_kl(tiny_model, tiny_batch):
    x, y = tiny_batch
    attack = functools.partial(attacks.pgd, steps=3)
    torch.manual_seed(0)
    without = objectives.Trades(attack, beta=0.0)(tiny_model, x, y, 0.1)
    torch.testing.assert_close(without.loss, F.cross_entropy(tiny_model(x), y, reduction="none"))
    torch.manual_seed(0)
    with_kl = objectives.Trades(attack, beta=6.0)(tiny_model, x, y, 0.1)
    extra = (with_kl.loss - without.loss) / 6.0  # the KL term, the same x' (same seed)
    assert (extra >= -1e-6).all() and extra.mean() > 0
    with pytest.raises(ValueError, match="beta"):
        objectives.Trades(attack, beta=-1.0)


def test_trades_training_runs_and_its_loss_decreases(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "trainer=trades", "trainer.beta=3", "epochs=4",
                                                          "lr=3e-3", "evaluation.sanity.enabled=false")))
    losses = [entry["train_loss"] for entry in metrics["history"]]
    print("TRADES train loss per epoch", losses)
    assert metrics["trainer"] == "trades"
    assert losses[-1] < 0.8 * losses[0]
    assert metrics["test"]["clean"]["acc"] > 0.7


# --- MART --------------------------------------------------------------------------------------------


class LogitsAreInputs(torch.nn.Module):
    """A "model" whose outputs are its inputs (flattened), so that a loss can be fed fixed logits."""

    def forward(self, x):
        return x.flatten(1)


def mart_by_hand(clean: list[float], adv: list[float], y: int, beta: float) -> float:
    """The paper's per-example loss written out in float64: BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x))."""
    p_clean = torch.tensor(clean, dtype=torch.float64).softmax(0).tolist()
    p_adv = torch.tensor(adv, dtype=torch.float64).softmax(0).tolist()
    strongest_wrong = max(p for k, p in enumerate(p_adv) if k != y)
    bce = -math.log(p_adv[y]) - math.log(1 - strongest_wrong)
    kl = sum(pc * (math.log(pc) - math.log(pa)) for pc, pa in zip(p_clean, p_adv))
    return bce + beta * kl * (1 - p_clean[y])


def test_mart_loss_is_the_papers_formula_on_fixed_logits():
    clean = [[2.0, 0.5, -1.0, 0.0],   # right, confident: the KL term weighs little
             [0.1, 1.5, 0.3, -0.4],   # wrong (class 1 over class 0): the KL term weighs most
             [0.0, 0.0, 0.0, 0.0],    # undecided
             [8.0, -3.0, 1.0, 2.5]]
    adv = [[0.5, 1.0, -0.5, 0.2],     # the attack won: a wrong class on top
           [0.2, 2.5, 0.1, -1.0],
           [1.0, -1.0, 3.0, 0.0],
           [9.0, -2.0, 15.0, 0.0]]    # the strongest wrong class takes nearly all the probability
    y = torch.tensor([0, 0, 2, 0])
    found = objectives.Examples(torch.tensor(clean), torch.tensor(adv), y)
    for beta in (0.0, 6.0, 2.5):
        step = objectives.Mart(beta=beta).loss(LogitsAreInputs(), found)
        expected = [mart_by_hand(c, a, int(t), beta) for c, a, t in zip(clean, adv, y)]
        torch.testing.assert_close(step.loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert torch.equal(step.logits, found.x_adv)  # training accuracy on x'
    assert torch.isfinite(objectives.boosted_cross_entropy(torch.tensor([[0.0, 200.0, -5.0]]), torch.tensor([0]))).all()
    with pytest.raises(ValueError, match="beta"):
        objectives.Mart(beta=-1.0)


def test_mart_attacks_the_cross_entropy_of_the_true_labels_in_eval_mode(tiny_model, tiny_batch):
    x, y = tiny_batch
    seen = {}

    def record(model, x_in, target, eps, **kwargs):
        seen.update(target=target, kwargs=kwargs)
        return attacks.pgd(model, x_in, target, eps, steps=2)

    step = objectives.Mart(record, beta=6.0)(tiny_model, x, y, 0.1)
    assert torch.equal(seen["target"], y) and seen["kwargs"] == {}  # the attack config's own loss and start
    assert objectives.Mart.attack_mode == "eval" and objectives.Mart.needs_attack
    assert step.loss.shape == y.shape and torch.isfinite(step.loss).all()


def test_mart_training_runs_end_to_end(tmp_path):
    from advcli.training.train import check_settings

    overrides = tiny_overrides(tmp_path, "trainer=mart", "epochs=2", "lr=3e-3", "evaluation.sanity.enabled=false")
    assert check_settings(compose_config("train", overrides)).attack_mode == "eval"
    metrics = train(compose_config("train", overrides))
    losses = [entry["train_loss"] for entry in metrics["history"]]
    print("MART train loss per epoch", losses, "clean", metrics["test"]["clean"]["acc"])
    assert metrics["trainer"] == "mart" and metrics["trainer_settings"] == {"beta": 6.0}
    assert losses[-1] < losses[0] and metrics["test"]["clean"]["acc"] > 0.5
    with pytest.raises(ConfigError, match="attack=none"):
        train(compose_config("train", tiny_overrides(tmp_path, "trainer=mart", "attack=none")))


# --- adversarial-input class ------------------------------------------------------------------------


def test_rejection_margin_is_positive_only_past_the_true_class_and_the_flag():
    y = torch.tensor([0, 0, 0, 0])
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0],   # correct
                           [1.0, 2.0, 0.0, 3.0],   # flagged (last output): still a failed attack
                           [1.0, 3.0, 0.0, 2.0],   # wrong class, not flagged: broken
                           [1.0, 3.0, 0.0, 3.5]])  # wrong class beats y but the flag is higher: not broken
    margins = attacks.rejection_margin(logits, y)
    assert (margins > 0).tolist() == [False, False, True, False]
    assert attacks.still_safe(logits, y, "rejection_margin").tolist() == [True, True, False, True]
    assert attacks.still_safe(logits, y, "ce").tolist() == [True, False, False, False]


@pytest.fixture(scope="module")
def adv_class_run(tmp_path_factory):
    """A K+1-output model trained on synthetic data with trainer=adv_class (shared by the tests below)."""
    run = tmp_path_factory.mktemp("adv_class")
    metrics = train(compose_config("train", tiny_overrides(run, "trainer=adv_class", "epochs=3", "lr=3e-3",
                                                          "eps=0.1", "dataset.num_train=1024",
                                                          "evaluation.sanity.enabled=false")))
    return run, metrics


def test_adv_class_checkpoint_has_k_plus_one_outputs_and_eval_needs_no_argument(adv_class_run, tmp_path):
    run, trained = adv_class_run
    payload = checkpoint.load(run / "checkpoint.pt")
    assert payload["model_spec"]["adversarial_class"] is True and payload["model_spec"]["num_classes"] == 4
    model = models.rebuild_model(payload)
    assert model(torch.rand(2, 1, 12, 12)).shape == (2, 5)

    evaluated = evaluate_checkpoint(compose_config("eval", ["evaluation=fast", f"ckpt={run / 'checkpoint.pt'}", "device=cpu",
                                                            "progress=false", "evaluation.sanity.enabled=false",
                                                            f"output_dir={tmp_path}"]))
    test = evaluated["test"]
    assert set(test) == {"clean", "fgsm", "pgd", "pgd_margin", "pgd_adaptive", "any_attack"}
    assert 0 <= test["clean"]["flagged"] <= 1 - test["clean"]["acc"]  # false flags are clean errors
    for name in ("fgsm", "pgd", "pgd_margin", "pgd_adaptive"):
        row = test[name]
        assert {"acc", "flagged", "acc_with_rejection"} <= set(row)
        assert row["acc"] <= row["acc_with_rejection"] <= test["clean"]["acc"] + 1e-9
        assert row["acc_with_rejection"] <= row["acc"] + row["flagged"] + 1e-9
    worst = test["any_attack"]
    assert worst["acc_with_rejection"] <= min(test[n]["acc_with_rejection"] for n in ("fgsm", "pgd", "pgd_adaptive"))
    assert worst["worst_attack"] in test
    assert test["clean"]["acc"] == trained["test"]["clean"]["acc"]  # the same model, rebuilt from the file alone
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test"]["pgd_adaptive"]["attack_loss"] == "rejection_margin"


def test_adaptive_attack_lowers_accuracy_with_rejection_at_least_as_much(adv_class_run):
    _, trained = adv_class_run
    test = trained["test"]
    print({name: (round(row["acc"], 3), round(row.get("flagged", 0), 3), round(row.get("acc_with_rejection", 0), 3))
           for name, row in test.items() if name != "any_attack"})
    # the blind attack mostly lands on the flag; the adaptive one must go around it
    assert test["pgd"]["flagged"] > test["pgd_adaptive"]["flagged"]
    assert test["pgd_adaptive"]["acc_with_rejection"] <= test["pgd"]["acc_with_rejection"]
    assert test["any_attack"]["worst_attack"] == "pgd_adaptive"
    # the held-out check watches PGD accuracy with rejection (worst of blind and adaptive), not plain accuracy
    last = trained["history"][-1]
    assert 0 <= last["val_false_flags"] <= 1 and last["val_robust_acc"] > 0
    assert "warnings" not in trained  # not mistaken for a run that never became robust


def test_adv_class_run_resumes_and_is_refused_as_a_minmax_checkpoint(adv_class_run, tmp_path):
    run, _ = adv_class_run
    more = train(compose_config("train", tiny_overrides(run, "trainer=adv_class", "epochs=4", "lr=3e-3", "eps=0.1",
                                                       "dataset.num_train=1024", "evaluation.sanity.enabled=false",
                                                       "evaluation.num_examples=64")))
    assert [entry["epoch"] for entry in more["history"]] == [1, 2, 3, 4]  # continued, not restarted
    with pytest.raises(checkpoint.CheckpointError, match="resume"):
        train(compose_config("train", tiny_overrides(tmp_path, "epochs=1", f"resume={run / 'checkpoint.pt'}",
                                                     "dataset.num_train=1024")))


def test_adv_class_needs_a_training_attack(tmp_path):
    from advcli.errors import ConfigError

    with pytest.raises(ConfigError, match="attack=none"):
        train(compose_config("train", tiny_overrides(tmp_path, "trainer=adv_class", "attack=none")))


def test_minmax_checkpoint_is_evaluated_exactly_as_before(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(tmp_path / "run", "evaluation.sanity.enabled=false")))
    assert set(metrics["test"]) == {"clean", "fgsm", "pgd", "pgd_margin", "any_attack"}
    for row in metrics["test"].values():
        assert "flagged" not in row and "acc_with_rejection" not in row
    payload = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert payload["model_spec"]["adversarial_class"] is False
    assert models.rebuild_model(payload)(torch.rand(2, 1, 12, 12)).shape == (2, 4)


def test_sweep_summary_carries_the_accuracy_with_rejection(adv_class_run):
    from advcli.runs import summary
    from advcli.runs import sweep

    run, _ = adv_class_run
    row = sweep.read_run(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert row["any_attack_with_rejection_acc"] == metrics["test"]["any_attack"]["acc_with_rejection"]
    assert row["pgd_adaptive_acc"] == metrics["test"]["pgd_adaptive"]["acc"]
    text, _ = summary.table([row])
    assert "any attack with rejection %" in text


def test_viz_of_an_adv_class_checkpoint_marks_flags_and_targets_only_real_classes(adv_class_run, tmp_path):
    from advcli.evaluation import viz
    from conftest import compose_config as compose

    run, _ = adv_class_run
    cfg = compose("viz", [f"ckpt={run / 'checkpoint.pt'}", "num_images=6", "loss_examples=64", "pgd_steps=5",
                          "restarts=1", "device=cpu", f"output_dir={tmp_path}"])
    viz.visualize_checkpoints(cfg)
    assert (tmp_path / "gallery.png").is_file() and (tmp_path / "large_eps.png").is_file()

    model = models.rebuild_model(checkpoint.load(run / "checkpoint.pt"))
    from advcli import data

    images = data.load_split("synthetic", "test", root=".").subset(slice(0, 64))
    settings = viz.Settings(num_images=6, loss_examples=64, pgd_steps=5, restarts=1)
    arrays = viz.draw_pictures({"adv_class": model}, images, eps=0.1, norm="linf", out=tmp_path / "direct",
                               settings=settings, num_classes=4)
    assert arrays["large_eps"]["adv_class"]["images"].shape[0] == 4  # towards the 4 classes, not the flag
    gallery = arrays["gallery"]["adv_class"]
    predicted = torch.cat([gallery[key] for key in ("pred_clean", "pred_fgsm", "pred_pgd")])
    assert predicted.max() <= 4  # K + 1 = 5 outputs, index 4 the flag
    # for a K+1 model the FGSM row is the blind attack, which lands on the flag; the PGD row is the adaptive
    # one (loss rejection_margin), which goes around the flag to a wrong real class
    _, y = next(data.batches(images.subset(slice(0, 6)), 6))
    fooled = (gallery["pred_pgd"] != y) & (gallery["pred_pgd"] < 4)
    assert (gallery["pred_fgsm"] == 4).any() and fooled.any()
    assert (gallery["pred_pgd"] == 4).sum() < (gallery["pred_fgsm"] == 4).sum()


def test_trades_first_attack_step_follows_the_kl_gradient_not_rounding_noise(tiny_model, tiny_batch):
    x, y = tiny_batch
    eps = 0.1
    with torch.no_grad():
        clean = F.softmax(tiny_model(x), dim=1)
    # at x itself the KL to the clean prediction is at its minimum: its gradient is rounding noise
    at_zero = attacks.input_gradient(tiny_model, x, clean, torch.zeros_like(x), attacks.kl_divergence)
    torch.manual_seed(0)
    start = attacks.start_point(x, eps, "linf", random_start=False, start_std=0.001)
    at_start = attacks.input_gradient(tiny_model, x, clean, start, attacks.kl_divergence)
    assert at_zero.abs().max() < 1e-3 * at_start.abs().max()

    # TRADES's attack (here FGSM, random_start=false in its config) starts from 0.001 * N(0, 1), as the reference
    objective = objectives.Trades(attack=functools.partial(attacks.fgsm, random_start=False), beta=6.0)
    seen = {}

    def record(model, x_in, target, eps_in, **kwargs):
        seen.update(kwargs)
        return attacks.fgsm(model, x_in, target, eps_in, **kwargs)

    objective.attack = record
    torch.manual_seed(0)
    objective(tiny_model, x, y, eps)
    assert seen["start_std"] == 0.001 and seen["loss"] == "kl"
    torch.manual_seed(0)
    x_adv = attacks.fgsm(tiny_model, x, clean, eps, loss="kl", start_std=0.001)
    corner = (x + eps * torch.randn_like(x).sign()).clamp(0, 1)
    with torch.no_grad():
        climbed = attacks.kl_divergence(tiny_model(x_adv), clean).mean()
        random = attacks.kl_divergence(tiny_model(corner), clean).mean()
    assert climbed > 3 * random  # one step up the KL, not along the sign of noise


def test_trades_attacks_in_eval_mode_by_default_and_needs_a_training_attack(tmp_path):
    from advcli.errors import ConfigError
    from advcli.training.train import check_settings

    assert check_settings(compose_config("train", tiny_overrides(tmp_path, "trainer=trades"))).attack_mode == "eval"
    assert check_settings(compose_config("train", tiny_overrides(tmp_path))).attack_mode == "train"
    explicit = compose_config("train", tiny_overrides(tmp_path, "trainer=trades", "attack_mode=train"))
    assert check_settings(explicit).attack_mode == "train"
    with pytest.raises(ConfigError, match="attack=none"):
        train(compose_config("train", tiny_overrides(tmp_path, "trainer=trades", "attack=none")))


def test_autoattack_against_an_adv_class_model_is_refused(adv_class_run, tmp_path):
    from advcli.errors import ConfigError

    run, _ = adv_class_run
    cfg = compose_config("eval", ["evaluation=fast", f"ckpt={run / 'checkpoint.pt'}", "attack=autoattack", "device=cpu",
                                  f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="not adaptive to the adversarial-input output"):
        evaluate_checkpoint(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_an_adv_class_run_evaluates_with_the_adaptive_preset_and_autoattack_is_refused(adv_class_run, tmp_path):
    from hydra import compose, initialize_config_module

    from advcli.errors import ConfigError

    with initialize_config_module(config_module="advcli.configs", version_base="1.3"):
        chosen = compose(config_name="train", overrides=["trainer=adv_class"], return_hydra_config=True)
    assert chosen.hydra.runtime.choices.evaluation == "fast" and "pgd" in chosen.evaluation.attacks
    assert chosen.validation.attack.name == "pgd"  # its adaptive variant checks each epoch
    with pytest.raises(ConfigError, match="validation.attack=apgd_ce"):
        train(compose_config("train", tiny_overrides(tmp_path / "refused", "trainer=adv_class",
                                                     "attack@validation.attack=apgd_ce")))

    run, _ = adv_class_run
    # the default preset becomes the fast one by itself (test_evaluate); AutoAttack asked for is refused
    cfg = compose_config("eval", ["evaluation=autoattack", f"ckpt={run / 'checkpoint.pt'}", "device=cpu",
                                  f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="evaluation=fast"):
        evaluate_checkpoint(cfg)
    assert not (tmp_path / "metrics.json").exists()
