"""End-to-end runs of `train` and `advcli eval` on composed configs (synthetic data, seconds each)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from advcli import config
from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.runs import checkpoint
from advcli.runs.report import training_results, write_json
from advcli.training.train import train
from conftest import compose_config, tiny_overrides


@pytest.mark.parametrize("attack", ["none", "fgsm", "pgd"])
def test_each_training_attack_writes_a_checkpoint_and_metrics_per_attack(tmp_path, attack):
    run = tmp_path / "run"
    metrics = train(compose_config("train", tiny_overrides(run, f"attack={attack}")))
    assert (run / "checkpoint.pt").is_file()
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == metrics  # the file holds exactly what train returned: every key, every number
    assert on_disk["attack"] == attack and on_disk["eps"] == pytest.approx(0.1)
    assert set(on_disk["test"]) == {"clean", "fgsm", "pgd", "pgd_margin", "any_attack"}
    for name in ("clean", "fgsm", "pgd"):
        assert 0 <= on_disk["test"][name]["acc"] <= 1
    assert on_disk["test"]["pgd"]["steps"] == 20 and on_disk["test"]["pgd"]["restarts"] == 1
    worst = min(on_disk["test"][name]["acc"] for name in ("clean", "fgsm", "pgd"))
    assert on_disk["test"]["any_attack"]["acc"] <= worst
    assert len(on_disk["history"]) == 1 and "val_robust_acc" in on_disk["history"][0]

    evaluated = evaluate_checkpoint(compose_config("eval", ["evaluation=fast", f"ckpt={run / 'checkpoint.pt'}", "device=cpu",
                                                            "progress=false", f"output_dir={tmp_path / 'eval'}"]))
    assert evaluated["test"]["clean"]["acc"] == on_disk["test"]["clean"]["acc"]  # exactly, not approximately
    assert evaluated["eps"] == on_disk["eps"] and evaluated["num_examples"] == on_disk["num_test"]
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_training_learns_and_pgd_training_buys_robustness(tmp_path):
    common = ["epochs=4", "lr=3e-3", "dataset.num_train=1024", "eps=0.05", "evaluation.num_examples=256"]
    plain = train(compose_config("train", tiny_overrides(tmp_path / "plain", "attack=none", *common)))
    robust = train(compose_config("train", tiny_overrides(tmp_path / "robust", "attack=pgd", *common)))
    print("standard", plain["test"]["clean"]["acc"], plain["test"]["pgd"]["acc"],
          "| pgd-trained", robust["test"]["clean"]["acc"], robust["test"]["pgd"]["acc"])
    assert plain["test"]["clean"]["acc"] > 0.8
    assert robust["test"]["pgd"]["acc"] > plain["test"]["pgd"]["acc"] + 0.1


def test_eval_overrides_eps_restarts_steps_and_examples(tmp_path):
    train(compose_config("train", tiny_overrides(tmp_path / "run")))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    at_zero = evaluate_checkpoint(compose_config("eval", ["evaluation=fast", f"ckpt={ckpt}", "eps=0", "device=cpu", "progress=false",
                                                          f"output_dir={tmp_path / 'e0'}"]))
    assert at_zero["test"]["pgd"]["acc"] == at_zero["test"]["clean"]["acc"]
    stronger = evaluate_checkpoint(compose_config("eval", ["evaluation=fast", 
        f"ckpt={ckpt}", "eps=8/255", "restarts=3", "evaluation.attacks.pgd.steps=7", "evaluation.num_examples=100",
        "split=train", "device=cpu", "progress=false", f"output_dir={tmp_path / 'e1'}"]))
    assert stronger["eps"] == pytest.approx(8 / 255) and stronger["num_examples"] == 100
    assert stronger["split"] == "train"
    assert stronger["test"]["pgd"]["restarts"] == 3 and stronger["test"]["pgd"]["steps"] == 7


def test_seeded_cpu_runs_are_reproducible(tmp_path):
    first = train(compose_config("train", tiny_overrides(tmp_path / "a", "epochs=2")))
    second = train(compose_config("train", tiny_overrides(tmp_path / "b", "epochs=2")))
    assert first["test"] == second["test"]
    assert [e["train_loss"] for e in first["history"]] == [e["train_loss"] for e in second["history"]]


@pytest.mark.parametrize("extra", [[], ["ema.decay=0.9"]], ids=["weights", "ema"])
def test_resume_continues_to_the_same_weights(tmp_path, extra):
    train(compose_config("train", tiny_overrides(tmp_path / "straight", "epochs=2", *extra)))
    train(compose_config("train", tiny_overrides(tmp_path / "first", "epochs=1", *extra)))
    resumed = train(compose_config("train", tiny_overrides(tmp_path / "resumed", "epochs=2", *extra,
                                                           f"resume={tmp_path / 'first' / 'checkpoint.pt'}")))
    straight = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    again = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert again["epoch"] == 2 and len(resumed["history"]) == 2
    for key in ("model", "train_model") if extra else ("model",):  # with EMA: the average and the trained weights
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, again[key][name]), (key, name)


def test_a_run_recorded_as_trainer_standard_shows_its_results_and_resumes_as_minmax(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = train(compose_config("train", tiny_overrides(run, "evaluation.sanity.enabled=false")))
    # what advcli wrote before min-max training was named minmax (and objectives had their old module path)
    payload = checkpoint.load(run / "checkpoint.pt")
    payload["config"]["trainer"] = {"name": "standard", "_target_": "advcli.objectives.MinMax"}
    payload["fingerprint"].update({"trainer.name": "standard", "trainer._target_": "advcli.objectives.MinMax"})
    checkpoint.save(run / "checkpoint.pt", payload)
    write_json(run / "metrics.json", {**first, "trainer": "standard",
                                      "fingerprint": config.fingerprint_id(payload["fingerprint"])})

    def evaluated_again(*args, **kwargs):
        raise AssertionError("a finished run's results are shown again, not recomputed")

    monkeypatch.setattr("advcli.training.train.final_evaluation", evaluated_again)
    for name in ("minmax", "standard"):  # the new name and the old one on the command line
        shown = train(compose_config("train", tiny_overrides(run, f"trainer={name}", "evaluation.sanity.enabled=false")))
        assert shown["test"] == first["test"]
        assert "trained with pgd for 1 epoch(s)" in training_results(shown)  # min-max with PGD, as before
    monkeypatch.undo()
    more = train(compose_config("train", tiny_overrides(run, "epochs=2", "evaluation.sanity.enabled=false")))
    assert [entry["epoch"] for entry in more["history"]] == [1, 2]  # continued, not refused or restarted
    assert more["history"][0] == first["history"][0] and more["trainer"] == "minmax"
    assert checkpoint.load(run / "checkpoint.pt")["config"]["trainer"]["name"] == "minmax"


def test_an_ema_run_evaluates_and_saves_the_average_and_resumes_from_the_trained_weights(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "ema.decay=0.9", "epochs=2")))
    payload = checkpoint.load(tmp_path / "checkpoint.pt")
    assert payload["ema_updates"] == 2 * math.ceil(metrics["num_train"] / 64)  # every step updated the average
    differs = [not torch.equal(payload["model"][k], payload["train_model"][k]) for k in payload["model"]]
    assert any(differs), "the saved model is the trained weights, not their average"
    assert metrics["ema_decay"] == 0.9 and "EMA of its weights" in training_results(metrics)
    # advcli eval of the checkpoint evaluates what the run evaluated: the average
    again = evaluate_checkpoint(compose_config("eval", [f"ckpt={tmp_path / 'checkpoint.pt'}", "evaluation=fast",
                                                        "evaluation.sanity.enabled=false", "device=cpu",
                                                        "progress=false", f"output_dir={tmp_path / 'eval'}"]))
    assert again["test"]["clean"]["acc"] == metrics["test"]["clean"]["acc"]


def test_checkpoint_holds_what_eval_needs_as_plain_data(tmp_path):
    train(compose_config("train", tiny_overrides(tmp_path, "model=cnn")))
    payload = checkpoint.load(tmp_path / "checkpoint.pt")
    assert payload["model_spec"]["name"] == "cnn" and payload["model_spec"]["num_classes"] == 4
    assert payload["config"]["eps"] == 0.1 and payload["config"]["dataset"]["name"] == "synthetic"
    assert payload["epoch"] == 1 and "optimizer" in payload and "_target_" not in payload["model_spec"]


def test_l2_threat_model_end_to_end(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "norm=l2", "eps=0.5")))
    assert metrics["norm"] == "l2" and metrics["test"]["pgd"]["norm"] == "l2"


def test_the_evaluation_ending_training_and_advcli_eval_of_its_checkpoint_agree_exactly(tmp_path):
    # training draws random numbers for an epoch and more; the final evaluation must not depend on them
    metrics = train(compose_config("train", tiny_overrides(tmp_path / "run", "epochs=2", "restarts=2")))
    evaluated = evaluate_checkpoint(compose_config("eval", ["evaluation=fast", f"ckpt={tmp_path / 'run' / 'checkpoint.pt'}", "device=cpu",
                                                            "progress=false", f"output_dir={tmp_path / 'eval'}"]))
    assert evaluated["test"] == metrics["test"]  # every row: accuracy, loss, settings
    assert evaluated["sanity"] == metrics["sanity"]
    assert metrics["test"]["pgd"]["restarts"] == 2
    # the seconds each attack took, under the same keys as advcli eval's
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    attacks = set(metrics["test"]) - {"any_attack"}
    assert set(on_disk["attack_time_s"]) == set(evaluated["attack_time_s"]) == attacks
    assert all(seconds >= 0 for seconds in on_disk["attack_time_s"].values()) and on_disk["attack_time_s"]["pgd"] > 0
    assert on_disk["sanity_time_s"] > 0 and evaluated["sanity_time_s"] > 0


def test_the_run_is_labelled_with_the_attack_chosen_on_the_command_line(tmp_path, capsys):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "attack=pgd_margin", "attack.steps=2")))
    assert metrics["attack"] == "pgd_margin" and metrics["attack_settings"]["loss"] == "margin"
    assert metrics["trainer"] == "minmax" and metrics["epochs_trained"] == 1
    assert "trained with pgd_margin for 1 epoch(s)" in capsys.readouterr().out


def test_the_held_out_check_runs_in_the_evaluation_precision_whatever_the_training_precision(tmp_path, monkeypatch):
    from advcli import attacks, config, data, models, runtime
    from advcli.training import train as train_module
    from advcli.evaluation.evaluate import evaluate

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["amp_dtype"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", spy)
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "amp=bf16", "evaluation.sanity.enabled=false")))
    assert metrics["precision"] == "bf16 autocast" and seen == [None]  # trained in bf16, checked in fp32

    # and the recorded numbers are the fp32 ones: recomputed from the checkpoint with the same seed
    model = models.rebuild_model(checkpoint.load(tmp_path / "checkpoint.pt"))
    train_split = data.load_split("synthetic", "train", root=".")
    n_val = min(64, len(train_split) // 10)  # data.val_size=64, at most a tenth of the split
    held_out = train_split.subset(slice(len(train_split) - n_val, len(train_split)))
    cfg = compose_config("train", tiny_overrides(tmp_path))
    validation_attack = config.instantiate("validation.attack", cfg.validation.attack)
    with runtime.seeded(0, torch.device("cpu")):
        again = evaluate(model, data.batches(held_out, 500),
                         {"clean": attacks.none, "robust": validation_attack}, eps=0.1)
    assert metrics["history"][0]["val_robust_acc"] == again["robust"]["acc"]
    assert metrics["history"][0]["val_clean_acc"] == again["clean"]["acc"]


def test_a_one_cycle_epoch_line_shows_the_mean_rate_it_trained_with_not_its_first(tmp_path, caplog):
    # one-cycle over 2 epochs of S steps: the rate climbs from 0 at step 0 to lr at step S, then back to lr/S at
    # step 2S-1: epoch 1 starts at 0 and trains with a mean of lr (S-1)/2S, epoch 2 with lr (S+1)/2S
    with caplog.at_level("INFO", logger="advcli.training.train"):
        metrics = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2", "lr_schedule=onecycle",
                                                               "lr=0.004", "lr_peak=0.5")))
    steps = math.ceil(metrics["num_train"] / 64)
    first, second = metrics["history"]
    assert first["lr"] == 0.0  # the rate when the epoch began: the trackers' train/lr, as before
    assert first["lr_mean"] == pytest.approx(0.004 * (steps - 1) / (2 * steps))
    assert second["lr_mean"] == pytest.approx(0.004 * (steps + 1) / (2 * steps))
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and not any("lr 0.0e+00" in line for line in lines)
    assert f"lr(mean) {first['lr_mean']:.1e}" in lines[0] and f"lr(mean) {second['lr_mean']:.1e}" in lines[1]
