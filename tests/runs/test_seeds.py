"""Seeds as statistics (advcli.runs.seeds, advcli.runs.summary): jobs that differ only in ``seed`` summarised as the mean,
the sample standard deviation and n, in summary.csv, summary.md and summary.png; ``--per-job`` keeps every job."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from advcli.runs import seeds, summary, sweep
from conftest import run_advcli

ACCURACY = {  # (eps, seed) -> (clean, pgd, any_attack) correct out of 200
    ("0.1", 0): (180, 120, 110), ("0.1", 1): (176, 131, 119), ("0.1", 2): (182, 125, 116),
    ("0.2", 0): (170, 80, 71), ("0.2", 1): (168, 90, 77),
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_job(folder: Path, eps: str, seed: int, correct: tuple[int, int, int] | None, *extra: str) -> None:
    """A finished job (its metrics.json) or, with ``correct`` None, a failed one, as a sweep leaves them."""
    job = folder / f"eps={eps},seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in (f"eps={eps}", f"seed={seed}", *extra)))
    (job / ".hydra" / "config.yaml").write_text(f"seed: {seed}\neps: {eps}\ndataset: {{name: mnist}}\n"
                                                "model: {name: cnn}\nattack: {name: pgd}\n")
    if correct is None:
        (job / "failed.json").write_text(json.dumps({"error": "diverged", "type": "TrainingDiverged"}))
        return
    test = {name: {"acc": k / 200, "n": 200} for name, k in zip(("clean", "pgd", "any_attack"), correct)}
    (job / "metrics.json").write_text(json.dumps(
        {"dataset": "mnist", "model": "cnn", "attack": "pgd", "eps": float(eps), "eps_text": eps, "seed": seed,
         "num_test": 200, "test": test, "train_time_s": 10.0 + seed, "eval_time_s": 2.0}))


@pytest.fixture
def seed_sweep(tmp_path) -> Path:
    """eps 0.1 with seeds 0, 1, 2 (and a seed 3 that failed), eps 0.2 with seeds 0, 1; the device differs, which
    changes no result."""
    for (eps, seed), correct in ACCURACY.items():
        write_job(tmp_path, eps, seed, correct, f"device={'cpu' if seed else 'cuda'}")
    write_job(tmp_path, "0.1", 3, None)
    return tmp_path


def test_jobs_that_differ_only_in_seed_become_one_row_with_mean_std_and_n(seed_sweep, tmp_path):
    text = summary.write_summary(sweep.summarize([seed_sweep]), tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert [(row["eps"], row["seeds"], row["n_seeds"], row["status"]) for row in rows] == \
        [("0.1", "0 1 2", "3", "3 of 4 ok"), ("0.2", "0 1", "2", "ok")]
    for row in rows:
        for index, name in enumerate(("clean", "pgd", "any_attack")):
            values = [k[index] / 200 for (eps, _), k in ACCURACY.items() if eps == row["eps"]]
            assert float(row[f"{name}_acc_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-15)
            assert float(row[f"{name}_acc_std"]) == pytest.approx(statistics.stdev(values), abs=1e-15)  # n - 1
        assert row["n"] == "200" and "seed" not in row and "device" not in row
    assert float(rows[1]["train_time_s_mean"]) == 10.5

    # the table: "mean ± std (n=k)" in percent points, the seeds, the failed job still listed
    pgd = [120 / 2, 131 / 2, 125 / 2]  # in %
    cell = f"{statistics.fmean(pgd):.1f} ± {statistics.stdev(pgd):.1f} (n=3)"
    assert cell == "62.7 ± 2.8 (n=3)" and cell in text
    assert "5 jobs, 5 ok, 1 failed" not in text and "6 jobs, 5 ok, 1 failed" in text
    assert "differ only in `seed`" in text and "sample standard deviation" in text and "diverged" in text


def test_the_plot_shows_the_mean_with_one_standard_deviation_as_error_bars(seed_sweep, tmp_path):
    groups = seeds.group(sweep.summarize([seed_sweep]))
    y, (below, above) = summary._points(groups, "any_attack")
    for eps, point, bar in zip(("0.1", "0.2"), y, below):
        values = [100 * k[2] / 200 for (e, _), k in ACCURACY.items() if e == eps]
        assert point == pytest.approx(statistics.fmean(values)) and bar == pytest.approx(statistics.stdev(values))
    assert below == above
    assert summary.plot(groups, tmp_path / "summary.png") and (tmp_path / "summary.png").stat().st_size > 1000


def test_per_job_keeps_every_job_and_one_seed_per_setting_is_not_grouped(seed_sweep, tmp_path):
    summary.write_summary(sweep.summarize([seed_sweep]), tmp_path / "jobs", per_job=True)
    assert len(read_csv(tmp_path / "jobs" / "summary.csv")) == 6

    rows = [row for row in sweep.summarize([seed_sweep]) if row["overrides"]["seed"] == "0"]
    assert seeds.group(rows) is None  # every setting once: nothing to average, the summary stays per job
    unknown = [dict(row, seed=None) for row in sweep.summarize([seed_sweep])]
    assert seeds.group(unknown) is None  # a job without a known seed (advcli eval) is never grouped


def test_a_group_with_one_finished_seed_has_no_spread():
    row = seeds.aggregate([{"job": 0, "status": "ok", "seed": 4, "overrides": {"seed": "4"}, "clean_acc": 0.871,
                            "dir": "a"}])
    assert row["clean_acc_std"] is None and seeds.mean_text(row, "clean_acc") == "87.1 (n=1)"


@pytest.mark.slow
def test_a_two_seed_two_eps_sweep_summarizes_each_eps_from_its_jobs_metrics(tmp_path):
    result = run_advcli("train", "-m", "seed=0,1", "eps=0.05,0.1", "dataset=synthetic", "model=mlp",
                        "model.hidden=[16]", "epochs=1", "lr_schedule=constant", "device=cpu", "progress=false",
                        "eps_warmup=0", "data.val_size=32", "evaluation=fast", "evaluation.num_examples=64",
                        "evaluation.attacks.pgd.steps=2", "evaluation.attacks.pgd_margin.steps=2",
                        "validation.attack.steps=2", "evaluation.sanity.enabled=false", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "summary.csv")
    assert [(row["eps"], row["seeds"], row["n_seeds"]) for row in rows] == [("0.05", "0 1", "2"), ("0.1", "0 1", "2")]
    for row in rows:
        jobs = [json.loads((Path(d) / "metrics.json").read_text()) for d in row["dir"].split(";")]
        assert sorted(job["seed"] for job in jobs) == [0, 1] and {job["eps_text"] for job in jobs} == {row["eps"]}
        for name in ("clean", "pgd", "any_attack"):
            values = [job["test"][name]["acc"] for job in jobs]
            assert float(row[f"{name}_acc_mean"]) == statistics.fmean(values)
            assert float(row[f"{name}_acc_std"]) == statistics.stdev(values)
    assert "(n=2)" in (tmp_path / "summary.md").read_text() and "(n=2)" in result.stdout

    every = run_advcli("summarize", "--per-job", "--out", str(tmp_path / "jobs"), str(tmp_path))
    assert every.returncode == 0, every.stderr
    assert len(read_csv(tmp_path / "jobs" / "summary.csv")) == 4


def test_runs_without_a_sweeps_config_group_only_by_the_settings_their_metrics_record(tmp_path):
    """Runs written with output_dir= (no .hydra folder) group by the settings_id in their metrics.json: runs that
    differ in anything but the seed, or ran in another precision, stay apart."""
    def run(name, seed, settings, precision, correct):
        folder = tmp_path / name
        folder.mkdir()
        test = {"clean": {"acc": correct / 100, "n": 100}}
        (folder / "metrics.json").write_text(json.dumps({
            "dataset": "mnist", "model": "cnn", "attack": "pgd", "eps": 0.3, "eps_text": "0.3", "seed": seed,
            "num_test": 100, "test": test, "settings_id": settings, "precision": precision}))
        return folder

    folders = [run("a", 0, "same", "fp32", 90), run("b", 1, "same", "fp32", 80), run("c", 2, "other", "fp32", 10),
               run("d", 3, "same", "bf16", 50)]
    rows = seeds.group(sweep.summarize(folders))
    assert [(row["seeds"], row["clean_acc_mean"]) for row in rows] == [("0 1", pytest.approx(0.85)), ("2", 0.1),
                                                                      ("3", 0.5)]


def test_a_runs_settings_id_is_the_same_in_its_metrics_and_in_its_sweeps_summary(tmp_path):
    """advcli train records settings_id(cfg) from the config it runs with; the summary reads the job's
    .hydra/config.yaml, which Hydra saves unresolved (``optimizer.lr: ${lr}``, ``eps: 8/255``): one id either way."""
    from omegaconf import OmegaConf

    from conftest import compose_config

    ids = {}
    for name, lr in (("a", "0.01"), ("b", "0.02")):
        cfg = compose_config("train", ["dataset=synthetic", "model=mlp", "optimizer=sgd", "eps=8/255", f"lr={lr}",
                                       f"seed={len(ids)}", f"device={'cpu' if ids else 'cuda'}"])
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")  # as Hydra saves a job's config
        saved = (job / ".hydra" / "config.yaml").read_text()
        assert "lr: ${lr}" in saved and "${oc.env:" in saved  # interpolations the two paths would read differently
        (job / ".hydra" / "overrides.yaml").write_text(f"- lr={lr}\n")
        (job / "metrics.json").write_text(json.dumps({"seed": len(ids), "settings_id": seeds.settings_id(cfg),
                                                      "test": {"clean": {"acc": 0.5, "n": 10}}}))
        ids[name] = seeds.settings_id(cfg)
        assert sweep.read_run(job)["settings_id"] == ids[name]
    assert ids["a"] != ids["b"]  # the resolved learning rate is part of the settings; the seed and device are not
    same_but_seed = compose_config("train", ["dataset=synthetic", "model=mlp", "optimizer=sgd", "eps=8/255",
                                             "lr=0.01", "seed=5", "threads=3"])
    assert seeds.settings_id(same_but_seed) == ids["a"]
