"""CPU threads that do not fight other processes for cores (advcli.threads)."""

from __future__ import annotations

import pytest
import torch

from advcli import threads
from advcli.errors import ConfigError
from advcli.runs import sweep


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    threads._share = None
    torch.set_num_threads(before)


@pytest.mark.parametrize("value, count", [("auto", None), ("AUTO", None), (1, 1), ("3", 3)])
def test_settings_are_auto_or_a_positive_count(value, count):
    assert threads.parse_setting(value) == count


@pytest.mark.parametrize("value", [0, -2, "two", "1.5", None])
def test_a_bad_thread_setting_is_refused_in_one_paragraph(value):
    with pytest.raises(ConfigError, match=r"threads=.* is not a thread count: use threads=auto"):
        threads.parse_setting(value)


def test_a_fixed_count_is_set_and_not_adapted():
    threads.configure(3)
    assert torch.get_num_threads() == 3 and threads._share is None
    threads.keep_fair()
    assert torch.get_num_threads() == 3


class FakeClock:
    """The three readings FairShare takes: wall clock, this process's CPU time, all processes' busy CPU time."""

    def __init__(self, monkeypatch):
        self.wall = self.own = self.busy = 0.0
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(threads.time, "process_time", lambda: self.own)
        monkeypatch.setattr(threads, "busy_seconds", lambda cpus: self.busy)

    def advance(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.wall += seconds
        self.own += seconds * own_cores
        self.busy += seconds * (own_cores + other_cores)


def test_auto_gives_torch_the_cores_other_processes_leave_free(monkeypatch):
    clock = FakeClock(monkeypatch)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    # the first look, before any work: a quarter of a second in which another process kept one core busy
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: clock.advance(seconds, own_cores=0, other_cores=1))
    threads.configure("auto")
    assert torch.get_num_threads() == 3
    clock.advance(threads.RECHECK_S / 2, own_cores=2.5, other_cores=1.5)
    threads.keep_fair()
    assert torch.get_num_threads() == 3, "decided before RECHECK_S had passed"
    clock.advance(threads.RECHECK_S, own_cores=2.5, other_cores=1.5)
    threads.keep_fair()
    assert torch.get_num_threads() == 2  # 4 - 1.5 cores busy elsewhere, rounded down
    clock.advance(threads.RECHECK_S, own_cores=1, other_cores=3.9)
    threads.keep_fair()
    assert torch.get_num_threads() == 1  # never fewer than one
    clock.advance(threads.RECHECK_S, own_cores=1, other_cores=0.0)
    threads.keep_fair()
    assert torch.get_num_threads() == 4  # alone again: the whole machine back


def test_parallel_sweep_jobs_start_on_their_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    monkeypatch.setattr(threads.FairShare, "rebalance", lambda self: None)
    threads.configure("auto", parallel_jobs=2)
    assert torch.get_num_threads() == 2


def test_the_joblib_launcher_counts_as_parallel_jobs(monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    launcher = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 3}
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: OmegaConf.create({"launcher": launcher})))
    assert sweep.parallel_jobs() == 3
    launcher["_target_"] = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert sweep.parallel_jobs() == 1


def test_the_busy_time_of_this_machines_cores_is_read():
    seconds = threads.busy_seconds(set(range(threads.usable_cpus())))
    assert seconds is not None and seconds > 0


def test_prepared_cpu_models_follow_the_load_in_every_forward_pass(monkeypatch):
    from advcli import runtime

    calls = []
    monkeypatch.setattr(threads, "_share", lambda: calls.append(1))
    model, _ = runtime.prepare_model(torch.nn.Linear(3, 2), torch.device("cpu"), channels_last=False)
    model(torch.zeros(1, 3))
    model(torch.zeros(1, 3))
    assert len(calls) == 2
