"""How strong and how cheap is advcli's default evaluation? Beside standard AutoAttack, on the same examples.

For each of several MNIST models (eps = 0.3, L-inf, `small_cnn`), trained here by advcli unless already there:

    standard   attack=none                                   no robustness: every evaluation should find ~0%
    fgsm_rs    experiment=fast_at (FGSM from a random start)  gradients that mislead: PGD overstates it
    pgd        attack=pgd (PGD-10)                           Madry et al.'s recipe
    trades     trainer=trades                                Zhang et al.'s objective

it evaluates the first N test images (default 500) three times with `advcli eval`: the `default` evaluation,
the `fast` one (does its sanity report warn?) and `evaluation=autoattack` (the reference code, standard
version), and prints robust accuracy with its Wilson 95% interval, the gap to AutoAttack in points, the
seconds the attacks took (sanity probes apart) and the time ratio, then where the default's time went.

    python bench/eval_vs_autoattack.py                   # about 40 minutes on 2 CPU cores, most of it AutoAttack
    python bench/eval_vs_autoattack.py --n 1000 --models pgd trades
    python bench/eval_vs_autoattack.py --only-eval        # reuse the trained models under --out

Models and evaluations are kept under --out (default outputs/bench/eval_vs_autoattack), so a second run
re-evaluates without retraining.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import REPO, data_root, describe_machine

from advcli.report import percent  # noqa: E402

TRAIN = ["model=small_cnn", "eps=0.3", "seed=0", "progress=false", "evaluation=fast", "evaluation.num_examples=100",
         "evaluation.sanity.enabled=false",
         # the training defaults these models were measured with (before the time-to-robust recipe)
         "batch_size=128", "lr=1e-3", "lr_schedule=constant", "ema.decay=null", "data.val_size=1000"]
MODELS = {
    "standard": ["attack=none", "epochs=2"],
    "fgsm_rs": ["experiment=fast_at", "model=small_cnn", "lr_peak=0.4", "epochs=5", "eps_warmup=2"],
    "pgd": ["attack=pgd", "attack.steps=10", "epochs=4"],
    "trades": ["trainer=trades", "epochs=4"],
}
PRESETS = ("default", "fast", "autoattack")


def advcli(*args: str) -> None:
    print("  advcli " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "advcli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"advcli {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def trained(name: str, out: Path) -> Path:
    run = out / name
    if not (run / "metrics.json").is_file():
        advcli("train", *TRAIN, *MODELS[name], f"data.root={data_root()}", f"output_dir={run}")
    return run / "checkpoint.pt"


def evaluated(ckpt: Path, preset: str, n: int, out: Path) -> dict:
    where = out / f"{ckpt.parent.name}-{preset}-{n}"
    if not (where / "metrics.json").is_file():
        sanity = [] if preset == "fast" else ["evaluation.sanity.enabled=false"]
        advcli("eval", f"ckpt={ckpt}", f"evaluation={preset}", f"evaluation.num_examples={n}", "progress=false",
               f"data.root={data_root()}", f"output_dir={where}", *sanity)
    return json.loads((where / "metrics.json").read_text())


def robust(metrics: dict) -> dict:
    return metrics["test"]["any_attack"]


def converged_verdict(metrics: dict) -> str:
    checks = {c["name"]: c for c in (metrics.get("sanity") or {}).get("checks", [])}
    check = checks.get("attack_converged")
    return "-" if check is None else check["verdict"]


def row(name: str, found: dict[str, dict]) -> str:
    ours, fast, theirs = (robust(found[p]) for p in PRESETS)
    ours_s, theirs_s = sum(found["default"]["attack_time_s"].values()), sum(found["autoattack"]["attack_time_s"].values())
    low, high = ours["ci95"]
    return (f"| {name} | {percent(found['default']['test']['clean']['acc'])} | {percent(ours['acc'])} "
            f"[{100 * low:.1f}, {100 * high:.1f}] | {percent(theirs['acc'])} | {100 * (ours['acc'] - theirs['acc']):+.1f} "
            f"| {ours_s:.1f} | {theirs_s:.1f} | {ours_s / theirs_s:.3f} | {percent(fast['acc'])} "
            f"({converged_verdict(found['fast'])}) |")


def cost_line(name: str, metrics: dict) -> str:
    rows = metrics["test"]
    parts = [f"{attack} {metrics['attack_time_s'][attack]:.1f}s on {rows[attack].get('attacked', '?')} examples"
             for attack in metrics["attack_time_s"] if rows[attack].get("attack") != "none"]
    return f"- {name}: " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="test examples (the first N)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "eval_vs_autoattack")
    args = parser.parse_args()
    print(describe_machine())
    results = {}
    for name in args.models:
        ckpt = trained(name, args.out)
        results[name] = {preset: evaluated(ckpt, preset, args.n, args.out) for preset in PRESETS}
    print(f"\nMNIST, eps = 0.3 (L-inf), small_cnn, first {args.n} test images; robust accuracy with its Wilson 95% "
          "interval; seconds spent in the attacks (sanity probes apart); fast = evaluation=fast (its attack_converged "
          "sanity verdict)\n")
    print("| model | clean | default | AutoAttack (standard) | gap (points) | default s | AutoAttack s | time ratio "
          "| fast |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, found in results.items():
        print(row(name, found))
    print("\nwhere the default evaluation's time went:")
    for name, found in results.items():
        print(cost_line(name, found["default"]))


if __name__ == "__main__":
    main()
