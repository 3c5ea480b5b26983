"""advcli on a shared machine: how much slower a run gets when another process uses the CPU.

Runs a small `advcli train` (MNIST, small_cnn, 20,000 images, 1 epoch, fast evaluation of 200 images) as a
user types it, alone and beside a busy process that this script starts and stops itself, with the thread
policy of today (threads=auto) and with torch's own default (one thread per core: threads=<cores>), and a
two-job sweep run side by side (hydra/launcher=joblib) against the same two jobs one after the other.

    python bench/contention.py            # about 3 minutes on 2 CPU cores; run it alone on the machine

Figures are the training seconds that advcli logs (the epoch line) and the whole command's wall time;
ratios are against the idle run of the same policy measured in this run. Targets (issue 30): beside one
busy torch process at most 2.5x the idle time; the joblib sweep at most 1.1x the sequential one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import data_root, describe_machine

from advcli.threads import usable_cpus  # noqa: E402

RUN = ["model=small_cnn", "data.train_size=20000", "epochs=1", "evaluation=fast", "evaluation.num_examples=200",
       "evaluation.sanity.enabled=false", "progress=false"]
BUSY = {  # another process that keeps the CPU busy
    "torch matmul loop, 1 thread": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
                                   "while True: a @ a",
    "torch matmul loop, default threads": "import torch\na = torch.randn(512, 512)\nwhile True: a @ a",
    "pure-Python busy loop": "while True: pass",
}


def advcli(args: list[str], threads: str, out: Path) -> tuple[float, float]:
    """(training seconds from the epoch line, wall seconds) of one `advcli train ARGS`."""
    env = {**os.environ, "ADVCLI_DATA": data_root(), "ADVCLI_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)
    started = time.perf_counter()
    done = subprocess.run(["advcli", "train", *args, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"advcli failed:\n{done.stderr[-3000:]}")
    seconds = [float(s) for s in re.findall(r"epoch \d+/\d+ .*?\s([\d.]+)s\s*$", done.stderr + done.stdout, re.M)]
    return sum(seconds), wall


class Busy:
    """A busy process for the duration of a `with` block."""

    def __init__(self, code: str):
        self.code = code

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", self.code])
        time.sleep(2.0)  # let it start (torch import) before measuring beside it
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def single_runs(tmp: Path) -> None:
    cores = usable_cpus()
    print(f"\nadvcli train {' '.join(RUN)}\n")
    print("| policy | beside | training s | x idle | command s | x idle |\n|---|---|---|---|---|---|")
    for policy in ("auto", str(cores)):
        idle_train, idle_wall = advcli(RUN, policy, tmp / f"idle-{policy}")
        print(f"| threads={policy} | nothing (idle) | {idle_train:.1f} | 1.00 | {idle_wall:.1f} | 1.00 |", flush=True)
        for name, code in BUSY.items():
            with Busy(code):
                train_s, wall = advcli(RUN, policy, tmp / f"busy-{policy}-{len(name)}")
            print(f"| threads={policy} | {name} | {train_s:.1f} | {train_s / idle_train:.2f} | {wall:.1f} | "
                  f"{wall / idle_wall:.2f} |", flush=True)


def sweeps(tmp: Path) -> None:
    print("\nA two-job sweep (seed=0,1), side by side (hydra/launcher=joblib) and one after the other:\n")
    print("| launcher | threads | command s | x sequential |\n|---|---|---|---|")
    sweep = ["-m", *RUN, "seed=0,1"]
    for policy in ("auto", str(usable_cpus())):
        _, sequential = advcli(sweep, policy, tmp / f"seq-{policy}")
        _, parallel = advcli([*sweep, "hydra/launcher=joblib"], policy, tmp / f"par-{policy}")
        print(f"| basic (sequential) | {policy} | {sequential:.1f} | 1.00 |")
        print(f"| joblib (2 side by side) | {policy} | {parallel:.1f} | {parallel / sequential:.2f} |", flush=True)


def main() -> None:
    print(describe_machine())
    print(f"usable cores: {usable_cpus()}; run this bench alone on the machine")
    with tempfile.TemporaryDirectory(prefix="advcli-contention-") as tmp:
        single_runs(Path(tmp))
        sweeps(Path(tmp))


if __name__ == "__main__":
    main()
