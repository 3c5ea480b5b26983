"""Does the per-epoch held-out check rank epochs as the strong evaluation does?

The held-out check picks best.pt and drives the catastrophic-overfitting guard, so it must not be fooled by a
masked gradient. This trains one run that keeps every epoch's checkpoint (`keep_epochs=true`; by default FGSM
training from a random start on MNIST at eps = 0.3, which tends to mask its gradients), then scores each epoch's
model on the first N test images three ways:

    pgd10 ...    cheap candidates for the held-out attack (PGD-10 was advcli's until the default evaluation)
    validation   the held-out attack advcli uses now (configs/train.yaml, validation.attack)
    default      the default evaluation (APGD-CE, APGD-T, Square as a cascade), the reference

and prints each epoch's accuracies, the epoch each score would pick for best.pt, and Kendall's tau between
each cheap score and the reference over the epochs.

    python bench/validation_ranking.py                        # about 15 minutes on 2 CPU cores
    python bench/validation_ranking.py --train experiment=fast_at epochs=10 keep_epochs=true   # the Madry CNN
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from common import REPO, data_root, describe_machine, mnist

from advcli import config, data  # noqa: E402
from advcli import models
from advcli.runs import checkpoint
from advcli.attacks import pgd  # noqa: E402
from advcli.attacks.reference import apgd  # noqa: E402
from advcli.evaluation.cascade import attack_outcomes  # noqa: E402

TRAIN = ["experiment=fast_at", "model=small_cnn", "lr_peak=0.4", "eps_warmup=2", "epochs=5", "eps=0.3", "seed=0",
         "keep_epochs=true", "progress=false", "evaluation=fast", "evaluation.num_examples=100",
         "evaluation.sanity.enabled=false"]


def advcli(*args: str) -> None:
    print("  advcli " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "advcli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"advcli {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def validation_attack():
    """The held-out attack as advcli train builds it."""
    with initialize_config_module(config_module="advcli.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["eps=0.3"])
    return config.choice_name(cfg.validation.attack), config.instantiate("validation.attack", cfg.validation.attack)


# cheap held-out attacks to compare (the configured one is added as "validation")
CANDIDATES = {
    "pgd10": lambda m, x, y, eps: pgd(m, x, y, eps, steps=10),
    "pgd_margin10": lambda m, x, y, eps: pgd(m, x, y, eps, steps=10, loss="margin"),
    "apgd_ce10": lambda m, x, y, eps: apgd(m, x, y, eps, steps=10),
    "apgd_ce20": lambda m, x, y, eps: apgd(m, x, y, eps, steps=20),
    "apgd_dlr20": lambda m, x, y, eps: apgd(m, x, y, eps, steps=20, loss="dlr"),
}


def cheap_scores(ckpt: Path, n: int, attack) -> dict[str, float]:
    """Each cheap attack's accuracy on the first n test images, and its seconds."""
    model = models.rebuild_model(checkpoint.load(ckpt), ckpt).eval()
    batches = list(data.batches(mnist("test", n), 500))
    scores = {}
    for name, candidate in {**CANDIDATES, "validation": attack}.items():
        torch.manual_seed(0)
        started = time.perf_counter()
        scores[name] = attack_outcomes(model, batches, {name: candidate}, eps=0.3).summary()[name]["acc"]
        scores[f"{name}_s"] = time.perf_counter() - started
    return scores


def default_score(ckpt: Path, n: int, out: Path) -> float:
    where = out / f"{ckpt.stem}-default-{n}"
    if not (where / "metrics.json").is_file():
        advcli("eval", f"ckpt={ckpt}", "evaluation=default", f"evaluation.num_examples={n}", "progress=false",
               "evaluation.sanity.enabled=false", f"data.root={data_root()}", f"output_dir={where}")
    return json.loads((where / "metrics.json").read_text())["test"]["any_attack"]["acc"]


def kendall_tau(a: list[float], b: list[float]) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    score = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) - sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs)
    return score / max(len(pairs), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="test examples (the first N)")
    parser.add_argument("--train", nargs="*", default=[], help="more overrides for the training run")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "validation_ranking")
    args = parser.parse_args()
    print(describe_machine())
    run = args.out / "run"
    if not (run / "metrics.json").is_file():
        advcli("train", *TRAIN, *args.train, f"data.root={data_root()}", f"output_dir={run}")
    name, attack = validation_attack()
    rows = []
    for epoch in itertools.count(1):
        ckpt = run / f"epoch_{epoch}.pt"
        if not ckpt.is_file():
            break
        rows.append({"epoch": epoch, **cheap_scores(ckpt, args.n, attack), "default": default_score(ckpt, args.n, args.out)})
    print(f"\nfirst {args.n} MNIST test images, eps = 0.3; validation = {name}\n")
    keys = [*CANDIDATES, "validation"]
    print("| epoch | " + " | ".join(keys) + " | default evaluation |")
    print("|---" * (len(keys) + 2) + "|")
    for row in rows:
        print(f"| {row['epoch']} | " + " | ".join(f"{100 * row[k]:.1f}%" for k in keys) + f" | {100 * row['default']:.1f}% |")
    reference = [row["default"] for row in rows]
    print("\n| held-out attack | picks epoch | default evaluation there | Kendall tau with the default | seconds per score |")
    print("|---|---|---|---|---|")
    for key in keys:
        scores = [row[key] for row in rows]
        best = max(range(len(rows)), key=lambda i: (scores[i], i))
        print(f"| {key} | {rows[best]['epoch']} | {100 * reference[best]:.1f}% (best {100 * max(reference):.1f}%) | "
              f"{kendall_tau(scores, reference):+.2f} | {sum(row[key + '_s'] for row in rows) / len(rows):.1f} |")


if __name__ == "__main__":
    main()
