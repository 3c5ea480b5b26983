"""Time to a robust model: each training recipe, as a user runs it, from nothing to a number to trust.

For each preset (`advcli train` with its defaults, or `advcli train experiment=NAME`) and each seed, on MNIST at
eps = 0.3 (L-inf), it prints:

    train s    the run's training time (its metrics.json `train_time_s`: epochs and their held-out checks)
    all-in s   the whole `advcli train` process, start to exit: data, training, its final evaluation, pictures
    clean      clean accuracy on the first N test images (default 1,000)
    default    robust accuracy under advcli's default evaluation (`advcli eval`, first N)
    AutoAttack robust accuracy under APGD-CE + APGD-T of the reference code (pyautoattack, standard settings:
               100 steps, 9 target classes; `evaluation=autoattack evaluation.attacks.autoattack.attacks=...`)

then the mean and the sample standard deviation over seeds of each column, and the published MNIST defences at
eps = 0.3 under AutoAttack for comparison. Runs are kept under --out: a second call only fills in what is missing.

    python bench/time_to_robust.py                                  # every preset, seeds 0 1 2 (about an hour)
    python bench/time_to_robust.py --presets fast --seeds 0         # one run
    python bench/time_to_robust.py --presets default --extra model.width=2   # a variant (own folder)
    python bench/time_to_robust.py --presets fast --no-default       # training time and AutoAttack only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, data_root, describe_machine

PRESETS = {
    "default": [],                          # `advcli train`: the README's main command
    "fast": ["experiment=fast"],
    "strong": ["experiment=strong"],
    "fast_at": ["experiment=fast_at"],      # Wong et al. 2020's recipe as advcli shipped it before
}
AUTOATTACK = ["evaluation=autoattack", "evaluation.attacks.autoattack.attacks=[apgd-ce,apgd-t]",
              "evaluation.sanity.enabled=false"]
PUBLISHED = [("Wong et al. 2020 (FGSM, fast AT)", 82.93), ("Madry et al. 2018 (PGD-40)", 88.50),
             ("Zhang et al. 2019 (TRADES)", 92.81), ("Gowal et al. 2019", 92.83)]


def advcli(*args: str) -> float:
    """Run `advcli ARGS` to its end; its wall time in seconds."""
    print("  advcli " + " ".join(args), flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "advcli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"advcli {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def trained(run: Path, overrides: list[str]) -> dict:
    if not (run / "metrics.json").is_file():
        wall = advcli("train", *overrides, "progress=false", f"data.root={data_root()}", f"output_dir={run}")
        (run / "all_in_s.txt").write_text(f"{wall:.1f}\n")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["all_in_s"] = float((run / "all_in_s.txt").read_text())
    return metrics


def evaluated(run: Path, name: str, n: int, overrides: list[str]) -> dict:
    where = run / f"eval-{name}-{n}"
    if not (where / "metrics.json").is_file():
        advcli("eval", f"ckpt={run / 'checkpoint.pt'}", f"evaluation.num_examples={n}", "progress=false",
               f"data.root={data_root()}", f"output_dir={where}", *overrides)
    return json.loads((where / "metrics.json").read_text())


def measure(run: Path, overrides: list[str], n: int, with_default: bool = True) -> dict[str, float]:
    training = trained(run, overrides)
    theirs = evaluated(run, "autoattack", n, AUTOATTACK)
    found = {"train s": training["train_time_s"], "all-in s": training["all_in_s"],
             "clean": 100 * theirs["test"]["clean"]["acc"], "default": float("nan"),
             "AutoAttack": 100 * theirs["test"]["any_attack"]["acc"]}
    if with_default:
        same = training["evaluation"] == "default" and training["num_test"] == n  # the run's own final evaluation
        ours = training if same else evaluated(run, "default", n, ["evaluation=default",
                                                                   "evaluation.sanity.enabled=false"])
        found["default"] = 100 * ours["test"]["any_attack"]["acc"]
    return found


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["default", "fast", "strong"], choices=list(PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=1000, help="test examples for the robust columns (the first N)")
    parser.add_argument("--no-default", action="store_true",
                        help="skip the default-evaluation column (N images through advcli's default evaluation: "
                             "minutes per run on a CPU); the run's own final evaluation still runs")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every preset (a variant)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "time_to_robust")
    args = parser.parse_args()
    print(describe_machine())
    variant = "-".join(o.replace("=", "_").replace("/", "_") for o in args.extra)
    columns = ["train s", "all-in s", "clean", *([] if args.no_default else ["default"]), "AutoAttack"]
    rows = []
    for preset in args.presets:
        per_seed = []
        for seed in args.seeds:
            run = args.out / "-".join(filter(None, [preset, variant, f"seed{seed}"]))
            per_seed.append(measure(run, [*PRESETS[preset], *args.extra, f"seed={seed}"], args.n,
                                    with_default=not args.no_default))
            print(f"    {preset} seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in per_seed[-1].items()), flush=True)
        rows.append((preset, per_seed))
    print(f"\nMNIST, eps = 0.3 (L-inf); clean and robust accuracy (%) on the first {args.n} test images; mean ± "
          f"standard deviation over seeds {', '.join(map(str, args.seeds))} (min of AutoAttack shown: no seed may "
          f"collapse){'; overrides ' + ' '.join(args.extra) if args.extra else ''}\n")
    print("| preset | command | " + " | ".join(columns) + " | AutoAttack, worst seed |")
    print("|---|---|" + "---|" * (len(columns) + 1))
    for preset, per_seed in rows:
        command = " ".join(["advcli train", *PRESETS[preset], *args.extra])
        cells = [spread([found[c] for found in per_seed]) for c in columns]
        print(f"| {preset} | `{command}` | " + " | ".join(cells) + f" | {min(f['AutoAttack'] for f in per_seed):.1f} |")
    print("\npublished MNIST defences at eps = 0.3 under AutoAttack (AutoAttack's MNIST table): "
          + "; ".join(f"{name} {acc:.2f}%" for name, acc in PUBLISHED))


if __name__ == "__main__":
    main()
