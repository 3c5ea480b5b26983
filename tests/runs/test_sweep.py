"""Sweeps (advcli.runs.sweep): the summary a multirun leaves, failed jobs, `advcli summarize`, Hydra's launchers.

The sweeps run `advcli train -m` in a subprocess on the synthetic set, each job a few seconds.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from advcli.runs import checkpoint
from conftest import hold_run_directory, run_advcli, start_advcli

TINY = ["dataset=synthetic", "model=mlp", "model.hidden=[32]", "epochs=1", "lr_schedule=constant", "device=cpu", "progress=false",
        "eps_warmup=0", "data.val_size=32", "evaluation.num_examples=64", "validation.attack.steps=2",
        "evaluation=fast", "evaluation.attacks.pgd.steps=3"]


def require_plugin(module: str) -> None:
    """Hydra's launcher plugins come with the test extra; a missing one fails the test (never skips)."""
    assert importlib.util.find_spec(module) is not None, f"{module} is missing: pip install -e '.[test]'"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2 eps x 2 training attacks sweep, run once for the tests below."""
    folder = tmp_path_factory.mktemp("sweep")
    result = run_advcli("train", "-m", "eps=0.05,0.1", "attack=fgsm,pgd", *TINY, f"hydra.sweep.dir={folder}")
    assert result.returncode == 0, result.stderr
    return folder, result


@pytest.mark.slow
def test_a_sweep_ends_with_one_summary_row_per_job_holding_the_jobs_own_numbers(sweep):
    folder, result = sweep
    rows = read_csv(folder / "summary.csv")
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]
    assert {(row["eps"], row["attack"]) for row in rows} == {("0.05", "fgsm"), ("0.05", "pgd"),
                                                            ("0.1", "fgsm"), ("0.1", "pgd")}
    for row in rows:
        job = Path(row["dir"])
        assert job.parent == folder and row["status"] == "ok"
        assert job.name == f"attack={row['attack']},eps={row['eps']}"  # named by its settings, not its number
        metrics = json.loads((job / "metrics.json").read_text())
        assert (job / "checkpoint.pt").is_file()
        assert (row["eps"], row["attack"]) == (metrics["eps_text"], metrics["attack"])
        for name in ("clean", "fgsm", "pgd", "any_attack"):
            assert float(row[f"{name}_acc"]) == metrics["test"][name]["acc"]
        assert float(row["train_time_s"]) == metrics["train_time_s"]

    table = (folder / "summary.md").read_text()
    assert "4 jobs, 4 ok" in table and "All jobs: dataset=synthetic model=mlp" in table
    table_lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 4
    assert all(line in result.stdout for line in table_lines)  # the table is printed at the sweep's end
    png = (folder / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 100_000


@pytest.mark.slow
def test_each_jobs_settings_id_is_the_same_in_its_metrics_and_in_the_summary(sweep):
    """Train records the id of the config it ran with; the summary computes it from the job's saved config, which
    holds interpolations (``optimizer.lr: ${lr}``): both resolve them, so one run has one id."""
    from advcli.runs import sweep as sweeps

    folder, _ = sweep
    rows = sweeps.summarize([folder])
    assert len(rows) == 4
    for row in rows:
        job = Path(row["dir"])
        assert "${lr}" in (job / ".hydra" / "config.yaml").read_text()
        assert row["settings_id"] == json.loads((job / "metrics.json").read_text())["settings_id"]
    assert len({row["settings_id"] for row in rows}) == 4  # every job ran other settings


@pytest.mark.slow
def test_summarize_rebuilds_the_same_summary(sweep, tmp_path):
    folder, _ = sweep
    again = run_advcli("summarize", "--out", str(tmp_path / "again"), str(folder))
    assert again.returncode == 0, again.stderr
    for name in ("summary.csv", "summary.md"):
        assert (tmp_path / "again" / name).read_text() == (folder / name).read_text()
    assert (tmp_path / "again" / "summary.png").is_file()
    assert all(line in again.stdout for line in (folder / "summary.md").read_text().splitlines() if line.startswith("|"))

    # the same runs given one by one make the same rows
    jobs = [row["dir"] for row in read_csv(folder / "summary.csv")]
    by_run = run_advcli("summarize", "--out", str(tmp_path / "runs"), *jobs)
    assert by_run.returncode == 0, by_run.stderr
    assert read_csv(tmp_path / "runs" / "summary.csv") == read_csv(folder / "summary.csv")


@pytest.mark.slow
def test_failed_jobs_are_marked_and_do_not_stop_the_sweep(tmp_path):
    # left behind by an earlier sweep into the same directory: neither may show up in this sweep's summary
    stale = tmp_path / "7" / ".hydra"
    stale.mkdir(parents=True)
    (stale / "overrides.yaml").write_text("- eps=0.3\n")
    (tmp_path / "7" / "metrics.json").write_text(json.dumps({"eps": 0.3, "test": {"clean": {"acc": 1.0}}}))
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "failed.json").write_text(json.dumps({"error": "an old failure", "type": "ConfigError"}))

    # eps=abc is refused by advcli's eps check (a UserError); hidden=[-5] fails inside torch (a bug, to advcli)
    result = run_advcli("train", "-m", "model.hidden=[8],[-5]", "eps=0.1,abc", "attack=fgsm",
                        *[o for o in TINY if not o.startswith("model.hidden")], f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "summary.csv")
    assert [(row["job"], row["status"]) for row in rows] == [("0", "ok"), ("1", "failed"), ("2", "failed"),
                                                              ("3", "failed")]
    assert rows[0]["error"] == "" and float(rows[0]["clean_acc"]) >= 0
    assert rows[1]["eps"] == "abc" and "not a number" in rows[1]["error"] and rows[1]["error_type"] == "ConfigError"
    assert rows[2]["error_type"] not in ("", "ConfigError") and rows[2]["clean_acc"] == ""
    for row in rows[1:]:
        failure = json.loads((Path(row["dir"]) / "failed.json").read_text())
        assert failure["error"] == row["error"] and not (Path(row["dir"]) / "metrics.json").exists()

    # the user's error is one paragraph; the bug keeps its traceback, in the job's log
    assert "eps=abc is not a number" in result.stderr and "the sweep goes on" in result.stderr
    assert "Traceback" in (Path(rows[2]["dir"]) / "train.log").read_text()
    assert "Traceback" not in (Path(rows[1]["dir"]) / "train.log").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "4 jobs, 1 ok, 3 failed" in summary and "Failed jobs:" in summary and "eps=abc" in summary


@pytest.mark.slow
def test_the_joblib_launcher_runs_a_two_job_sweep_in_parallel(tmp_path):
    require_plugin("hydra_plugins.hydra_joblib_launcher")
    result = run_advcli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "eps=0.05,0.1",
                        "attack=fgsm", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    rows = read_csv(tmp_path / "summary.csv")
    assert [(row["eps"], row["status"]) for row in rows] == [("0.05", "ok"), ("0.1", "ok")]
    for row in rows:
        assert float(row["pgd_acc"]) == json.loads((Path(row["dir"]) / "metrics.json").read_text())["test"]["pgd"]["acc"]


def test_a_slurm_sweep_submits_one_job_array_with_the_resources_asked_for(tmp_path):
    require_plugin("hydra_plugins.hydra_submitit_launcher")
    # A stand-in for the cluster's commands: submitit only looks for `srun`; `sbatch` keeps the script it is
    # handed and refuses it, so the sweep stops right after submitting (no job runs).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\n'
                                 'echo "sbatch: error: no SLURM cluster here" >&2\nexit 1\n')
    for command in ("srun", "sbatch"):
        (fake / command).chmod(0o755)
    folder = tmp_path / "sweep"
    result = run_advcli("train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                        "hydra.launcher.timeout_min=60", "eps=0.1,0.2", "dataset=synthetic", "model=mlp",
                        f"hydra.sweep.dir={folder}", env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode != 0 and "no SLURM cluster here" in result.stderr, result.stderr[-3000:]

    script = (fake / "submitted.sh").read_text().splitlines()
    sbatch = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script if line.startswith("#SBATCH --"))
    assert (sbatch["partition"], sbatch["time"]) == ("gpu", "60")  # the overrides, in sbatch's words (minutes)
    assert (sbatch["gpus-per-node"], sbatch["cpus-per-task"], sbatch["mem"], sbatch["ntasks-per-node"]) == \
        ("1", "8", "32GB", "1")                                     # slurm.yaml's defaults
    assert sbatch["array"] == "0-1%2" and sbatch["job-name"] == "advcli-train"  # both jobs as one array
    assert sbatch["output"].startswith(f"{folder}/.submitit/")     # SLURM's own logs inside the sweep directory
    # one pickled job per task of the array, each with its own overrides (as the launcher logs them)
    assert len(list((folder / ".submitit").glob("*.pkl"))) == 2
    output = result.stdout + result.stderr
    assert "#0 : eps=0.1 dataset=synthetic model=mlp" in output and "#1 : eps=0.2 dataset=synthetic model=mlp" in output
    assert not list(folder.glob("*/metrics.json"))  # nothing ran here


def test_summarize_help_and_a_path_without_runs(tmp_path):
    helped = run_advcli("summarize", "--help")
    assert helped.returncode == 0 and "usage: advcli summarize" in helped.stdout
    empty = run_advcli("summarize", str(tmp_path))
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    error_lines = [line for line in empty.stderr.splitlines() if line.startswith("advcli: error:")]
    assert len(error_lines) == 1 and "holds no runs" in error_lines[0] and str(tmp_path) in error_lines[0]
    assert run_advcli("summarize").returncode == 2


def comparable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Summary rows without what differs between two runs of the same sweep: times and the sweep folder."""
    return [{k: (Path(v).name if k == "dir" else v) for k, v in row.items() if not k.endswith("time_s")}
            for row in rows]


@pytest.mark.slow
def test_a_sweep_killed_midway_and_run_again_trains_only_what_is_missing(tmp_path):
    import signal
    import time

    args = ["train", "-m", "attack=pgd,pgd_margin,fgsm", *TINY, "epochs=2", "dataset.num_train=8192",
            "log_every=1"]
    straight = run_advcli(*args, f"hydra.sweep.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr

    folder = tmp_path / "killed"
    process = start_advcli(*args, f"hydra.sweep.dir={folder}")

    def second_job_in_epoch_2() -> bool:
        unfinished = [job for job in folder.glob("*/checkpoint.pt") if not (job.parent / "metrics.json").exists()]
        return any(folder.glob("*/metrics.json")) and any(checkpoint.load(p)["epoch"] == 1 for p in unfinished)

    deadline = time.monotonic() + 240
    while not second_job_in_epoch_2() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the second job is in its second epoch: it stops with a checkpoint
    log = "".join(process.communicate(timeout=240))
    assert process.returncode == 143 and "SIGTERM stopped the run" in log, log[-3000:]
    finished = sum((job / "metrics.json").is_file() for job in folder.iterdir() if job.is_dir())
    assert 1 <= finished < 3 and not (folder / "summary.csv").exists()

    again = run_advcli(*args, f"hydra.sweep.dir={folder}")
    assert again.returncode == 0, again.stderr
    output = again.stdout + again.stderr
    assert output.count("already finished") == finished  # finished jobs: their results, as they are
    assert output.count("epoch 2/2") == 3 - finished     # the others trained (the stopped one resumed)
    assert "resuming from" in output
    rows = read_csv(folder / "summary.csv")
    assert comparable(rows) == comparable(read_csv(tmp_path / "straight" / "summary.csv"))
    assert [row["attack"] for row in rows] == ["pgd", "pgd_margin", "fgsm"]  # two PGD rows, told apart
    assert sorted(Path(row["dir"]).name for row in rows) == ["attack=fgsm", "attack=pgd", "attack=pgd_margin"]


def test_the_summary_carries_n_and_a_wilson_interval_for_every_accuracy(tmp_path):
    from scipy.stats import binomtest

    from advcli.runs import summary
    from advcli.runs import sweep

    def wilson(k: int, n: int) -> tuple[float, float]:
        reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        return reference.low, reference.high

    # one run as the evaluation writes rows now (n, ci95), one as an older metrics.json (num_test only)
    correct = {"clean": 450, "pgd": 301, "any_attack": 287}
    for run, stored in (("new", True), ("old", False)):
        test = {name: {"acc": k / 500, **({"n": 500, "ci95": list(wilson(k, 500))} if stored else {})}
                for name, k in correct.items()}
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps(
            {"dataset": "mnist", "model": "cnn", "attack": "pgd", "eps": 0.3, "eps_text": "0.3", "num_test": 500,
             "test": test, "train_time_s": 1.0}))
    rows = sweep.summarize([tmp_path])
    text = summary.write_summary(rows, tmp_path / "out")

    for row in read_csv(tmp_path / "out" / "summary.csv"):
        assert row["n"] == "500"
        for name, k in correct.items():
            low, high = wilson(k, 500)
            assert float(row[f"{name}_acc"]) == k / 500
            assert float(row[f"{name}_ci_low"]) == pytest.approx(low, abs=1e-12)
            assert float(row[f"{name}_ci_high"]) == pytest.approx(high, abs=1e-12)
    header, _, *body = [line for line in text.splitlines() if line.startswith("|")]
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    assert titles[titles.index("any attack %") + 1] == "95% CI" and "n" in titles
    low, high = wilson(287, 500)
    for line in body:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[titles.index("n")] == "500"
        assert cells[titles.index("95% CI")] == f"[{100 * low:.1f}, {100 * high:.1f}]"
    assert "Wilson score interval of the `any attack` accuracy" in text
    assert (tmp_path / "out" / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_a_summary_of_fast_evaluations_says_so(tmp_path):
    from advcli.runs import summary
    from advcli.runs import sweep

    for run, preset in (("a", "fast"), ("b", "fast")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps(
            {"dataset": "mnist", "model": "cnn", "attack": "pgd", "eps": 0.3, "eps_text": "0.3", "num_test": 500,
             "evaluation": preset, "test": {"clean": {"acc": 0.9, "n": 500}, "any_attack": {"acc": 0.7, "n": 500}}}))
    text = summary.write_summary(sweep.summarize([tmp_path]), tmp_path / "out")
    assert "evaluation=fast" in text and "**fast evaluation**" in text
    assert [row["evaluation"] for row in read_csv(tmp_path / "out" / "summary.csv")] == ["fast", "fast"]
    (tmp_path / "b" / "metrics.json").write_text((tmp_path / "b" / "metrics.json").read_text().replace('"fast"', '"default"'))
    text = summary.write_summary(sweep.summarize([tmp_path]), tmp_path / "out")
    header = next(line for line in text.splitlines() if line.startswith("|"))
    assert "evaluation" in header  # mixed presets: a column, so no row passes for the other kind


@pytest.mark.slow
def test_a_job_whose_directory_a_live_process_holds_is_skipped_not_run_twice(tmp_path):
    args = ["train", "-m", "eps=0.05,0.1", *TINY, f"hydra.sweep.dir={tmp_path}"]
    held = tmp_path / "eps=0.1"  # the second job's folder, still held by the sweep's earlier launch
    holder = hold_run_directory(held)
    try:
        result = run_advcli(*args)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stderr
    assert f"job 1 skipped: The run directory {held} is in use" in result.stderr and f"process {holder.pid}" in result.stderr
    assert not any((held / name).exists() for name in ("checkpoint.pt", "metrics.json", "failed.json"))
    rows = read_csv(tmp_path / "summary.csv")
    assert [(row["job"], row["status"]) for row in rows] == [("0", "ok"), ("1", "missing")]
    again = run_advcli(*args)  # once the holder is gone the job runs; the finished one is only shown
    assert again.returncode == 0, again.stderr
    assert [row["status"] for row in read_csv(tmp_path / "summary.csv")] == ["ok", "ok"]
