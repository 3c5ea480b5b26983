"""Experiment tracking (advcli.runs.tracking, advcli.runs.loggers): what each logger holds, read back through the
libraries' own readers (MlflowClient, TensorBoard's EventAccumulator, csv), resumed runs, advcli eval, sweeps,
and the one-paragraph errors. Tiny runs on the synthetic set, a few seconds each; the sweep runs in a subprocess."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing import event_accumulator

from advcli import config
from advcli.errors import ConfigError, Interrupted, MissingExtra, TrackingError
from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.runs import loggers, tracking
from advcli.training.train import train
from conftest import compose_config, run_advcli, tiny_overrides

FAST = ["model.hidden=[32]", "evaluation.num_examples=64", "evaluation.attacks.pgd.steps=3",
        "evaluation.attacks.pgd_margin.steps=3", "validation.attack.steps=2", "evaluation.sanity.enabled=false"]
SANITY = ["evaluation.sanity.enabled=true", "evaluation.sanity.num_examples=32",
          "evaluation.sanity.stronger.num_examples=16", "evaluation.sanity.steps_factor=2"]
HISTORY = {"train_loss": "train/loss", "train_acc": "train/acc", "lr": "train/lr", "time_s": "train/time_s",
           "val_clean_acc": "val/clean_acc", "val_robust_acc": "val/robust_acc"}


def tiny(run: Path, *extra: str) -> list[str]:
    return tiny_overrides(run, *FAST, *extra)


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def mlflow_runs(uri: str, experiment: str = "advcli") -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=["start_time"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def events(folder: Path) -> event_accumulator.EventAccumulator:
    found = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0,
                                                                           event_accumulator.IMAGES: 0})
    found.Reload()
    return found


@pytest.mark.parametrize("command", ["train", "eval"])
def test_the_logger_group_picks_none_one_or_several_trackers(command):
    picked = {choice: list(tracking.chosen(compose_config(command, [choice] if choice else [])))
              for choice in ("", "logger=none", "logger=csv", "logger=[csv,tensorboard,mlflow]")}
    assert picked == {"": [], "logger=none": [], "logger=csv": ["csv"],
                      "logger=[csv,tensorboard,mlflow]": ["csv", "tensorboard", "mlflow"]}
    mlflow = tracking.chosen(compose_config(command, ["logger=mlflow", "logger.mlflow.experiment_name=cifar"]))
    assert mlflow == {"mlflow": {"tracking_uri": None, "experiment_name": "cifar", "run_name": None,
                                 "artifact_location": None, "log_checkpoints": False}}


# --- what each logger holds ------------------------------------------------------------------------------

def test_mlflow_holds_the_config_the_metric_history_the_results_the_verdicts_and_the_files(tmp_path):
    uri = store(tmp_path)
    metrics = train(compose_config("train", tiny(tmp_path / "run", "epochs=2", "logger=mlflow", *SANITY,
                                                 f"logger.mlflow.tracking_uri={uri}")))
    [run] = mlflow_runs(uri)
    client = MlflowClient(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == f"train {tmp_path.name}/run"
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]["run_id"] == run.info.run_id

    params = run.data.params  # the resolved config, flat
    assert (params["eps"], params["epochs"], params["model.name"], params["model.hidden"]) == ("0.1", "2", "mlp", "[32]")
    assert params["evaluation.attacks.pgd.steps"] == "3" and params["logger.mlflow.tracking_uri"] == uri

    for key, name in HISTORY.items():  # every epoch's value, at its epoch, equal to metrics.json's
        history = client.get_metric_history(run.info.run_id, name)
        assert [(m.step, m.value) for m in history] == [(e["epoch"], e[key]) for e in metrics["history"]], name
    for attack, result in metrics["test"].items():  # the final results, once, with their intervals
        assert run.data.metrics[f"test/acc/{attack}"] == result["acc"]
        assert [run.data.metrics[f"test/ci_{end}/{attack}"] for end in ("low", "high")] == result["ci95"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"test/acc/{attack}")] == [0]
    assert run.data.metrics["test/n"] == 64

    tags = run.data.tags  # the sanity verdicts
    assert tags["sanity"] == metrics["sanity"]["verdict"] and tags["advcli.command"] == "train"
    assert {f"sanity.{c['name']}": c["verdict"] for c in metrics["sanity"]["checks"]}.items() <= tags.items()
    assert tags["overfit_guard"] == "not triggered"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "training_curves.png", "results.md", "sanity.md"} <= artifacts
    assert not any(path.endswith(".pt") for path in artifacts)  # checkpoints only with log_checkpoints=true
    copy = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    assert json.loads(copy.read_text()) == metrics
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the SQLite store, not in the working directory


def test_tensorboard_holds_every_scalar_at_every_epoch_the_config_and_the_pictures(tmp_path):
    metrics = train(compose_config("train", tiny(tmp_path / "run", "epochs=2", "logger=tensorboard")))
    found = events(tmp_path / "run" / "tensorboard")
    for key, name in HISTORY.items():
        scalars = found.Scalars(name)
        assert [s.step for s in scalars] == [1, 2], name
        assert [s.value for s in scalars] == pytest.approx([e[key] for e in metrics["history"]], rel=1e-6)
    for attack, result in metrics["test"].items():
        [point] = found.Scalars(f"test/acc/{attack}")
        assert point.step == 0 and point.value == pytest.approx(result["acc"], rel=1e-6)
    assert "files/training_curves" in found.Tags()["images"]
    assert {"config/text_summary", "results/text_summary", "tags/text_summary"} <= set(found.Tags()["tensors"])
    hparams = found.PluginTagToContent("hparams")  # the HParams tab: the runs' comparison table
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"model.hidden" in hparams["_hparams_/session_start_info"]


def test_csv_writes_a_row_per_epoch_and_with_log_batches_the_running_values_at_each_sync(tmp_path):
    metrics = train(compose_config("train", tiny(tmp_path / "run", "epochs=2", "logger=[csv,tensorboard]",
                                                 "log_batches=true", "log_every=3", "batch_size=64")))
    folder = tmp_path / "run" / "csv"
    rows = read_csv(folder / "metrics.csv")
    epochs, [final] = rows[:2], rows[2:]
    assert [int(r["step"]) for r in epochs] == [1, 2]
    for row, entry in zip(epochs, metrics["history"]):
        assert {name: float(row[name]) for name in HISTORY.values()} == {name: entry[key] for key, name in HISTORY.items()}
    assert int(final["step"]) == 0 and float(final["test/acc/any_attack"]) == metrics["test"]["any_attack"]["acc"]
    steps_per_epoch = -(-metrics["num_train"] // 64)
    synced = [int(r["step"]) for r in read_csv(folder / "batches.csv")]  # every 3rd batch and each epoch's last
    expected = [(e - 1) * steps_per_epoch + b for e in (1, 2) for b in range(1, steps_per_epoch + 1)
                if b % 3 == 0 or b == steps_per_epoch]
    assert synced == expected
    assert (folder / "config.yaml").read_text().count("hidden:") == 1
    assert "status: FINISHED" in (folder / "tags.yaml").read_text()
    assert (tmp_path / "run" / "tensorboard").is_dir()  # both loggers of the list


def test_logger_none_writes_no_tracker_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(compose_config("train", tiny(tmp_path / "run")))
    assert not {"csv", "tensorboard", "tracking.json"} & {p.name for p in (tmp_path / "run").iterdir()}
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


# --- resumed runs, failures, advcli eval ------------------------------------------------------------------

@pytest.mark.parametrize("error, status", [(RuntimeError("a bug"), "FAILED"),
                                           (Interrupted("SIGTERM stopped the run", signal.SIGTERM), "KILLED")])
def test_a_resumed_run_continues_its_own_mlflow_run_and_the_logger_never_blocks_resuming(tmp_path, monkeypatch,
                                                                                         error, status):
    uri, run = store(tmp_path), tmp_path / "run"
    with_mlflow = ["logger=[mlflow,csv]", f"logger.mlflow.tracking_uri={uri}"]

    def stop(*args, **kwargs):
        raise error

    monkeypatch.setattr("advcli.training.train.final_evaluation", stop)  # ends after its epoch is saved and logged
    with pytest.raises(type(error)):
        train(compose_config("train", tiny(run, "epochs=1", *with_mlflow)))
    [first] = mlflow_runs(uri)
    assert first.info.status == status
    monkeypatch.undo()

    metrics = train(compose_config("train", tiny(run, "epochs=2", *with_mlflow)))  # more epochs: resumes
    [again] = mlflow_runs(uri)
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    history = MlflowClient(uri).get_metric_history(again.info.run_id, "val/robust_acc")
    assert [(m.step, m.value) for m in history] == [(e["epoch"], e["val_robust_acc"]) for e in metrics["history"]]
    assert [int(r["step"]) for r in read_csv(run / "csv" / "metrics.csv")][:2] == [1, 2]

    # the loggers are not part of what defines a run: a run started without them resumes with them
    plain = compose_config("train", tiny(tmp_path / "other", "epochs=1"))
    logged = compose_config("train", tiny(tmp_path / "other", "epochs=1", *with_mlflow, "log_batches=true"))
    assert config.fingerprint(plain, precision="fp32") == config.fingerprint(logged, precision="fp32")


def test_eval_of_a_logged_checkpoint_is_nested_under_its_training_run(tmp_path):
    uri = store(tmp_path)
    train(compose_config("train", tiny(tmp_path / "run", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}")))
    evaluated = evaluate_checkpoint(compose_config("eval", [
        "evaluation=fast", f"ckpt={tmp_path / 'run' / 'checkpoint.pt'}", "device=cpu", "progress=false",
        "evaluation.num_examples=32", "evaluation.sanity.enabled=false", f"output_dir={tmp_path / 'eval'}",
        "logger=[mlflow,tensorboard]", f"logger.mlflow.tracking_uri={uri}"]))
    training, evaluation = mlflow_runs(uri)
    assert evaluation.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert evaluation.data.tags["advcli.command"] == "eval"
    assert evaluation.data.tags["advcli.training_run_dir"] == str((tmp_path / "run").resolve())
    assert evaluation.info.status == "FINISHED"
    for attack, result in evaluated["test"].items():
        assert evaluation.data.metrics[f"test/acc/{attack}"] == result["acc"]
    assert evaluation.data.params["ckpt"] == str(tmp_path / "run" / "checkpoint.pt")
    assert events(tmp_path / "eval" / "tensorboard").Scalars("test/acc/clean")[0].step == 0


def test_a_logger_that_fails_mid_run_is_dropped_and_training_goes_on(tmp_path, monkeypatch, caplog):
    def broken(self, metrics, step):
        raise OSError("disk full")

    monkeypatch.setattr(loggers.CsvLogger, "log_metrics", broken)
    with caplog.at_level(logging.WARNING, logger="advcli.runs.tracking"):
        metrics = train(compose_config("train", tiny(tmp_path / "run", "logger=[csv,tensorboard]")))
    assert (tmp_path / "run" / "metrics.json").is_file() and metrics["history"]
    assert "logger csv failed (OSError: disk full)" in caplog.text
    assert events(tmp_path / "run" / "tensorboard").Scalars("test/acc/clean")  # the others go on


@pytest.mark.slow
def test_under_torchrun_only_rank_0_logs(tmp_path):
    uri, run = store(tmp_path), tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "advcli", "train", *tiny(run, "epochs=2", "amp=off", "logger=[csv,mlflow]", "log_batches=true",
                                                 f"logger.mlflow.tracking_uri={uri}")],
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    [logged] = mlflow_runs(uri)  # one run, not one per rank
    history = MlflowClient(uri).get_metric_history(logged.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(e["epoch"], e["train_loss"]) for e in metrics["history"]]
    assert [int(row["step"]) for row in read_csv(run / "csv" / "metrics.csv")] == [1, 2, 0]
    batches = [int(row["step"]) for row in read_csv(run / "csv" / "batches.csv")]
    assert batches == sorted(set(batches))  # each sync once


# --- bad input: one paragraph -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, module", [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracker_library_stops_the_run_before_any_work(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` meets when the package is not installed
    with pytest.raises(MissingExtra) as refused:
        train(compose_config("train", tiny(tmp_path / "run", f"logger={name}")))
    message = str(refused.value)
    assert f"logger={name} needs the" in message and f"pip install 'advcli[{name}]'" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_an_unknown_logger_and_an_unreachable_store_are_refused_in_one_paragraph(tmp_path):
    with pytest.raises(ConfigError, match="wandb is not a logger advcli knows; the loggers are csv, tensorboard"):
        tracking.check(compose_config("train", ["+logger.wandb={}"]))
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cfg = compose_config("train", tiny(tmp_path / "run", "logger=mlflow",
                                       f"logger.mlflow.tracking_uri=sqlite:///{blocked}/mlflow.db"))
    with pytest.raises(TrackingError, match="logger=mlflow could not start its run at sqlite:///") as refused:
        train(cfg)
    assert "\n" not in str(refused.value) and not (tmp_path / "run" / "metrics.json").exists()


# --- sweeps ---------------------------------------------------------------------------------------------

SWEEP = ["dataset=synthetic", "model=mlp", "model.hidden=[16]", "epochs=1", "lr_schedule=constant", "device=cpu",
         "progress=false", "eps_warmup=0", "data.val_size=32", "evaluation=fast", "evaluation.num_examples=32",
         "evaluation.attacks.pgd.steps=2", "evaluation.attacks.pgd_margin.steps=2", "validation.attack.steps=2",
         "evaluation.sanity.enabled=false"]


@pytest.mark.slow
def test_a_sweep_logs_one_run_per_job_nested_under_one_parent_run_and_one_tensorboard_folder_per_job(tmp_path):
    uri, folder = store(tmp_path), tmp_path / "sweep"
    command = ["train", "-m", "eps=0.05,0.1", *SWEEP, "logger=[mlflow,tensorboard]",
               f"logger.mlflow.tracking_uri={uri}", f"hydra.sweep.dir={folder}"]
    result = run_advcli(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow_runs(uri)
    [parent] = [run for run in runs if run.data.tags["advcli.command"] == "sweep"]
    jobs = [run for run in runs if run is not parent]
    assert sorted(run.info.run_name for run in jobs) == ["eps=0.05", "eps=0.1"]  # named by their folders
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in jobs)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.params["eps"] for run in jobs} == {"0.05", "0.1"}
    summary = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "summary.png"} <= summary
    for run in jobs:  # the job's files, Hydra's config among them
        client = MlflowClient(uri)
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "train.log", "training_curves.png", "hydra"} <= files
        assert "hydra/overrides.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    for job in ("eps=0.05", "eps=0.1"):  # tensorboard --logdir SWEEP_DIR: one run per job
        metrics = json.loads((folder / job / "metrics.json").read_text())
        assert events(folder / job / "tensorboard").Scalars("test/acc/pgd")[0].value == \
            pytest.approx(metrics["test"]["pgd"]["acc"], rel=1e-6)

    again = run_advcli(*command)  # the same sweep again: finished jobs are not logged twice, the parent is reused
    assert again.returncode == 0, again.stderr[-3000:]
    assert [run.info.run_id for run in mlflow_runs(uri)] == [run.info.run_id for run in runs]


def test_an_mlflow_logger_that_fails_mid_run_ends_its_run_as_failed(tmp_path, monkeypatch):
    uri, calls = store(tmp_path), []
    original = loggers.MlflowLogger.log_metrics

    def fails_once(self, metrics, step):
        calls.append(step)
        if len(calls) == 1:
            raise ConnectionError("server gone")
        return original(self, metrics, step)

    monkeypatch.setattr(loggers.MlflowLogger, "log_metrics", fails_once)
    train(compose_config("train", tiny(tmp_path / "run", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}")))
    (found,) = mlflow_runs(uri)
    assert found.info.status == "FAILED" and len(calls) == 1  # ended, not left RUNNING; nothing sent after


def test_an_eval_whose_store_is_out_of_reach_keeps_its_results(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    train(compose_config("train", tiny(run)))

    def unreachable(*args, **kwargs):
        raise TrackingError("the store cannot be opened")

    monkeypatch.setattr(tracking, "open_logger", unreachable)
    with caplog.at_level(logging.WARNING, logger="advcli.runs.tracking"):
        metrics = evaluate_checkpoint(compose_config("eval", [f"ckpt={run / 'checkpoint.pt'}", "evaluation=fast",
                                                              "evaluation.sanity.enabled=false", "device=cpu",
                                                              "progress=false", "logger=csv",
                                                              f"output_dir={tmp_path / 'eval'}"]))
    assert metrics["test"] and (tmp_path / "eval" / "metrics.json").is_file()
    assert "the evaluation was not logged" in caplog.text


def test_a_sweep_stopped_before_its_end_leaves_no_parent_run_running(tmp_path, monkeypatch):
    from advcli.runs import sweep

    uri, at_exit = store(tmp_path), []
    monkeypatch.setattr(sweep.atexit, "register", lambda function, *args, **kwargs: at_exit.append(
        lambda: function(*args, **kwargs)))
    cfg = compose_config("train", ["logger=mlflow", f"logger.mlflow.tracking_uri={uri}"])
    sweep._start_tracking(cfg, tmp_path / "sweep", ["eps=0.1,0.2"])
    (parent,) = mlflow_runs(uri)
    assert parent.info.status == "RUNNING" and len(at_exit) == 1
    at_exit[0]()  # what the interpreter runs when Ctrl-C ends the sweep before on_multirun_end
    assert MlflowClient(uri).get_run(parent.info.run_id).info.status == "KILLED"
    sweep._end_tracking(tmp_path / "sweep")  # ended once: a later call changes nothing
    assert MlflowClient(uri).get_run(parent.info.run_id).info.status == "KILLED"


def test_sigterm_after_training_ends_the_tracker_run_as_killed(tmp_path):
    uri = store(tmp_path)
    cfg = compose_config("train", ["logger=mlflow", f"logger.mlflow.tracking_uri={uri}"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted):
        with tracking.tracked(cfg, tmp_path / "run", command="train"):
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. SLURM's time limit during the final evaluation
    (found,) = mlflow_runs(uri)
    assert found.info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone with the run
