"""The `advcli` console script as a user types it (subprocesses): overrides, --cfg, errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_advcli

TINY = ["dataset=synthetic", "model=mlp", "epochs=1", "lr_schedule=constant", "device=cpu", "progress=false", "data.val_size=32",
        "evaluation=fast", "evaluation.num_examples=64", "attack.steps=2", "evaluation.attacks.pgd.steps=3",
        "evaluation.sanity.stronger.attacks.square.queries=300"]  # the sanity probe's Square: seconds, not minutes


@pytest.mark.slow
def test_train_as_typed_parses_eps_and_evaluates_from_the_shell(tmp_path):
    run = tmp_path / "run"
    result = run_advcli("train", "attack=pgd", "eps=8/255", *TINY, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eps"] == pytest.approx(8 / 255) and metrics["eps_text"] == "8/255"
    assert "any attack" in result.stdout and "pgd" in result.stdout
    assert (run / "train.log").is_file()

    evaluated = run_advcli("eval", "evaluation=fast", f"ckpt={run / 'checkpoint.pt'}", "eps=0.2", "restarts=2", "device=cpu",
                           "evaluation.num_examples=64", "progress=false", f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["eps"] == pytest.approx(0.2) and again["test"]["pgd"]["restarts"] == 2
    assert again["test"]["clean"]["acc"] == metrics["test"]["clean"]["acc"]

    pictures = run_advcli("viz", f"ckpt={run / 'checkpoint.pt'}", "device=cpu", "num_images=4", "loss_examples=32",
                          "pgd_steps=3", f"hydra.run.dir={tmp_path / 'viz'}")
    assert pictures.returncode == 0, pictures.stderr
    for name in ("gallery", "saliency", "loss_distribution", "large_eps"):
        assert (tmp_path / "viz" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    missing = run_advcli("viz", f"ckpt={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path / 'viz2'}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    for command in ("viz", "eval"):  # ckpt is `???` in their configs: a paragraph, not OmegaConf's traceback
        unset = run_advcli(command, f"hydra.run.dir={tmp_path / command / 'unset'}")
        assert unset.returncode == 2 and "ckpt is required" in unset.stderr and "Traceback" not in unset.stderr


@pytest.mark.parametrize("eps,fragment", [("8/0", "divides by zero"), ("-1", "negative"), ("abc", "not a number"),
                                          ("2", "larger than 1")])
def test_bad_eps_is_one_paragraph_and_a_non_zero_exit(tmp_path, eps, fragment):
    result = run_advcli("train", f"eps={eps}", *TINY, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("advcli: error:")]
    assert len(error_lines) == 1 and "eps=8/255" in error_lines[0]
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("group,shipped", [("dataset", ["mnist", "cifar10", "synthetic"]),
                                           ("model", ["cnn", "preact_resnet18", "wrn28_10"])])
def test_an_unknown_group_choice_is_one_paragraph_naming_the_choices_and_leaves_no_run_directory(tmp_path, group,
                                                                                               shipped):
    result = run_advcli("train", f"{group}=nope", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [paragraph] = result.stderr.strip().splitlines()  # one paragraph: no traceback, no search path
    assert paragraph.startswith(f"advcli: error: {group}=nope: no {group} is called nope")
    choices = sorted(path.stem for path in (REPO / "configs" / group).glob("*.yaml"))
    assert f"The {group} choices are: {', '.join(choices)}." in paragraph and set(shipped) <= set(choices)
    assert "search path" not in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no outputs/ at all


@pytest.mark.parametrize("bad", ["epochs=-1", "eps=abc"])
def test_a_refused_command_leaves_no_run_directory_but_never_removes_one_with_work_in_it(tmp_path, bad):
    result = run_advcli("train", bad, "device=cpu", cwd=tmp_path)  # Hydra's own outputs/DATE/TIME
    assert result.returncode == 2 and bad in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists(), sorted(map(str, tmp_path.rglob("*")))
    mine = tmp_path / "mine"  # a run directory that already holds a user's file: refused, kept as it was
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    kept = run_advcli("train", bad, "device=cpu", f"hydra.run.dir={mine}", cwd=tmp_path)
    assert kept.returncode == 2 and (mine / "notes.txt").read_text() == "mine"
    assert (mine / ".hydra" / "config.yaml").is_file()  # nothing in it is removed


def test_hydra_flags_pass_through():
    shown = run_advcli("train", "--cfg", "job", "attack=fgsm", "eps=0.1", "restarts=3")
    assert shown.returncode == 0, shown.stderr
    assert "advcli.attacks.fgsm" in shown.stdout and "restarts: 3" in shown.stdout
    helped = run_advcli("train", "--help")  # Hydra's help: the config groups with every shipped choice, sorted
    assert helped.returncode == 0, helped.stderr
    groups = helped.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0].splitlines()
    for group in ("attack", "dataset", "model", "trainer"):
        shipped = sorted(path.stem for path in (REPO / "configs" / group).glob("*.yaml"))
        assert f"{group}: {', '.join(shipped)}" in groups, helped.stdout


def test_usage_and_unknown_command():
    assert "train" in run_advcli("--help").stdout
    wrong = run_advcli("fly")
    assert wrong.returncode == 2 and "unknown command" in wrong.stderr


def test_missing_dataset_offline_names_the_folder_and_the_setting(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    result = run_advcli("train", "dataset=fashion_mnist", f"data.root={empty}", "data.download=false", "device=cpu",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(empty) in result.stderr and "ADVCLI_DATA" in result.stderr


def test_eval_of_a_missing_checkpoint(tmp_path):
    result = run_advcli("eval", "evaluation=fast", f"ckpt={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_python_dash_m_runs_the_same_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "advcli", "train", "attack=none",
                             *[o for o in TINY if not o.startswith("attack.")], f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["attack"] == "none"
