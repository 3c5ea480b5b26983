"""A non-editable install (the wheel) carries every wing and the configs, so an installed advcli composes them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_composes_them(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("advcli-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import advcli, hydra; from hydra import compose, initialize_config_module\n"
             # every wing travels in the wheel, not only the top-level package
             "import advcli.attacks, advcli.data, advcli.models, advcli.runs, advcli.evaluation.evaluate, "
             "advcli.training.train, advcli.cli\n"
             "with initialize_config_module(config_module='advcli.configs', version_base='1.3'):\n"
             "    cfg = compose('train', ['attack=fgsm', 'experiment=fast_at'])\n"
             "print(advcli.__file__); print(cfg.attack._target_, cfg.model.name, sorted(cfg.evaluation.attacks))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    installed_at, composed = result.stdout.splitlines()[:2]
    assert installed_at.startswith(str(site)), "the test imported the checkout, not the installed wheel"
    assert composed.startswith("advcli.attacks.fgsm cnn") and "pgd_margin" in composed
