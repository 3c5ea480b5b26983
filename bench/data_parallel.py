"""One process against ``torchrun --nproc_per_node=N`` on the same training job, timed in the same run.

Each variant is the real command line (`python -m advcli train ...` and `torchrun ... -m advcli train ...`)
with the same global batch, seed and data: MNIST, Madry CNN, one epoch of PGD-7 training at eps=0.1 on the
first 10,000 training images, then clean and PGD-20 accuracy on the first 1,000 test images. The training
time is the run's own `train_time_s` (metrics.json), so start-up and evaluation are left out. The variants
alternate for ``--rounds`` rounds and each keeps its fastest.

On a CPU the processes share the machine's cores: N processes get 1 thread each (torchrun's default), the
single process all of them. On a machine with N GPUs each process takes one GPU.

    python bench/data_parallel.py                       # about 5 minutes on 2 CPU cores
    python bench/data_parallel.py --nproc 4 device=cuda dataset=cifar10 model=preact_resnet18 eps=8/255
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import data_root, describe_machine

JOB = ["model=cnn", "attack=pgd", "attack.steps=7", "eps=0.1", "eps_warmup=0", "epochs=1", "batch_size=128",
       "data.train_size=10000", "evaluation=fast", "evaluation.num_examples=1000", "evaluation.sanity.enabled=false",
       "progress=false", "resume=never", "seed=0"]


def run(command: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ADVCLI_DATA": data_root()}
    done = subprocess.run([*command, f"output_dir={out}"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes for torchrun")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each variant keeps its fastest")
    args, overrides = parser.parse_known_args()
    print(describe_machine())
    cores = os.cpu_count() or 1
    job = [*JOB, *overrides]
    print("advcli train " + " ".join(job) + "\n")
    variants = {
        f"1 process, {cores} threads": ([sys.executable, "-m", "advcli", "train", *job], cores),
        f"torchrun, {args.nproc} processes x {max(1, cores // args.nproc)} thread(s)":
            ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
              "-m", "advcli", "train", *job], max(1, cores // args.nproc)),
    }
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="advcli-ddp-") as tmp:
        for round_ in range(args.rounds):
            for i, (label, (command, threads)) in enumerate(variants.items()):
                metrics = run(command, Path(tmp) / f"round{round_}-variant{i}", threads)
                if label not in best or metrics["train_time_s"] < best[label]["train_time_s"]:
                    best[label] = metrics
    base = next(iter(best.values()))["train_time_s"]
    print(f"{'variant':<40} {'train s':>8} {'img/s':>7} {'speed-up':>9} {'clean':>7} {'PGD-20':>7}")
    for label, metrics in best.items():
        seconds = metrics["train_time_s"]
        print(f"{label:<40} {seconds:>8.1f} {metrics['num_train'] / seconds:>7.0f} {base / seconds:>8.2f}x "
              f"{100 * metrics['test']['clean']['acc']:>6.1f}% {100 * metrics['test']['pgd']['acc']:>6.1f}%")


if __name__ == "__main__":
    main()
