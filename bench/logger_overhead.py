"""What each experiment tracker costs: the same short real run with logger=none, csv, tensorboard, mlflow, all
three, and mlflow with per-batch values (log_batches=true), each `advcli train` in a fresh process as a user runs
it, so a tracker's import and start-up count too.

Two figures per logger, each the median over ``--repeats`` runs (the loggers take turns, so a slow spell of the
machine hits them alike):

- ``train s``: metrics.json's ``train_time_s``, the epochs' training steps: what "logging never slows the training
  step" is about (per-epoch values are logged after the epoch's clock stops; per-batch ones at the progress
  bar's host syncs, inside it);
- ``run s``: the whole command, start to exit: imports, opening the tracker's run, per-epoch logging, uploading
  the run's files.

    python bench/logger_overhead.py                    # MNIST, experiment=fast on 20,000 images, 2 epochs
    python bench/logger_overhead.py --repeats 5 epochs=3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, data_root, describe_machine

RUN = ["experiment=fast", "data.train_size=20000", "epochs=2", "evaluation=fast", "evaluation.num_examples=200",
       "evaluation.sanity.enabled=false", "progress=false"]
LOGGERS = {"none": ["logger=none"], "csv": ["logger=csv"], "tensorboard": ["logger=tensorboard"],
           "mlflow": ["logger=mlflow"], "all three": ["logger=[csv,tensorboard,mlflow]"],
           "mlflow, log_batches": ["logger=mlflow", "log_batches=true"]}


def run_once(folder: Path, name: str, extra: list[str]) -> tuple[float, float]:
    """(training seconds, whole-command seconds) of one `advcli train` in a fresh process."""
    out = folder / f"{name.replace(' ', '_').replace(',', '')}-{time.monotonic_ns()}"
    command = ["advcli", "train", *RUN, *LOGGERS[name], f"data.root={data_root()}", f"hydra.run.dir={out}",
               f"logger.mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}", *extra]
    if not any("mlflow" in arg for arg in LOGGERS[name]):  # no mlflow node to set
        command = [arg for arg in command if not arg.startswith("logger.mlflow")]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    return json.loads((out / "metrics.json").read_text())["train_time_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. epochs=3")
    options = parser.parse_args()
    print(describe_machine())
    print("advcli train " + " ".join(RUN + options.overrides) + " logger=...")
    folder = Path(tempfile.mkdtemp(prefix="advcli-logger-overhead-"))
    run_once(folder, "mlflow", options.overrides)  # creates the MLflow store once, outside the timings
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in LOGGERS}
    for _ in range(options.repeats):
        for name in LOGGERS:
            times[name].append(run_once(folder, name, options.overrides))
    base_train = statistics.median(t for t, _ in times["none"])
    base_wall = statistics.median(w for _, w in times["none"])
    print(f"\nmedian of {options.repeats} runs each\n{'logger':<20} {'train s':>8} {'vs none':>8} {'run s':>7} "
          f"{'vs none':>8}")
    for name, found in times.items():
        train_s, wall_s = statistics.median(t for t, _ in found), statistics.median(w for _, w in found)
        print(f"{name:<20} {train_s:8.1f} {train_s / base_train:8.3f} {wall_s:7.1f} {wall_s - base_wall:+7.1f}s")
    print(f"(runs in {folder})")


if __name__ == "__main__":
    main()
