"""Interrupted runs resume exactly; diverging runs stop cleanly; bad input is one paragraph, never a traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import shutil

from advcli.errors import ConfigError, Interrupted, TrainingDiverged
from advcli.runs import checkpoint
from advcli.runs.checkpoint import CheckpointError
from advcli.training import train as train_module
from advcli.training.epoch import LrSchedule
from advcli.training.train import train
from conftest import compose_config, hold_run_directory, run_advcli, start_advcli, tiny_overrides

# about a second per epoch on 2 CPU cores: long enough to be stopped in the middle of epoch 2
SLOW_TINY = ["dataset=synthetic", "dataset.num_train=4096", "model=cnn", "attack=pgd", "attack.steps=3", "epochs=3",
             "batch_size=64", "eps=0.1", "eps_warmup=0", "data.val_size=64", "evaluation.num_examples=128",
             "evaluation=fast", "evaluation.sanity.enabled=false",
             "device=cpu", "progress=false", "log_every=1"]


def start(run_dir: Path) -> subprocess.Popen:
    return start_advcli("train", *SLOW_TINY, f"hydra.run.dir={run_dir}")


def finish(run_dir: Path) -> subprocess.CompletedProcess:
    return run_advcli("train", *SLOW_TINY, f"hydra.run.dir={run_dir}")


def wait_for_epoch(run_dir: Path, epoch: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "checkpoint.pt"
        if path.is_file() and checkpoint.load(path)["epoch"] >= epoch:
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("straight")
    result = finish(run_dir)
    assert result.returncode == 0, result.stderr
    return json.loads((run_dir / "metrics.json").read_text())


def same_run(a: dict, b: dict) -> None:
    def numbers(metrics: dict) -> dict:
        return {name: (row["acc"], row.get("loss")) for name, row in metrics["test"].items()}

    assert numbers(a) == numbers(b)
    assert [e["train_loss"] for e in a["history"]] == [e["train_loss"] for e in b["history"]]
    assert [e["val_robust_acc"] for e in a["history"]] == [e["val_robust_acc"] for e in b["history"]]


@pytest.mark.slow
def test_kill_9_in_epoch_2_then_rerun_gives_the_uninterrupted_result(tmp_path, uninterrupted):
    process = start(tmp_path)
    wait_for_epoch(tmp_path, 1, process)
    time.sleep(0.4)
    process.kill()  # SIGKILL: nothing can be saved, the epoch-1 checkpoint must do
    process.communicate()
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1, "the kill came after epoch 2 had finished"
    resumed = finish(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr + resumed.stdout
    same_run(json.loads((tmp_path / "metrics.json").read_text()), uninterrupted)


@pytest.mark.slow
def test_sigint_saves_mid_epoch_and_the_rerun_continues_exactly(tmp_path, uninterrupted):
    process = start(tmp_path)
    wait_for_epoch(tmp_path, 1, process)
    time.sleep(0.4)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "SIGINT stopped the run in epoch 2 after batch" in stderr and "Traceback" not in stderr
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["partial"]["batches"] > 0
    resumed = finish(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    same_run(json.loads((tmp_path / "metrics.json").read_text()), uninterrupted)


def test_best_checkpoint_holds_the_best_held_out_robust_epoch(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, "epochs=3")))
    best = checkpoint.load(tmp_path / "best.pt")
    scores = [entry["val_robust_acc"] for entry in metrics["history"]]
    assert best["history"][-1]["val_robust_acc"] == max(scores)
    assert best["epoch"] == max(i + 1 for i, score in enumerate(scores) if score == max(scores))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 3


def test_rerunning_a_finished_run_shows_its_results_without_training_or_evaluating_again(tmp_path, monkeypatch):
    first = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2")))
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr(train_module, "evaluate_model", no_evaluation)
    monkeypatch.setattr(train_module, "train_epoch", no_evaluation)
    again = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2")))
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert again == stored == first  # the stored results, as they are: what the first run returned
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()
    fresh = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2", "resume=never", "seed=1")))
    assert fresh["history"] != first["history"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished")
    train(compose_config("train", tiny_overrides(run, "epochs=2", "lr_schedule=cosine")))
    return run


@pytest.mark.parametrize("override,key", [
    ("eps=0.2", "eps"), ("attack=fgsm", "attack.name"), ("attack=pgd_margin", "attack.loss"),
    ("trainer=trades", "trainer.name"), ("lr=0.01", "lr"), ("lr_schedule=onecycle", "lr_schedule"),
    ("norm=l2", "norm"), ("seed=1", "seed"), ("optimizer=sgd", "optimizer._target_"), ("amp=fp16", "amp"),
    ("data.val_size=32", "data.val_size"), ("validation.attack.steps=3", "validation.attack.steps"),
])
def test_a_rerun_with_other_settings_in_the_same_directory_is_refused_naming_them(finished_run, tmp_path, override,
                                                                                 key):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "metrics.json")}
    with pytest.raises(CheckpointError) as error:
        train(compose_config("train", tiny_overrides(run, "epochs=2", "lr_schedule=cosine", override)))
    message = str(error.value)
    assert f"{key}: " in message and "resume=never" in message and "another directory" in message
    assert "\n" not in message
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing written under the new labels


def test_the_refusal_is_one_paragraph_and_exit_status_2_from_the_shell(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    args = [a for a in tiny_overrides(run, "epochs=2", "lr_schedule=cosine", "eps=0.2") if not a.startswith("output_dir")]
    result = run_advcli("train", *args, f"hydra.run.dir={run}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("advcli: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "eps: 0.1 -> 0.2" in errors[0], result.stderr


def test_the_final_evaluations_settings_may_change_on_resume(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    again = train(compose_config("train", tiny_overrides(run, "epochs=2", "lr_schedule=cosine",
                                                         "evaluation.num_examples=64")))
    assert again["num_test"] == 64 and len(again["history"]) == 2  # re-evaluated, not retrained


def test_more_epochs_after_a_schedule_that_reached_its_end_are_refused(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(ConfigError, match="lr_schedule=cosine"):
        train(compose_config("train", tiny_overrides(run, "epochs=4", "lr_schedule=cosine")))


def test_more_epochs_on_resume_stretch_the_rest_of_the_schedule_without_a_jump(tmp_path, monkeypatch):
    common = ["lr_schedule=onecycle", "lr=0.01"]
    straight = train(compose_config("train", tiny_overrides(tmp_path / "straight", "epochs=4", *common)))
    calls = []
    real_validate = train_module.validate

    def validate_then_sigint(run):  # a Ctrl-C during epoch 2's validation: the run stops with epoch 2 saved
        found = real_validate(run)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return found

    monkeypatch.setattr(train_module, "validate", validate_then_sigint)
    with pytest.raises(Interrupted):
        train(compose_config("train", tiny_overrides(tmp_path / "run", "epochs=4", *common)))
    monkeypatch.undo()
    longer = train(compose_config("train", tiny_overrides(tmp_path / "run", "epochs=6", *common)))

    rates = [entry["lr"] for entry in longer["history"]]
    assert rates[:2] == [entry["lr"] for entry in straight["history"]][:2]  # the same run up to the stop
    payload = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    schedule = LrSchedule("onecycle", 1)
    schedule.__dict__.update(payload["scheduler"]["lr_lambdas"][0])
    steps_per_epoch = payload["scheduler"]["last_epoch"] // 6
    stop = 2 * steps_per_epoch
    factors = [schedule(step) for step in range(6 * steps_per_epoch + 1)]
    original = LrSchedule("onecycle", 4 * steps_per_epoch)
    steepest = max(abs(original(s + 1) - original(s)) for s in range(4 * steps_per_epoch))
    assert factors[:stop + 1] == [original(s) for s in range(stop + 1)]  # unchanged up to the resume point
    assert max(abs(b - a) for a, b in zip(factors, factors[1:])) <= steepest + 1e-12  # no jump anywhere
    assert factors[-1] == 0.0 and rates[2] == pytest.approx(0.01 * factors[stop])  # still ends at zero


def test_a_diverging_run_stops_naming_epoch_and_batch_and_keeps_the_last_checkpoint(tmp_path):
    train(compose_config("train", tiny_overrides(tmp_path, "epochs=1")))
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingDiverged) as error:  # a new run in the same directory, with a hopeless lr
        train(compose_config("train", tiny_overrides(tmp_path, "epochs=2", "lr=1e30", "resume=never")))
    message = str(error.value)
    assert "epoch 1 at batch" in message and "lr" in message
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    payload = checkpoint.load(tmp_path / "checkpoint.pt")
    assert payload["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_resuming_another_model_is_refused_by_name(tmp_path):
    train(compose_config("train", tiny_overrides(tmp_path, "model=mlp")))
    with pytest.raises(CheckpointError) as error:
        train(compose_config("train", tiny_overrides(tmp_path, "model=cnn", "epochs=2")))
    assert "mlp" in str(error.value) and "cnn" in str(error.value) and "resume=never" in str(error.value)


@pytest.mark.parametrize("override,fragment", [
    ("attack.steps=0", "attack.steps=0"),
    ("restarts=0", "restarts=0"),
    ("batch_size=0", "batch_size=0"),
    ("epochs=-1", "epochs=-1"),
    ("evaluation.attacks.apgd_ce.steps=0", "evaluation.attacks.apgd_ce.steps=0"),
    ("device=cuda", "device=cpu"),
    ("norm=l3", "norm=l3"),
    ("eps=1/0", "divides by zero"),
])
def test_bad_input_is_one_paragraph_before_any_work(tmp_path, monkeypatch, override, fragment):
    # in-process; the shell's side (exit status 2, one line) is test_the_refusal_is_one_paragraph_and_exit_status_2_from_the_shell
    from advcli.errors import UserError, one_paragraph
    from advcli.training.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU, here or on a GPU machine
    run_dir = tmp_path / "run"
    args = [override, "dataset=synthetic", "model=mlp", f"output_dir={run_dir}"]
    if not override.startswith("device="):
        args.append("device=cpu")
    with pytest.raises(UserError) as error:
        train(compose_config("train", args))
    message = one_paragraph(error.value)
    assert fragment in message and "\n" not in message
    assert not (run_dir / "checkpoint.pt").exists()


def test_debug_switch_shows_the_traceback(tmp_path):
    result = run_advcli("train", "eps=abc", "dataset=synthetic", "debug=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Traceback" in result.stderr + result.stdout


def test_an_output_directory_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_advcli("train", "dataset=synthetic", f"output_dir={blocker / 'run'}",
                        f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 2 and "cannot be written" in result.stderr and "Traceback" not in result.stderr


def test_a_run_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_advcli("train", "dataset=synthetic", f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 2 and "cannot be written" in result.stderr and "Traceback" not in result.stderr
    assert "hydra.run.dir=PATH" in result.stderr


def interrupted_after_epoch_1(tmp_path, monkeypatch, *overrides: str) -> None:
    """A run stopped by Ctrl-C during epoch 1's validation: its checkpoint holds epoch 1 of the planned ones."""
    real_validate = train_module.validate

    def validate_then_sigint(run):
        found = real_validate(run)
        signal.raise_signal(signal.SIGINT)
        return found

    monkeypatch.setattr(train_module, "validate", validate_then_sigint)
    with pytest.raises(Interrupted):
        train(compose_config("train", tiny_overrides(tmp_path, *overrides)))
    monkeypatch.undo()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_fewer_epochs_on_resume_are_refused_for_a_schedule_that_depends_on_the_length(tmp_path, monkeypatch,
                                                                                      schedule):
    interrupted_after_epoch_1(tmp_path, monkeypatch, "epochs=3", f"lr_schedule={schedule}")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError) as error:  # it would end mid-schedule, yet be recorded as a 2-epoch run
        train(compose_config("train", tiny_overrides(tmp_path, "epochs=2", f"lr_schedule={schedule}")))
    message = str(error.value)
    assert "epochs=2" in message and "planned for 3 epochs" in message and f"lr_schedule={schedule}" in message
    assert "epochs=3" in message and "resume=never" in message and "\n" not in message
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and not (tmp_path / "metrics.json").exists()


def test_fewer_epochs_on_resume_are_allowed_with_a_constant_learning_rate(tmp_path, monkeypatch):
    interrupted_after_epoch_1(tmp_path, monkeypatch, "epochs=3")
    shorter = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2")))
    assert shorter["epochs"] == shorter["epochs_trained"] == 2


def test_a_second_command_in_a_run_directory_held_by_a_live_process_is_refused_naming_it(tmp_path):
    train(compose_config("train", tiny_overrides(tmp_path / "other")))
    run = tmp_path / "run"
    holder = hold_run_directory(run)
    try:
        from_shell = run_advcli("train", *[a for a in tiny_overrides(run) if not a.startswith("output_dir")],
                                f"hydra.run.dir={run}")
        errors = [line for line in from_shell.stderr.splitlines() if line.startswith("advcli: error:")]
        assert from_shell.returncode == 2 and len(errors) == 1, from_shell.stderr
        assert f"process {holder.pid} on " in errors[0] and "in use by another advcli process" in errors[0]
        with pytest.raises(ConfigError) as in_process:  # past the command line's check: the lock itself
            train(compose_config("train", tiny_overrides(run)))
        assert f"process {holder.pid} on " in str(in_process.value) and "started 20" in str(in_process.value)
        evaluated = run_advcli("eval", f"ckpt={tmp_path / 'other' / 'checkpoint.pt'}", f"output_dir={run}",
                               "evaluation=fast", "device=cpu", f"hydra.run.dir={tmp_path / 'eval'}")
        assert evaluated.returncode == 2 and f"process {holder.pid}" in evaluated.stderr, evaluated.stderr
        assert not (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up; its lock goes with it
        holder.wait()
    assert (run / ".advcli-lock").is_file()
    metrics = train(compose_config("train", tiny_overrides(run)))
    assert metrics["epochs_trained"] == 1 and (run / "metrics.json").is_file()


@pytest.mark.slow
def test_a_run_started_again_while_it_still_trains_is_refused_and_the_first_one_finishes(tmp_path, uninterrupted):
    first = start(tmp_path)
    try:
        wait_for_epoch(tmp_path, 1, first)
        second = finish(tmp_path)
        assert second.returncode == 2 and f"process {first.pid} on " in second.stderr, second.stderr
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    same_run(json.loads((tmp_path / "metrics.json").read_text()), uninterrupted)
