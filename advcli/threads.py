"""How many threads torch's CPU arithmetic uses: the cores other processes leave free, not every core.

torch starts one OpenMP thread per core, and every parallel region waits for all of them. When another
process holds a core (a parallel sweep's other job, a browser, a shared CI runner), the thread that lost
its core is descheduled and the others spin waiting for it at every region: measured 4 to 45 times slower
on 2 cores (bench/contention.py). ``threads: auto`` therefore gives torch as many threads as there are cores
that other processes leave free, re-decided every few seconds from the kernel's CPU counters (so a run
takes the whole machine back when it is alone again); ``threads: N`` fixes the count.

Changing the count can change the last bits of floating-point sums; set ``threads=N`` for bit-exact reruns.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from advcli.errors import ConfigError

RECHECK_S = 1.0  # seconds between decisions: long enough to measure, short enough to follow a new neighbour
FIRST_LOOK_S = 0.25  # the first decision's window, before any work: a short run may never reach a recheck


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent so far on ``cpus`` by all processes (None where /proc/stat cannot be read)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


def parse_setting(value) -> int | None:
    """``auto`` -> None (adapt); a positive integer -> that many threads; anything else refused."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(count) != str(value).strip():
        raise ConfigError(f"threads={value} is not a thread count: use threads=auto (the cores other processes "
                          "leave free, re-decided as the load changes) or a positive integer such as threads=1.")
    return count


class FairShare:
    """Keeps torch's thread count at the cores other processes leave free (see the module's docstring)."""

    def __init__(self, parallel_jobs: int = 1):
        self.cores = usable_cpus()
        self.cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(self.cores))
        self.threads = max(1, self.cores // max(1, parallel_jobs))  # a parallel sweep's jobs start on their share
        torch.set_num_threads(self.threads)
        self._sample = self._measure()
        time.sleep(FIRST_LOOK_S)  # idle meanwhile, so all busy time counted is other processes'
        self.rebalance()

    def _measure(self) -> tuple[float, float, float | None]:
        return time.monotonic(), time.process_time(), busy_seconds(self.cpus)

    def others_busy(self, then: tuple, now: tuple) -> float | None:
        """Cores other processes kept busy between two samples (all busy time less this process's own)."""
        if then[2] is None or now[2] is None or now[0] - then[0] <= 0:
            return None
        return max(0.0, ((now[2] - then[2]) - (now[1] - then[1])) / (now[0] - then[0]))

    def __call__(self) -> None:
        """Re-decide, at most every RECHECK_S seconds; otherwise costs one clock read."""
        if time.monotonic() - self._sample[0] >= RECHECK_S:
            self.rebalance()

    def rebalance(self) -> None:
        """Set the thread count to the cores other processes left free since the last sample."""
        now = self._measure()
        others = self.others_busy(self._sample, now)
        self._sample = now
        if others is None:
            return
        wanted = max(1, min(self.cores, math.floor(self.cores - others + 0.25)))
        if wanted != self.threads:
            self.threads = wanted
            torch.set_num_threads(wanted)


_share: FairShare | None = None


def configure(setting="auto", *, parallel_jobs: int = 1) -> None:
    """Set the thread policy for this process: ``auto`` (adapt to the load) or a fixed count."""
    global _share
    count = parse_setting(setting)
    if count is None:
        _share = FairShare(parallel_jobs)
    else:
        _share = None
        torch.set_num_threads(count)


@torch.compiler.disable
def keep_fair(*_args) -> None:
    """Called before every forward pass of a prepared model (a forward pre-hook): adapts the thread count
    under ``threads: auto``, so that long attacks (Square's thousands of queries) follow the load too."""
    if _share is not None:
        _share()
