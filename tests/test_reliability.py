"""Interrupted runs resume exactly; diverging runs stop cleanly; bad input is one paragraph, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from advcli import checkpoint
from advcli.checkpoint import CheckpointError
from advcli.train import TrainingDiverged, train
from conftest import REPO, compose_config, tiny_overrides

# about a second per epoch on 2 CPU cores: long enough to be stopped in the middle of epoch 2
SLOW_TINY = ["dataset=synthetic", "dataset.num_train=4096", "model=cnn", "attack=pgd", "attack.steps=3", "epochs=3",
             "batch_size=64", "eps=0.1", "eps_warmup=0", "data.val_size=64", "evaluation.num_examples=128",
             "evaluation.sanity.enabled=false",
             "device=cpu", "progress=false", "log_every=1"]


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(["advcli", "train", *SLOW_TINY, f"hydra.run.dir={run_dir}"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["advcli", "train", *SLOW_TINY, f"hydra.run.dir={run_dir}"], cwd=REPO, text=True,
                          capture_output=True, timeout=300)


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
    assert [e["val_pgd_acc"] for e in a["history"]] == [e["val_pgd_acc"] for e in b["history"]]


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
    scores = [entry["val_pgd_acc"] for entry in metrics["history"]]
    assert best["history"][-1]["val_pgd_acc"] == max(scores)
    assert best["epoch"] == max(i + 1 for i, score in enumerate(scores) if score == max(scores))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 3


def test_rerunning_a_finished_run_only_re_evaluates(tmp_path):
    first = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2")))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    again = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2")))
    assert again["history"] == first["history"]
    assert {k: v["acc"] for k, v in again["test"].items()} == {k: v["acc"] for k, v in first["test"].items()}
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    fresh = train(compose_config("train", tiny_overrides(tmp_path, "epochs=2", "resume=never", "seed=1")))
    assert fresh["history"] != first["history"]


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


def advcli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["advcli", *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("override,fragment", [
    ("attack.steps=0", "attack.steps=0"),
    ("restarts=0", "restarts=0"),
    ("batch_size=0", "batch_size=0"),
    ("epochs=-1", "epochs=-1"),
    ("evaluation.attacks.pgd.steps=0", "evaluation.attacks.pgd.steps=0"),
    ("device=cuda", "device=cpu"),
    ("norm=l3", "norm=l3"),
    ("eps=1/0", "divides by zero"),
])
def test_bad_input_is_one_paragraph_before_any_work(tmp_path, override, fragment):
    run_dir = tmp_path / "run"
    args = [override, "dataset=synthetic", "model=mlp", f"hydra.run.dir={run_dir}"]
    if not override.startswith("device="):
        args.append("device=cpu")
    result = advcli("train", *args, CUDA_VISIBLE_DEVICES="")  # no GPU visible, here or on a GPU machine
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("advcli: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (run_dir / "checkpoint.pt").exists()


def test_debug_switch_shows_the_traceback(tmp_path):
    result = advcli("train", "eps=abc", "dataset=synthetic", "debug=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Traceback" in result.stderr + result.stdout


def test_an_output_directory_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = advcli("train", "dataset=synthetic", f"output_dir={blocker / 'run'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 2 and "cannot be written" in result.stderr and "Traceback" not in result.stderr


def test_a_run_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = advcli("train", "dataset=synthetic", f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 2 and "cannot be written" in result.stderr and "Traceback" not in result.stderr
    assert "hydra.run.dir=PATH" in result.stderr
