"""How strong and how cheap is advcli's default evaluation? Beside standard AutoAttack, on the same examples.

MNIST models (L-inf), trained here by advcli unless already there, and released ones nobody here trained:

    standard   attack=none, small_cnn                         no robustness: every evaluation should find ~0%
    fgsm_rs    experiment=fast_at (FGSM from a random start)  gradients that mislead: PGD overstates it
    pgd        attack=pgd (PGD-10), small_cnn                 Madry et al.'s recipe
    trades     trainer=trades, small_cnn                      Zhang et al.'s objective
    mlp_pgd    attack=pgd, model=mlp                          another architecture
    certified  ../shared/models/wong_kolter_2018_mnist_eps0.1.pth (released; certified training, eps 0.1)
    cnn_a_adv  ../shared/models/cnn_a_adv_mnist_eps0.3.pth    (released; PGD-trained, from the verification literature)

it evaluates the first N test images (default 1000) three times with `advcli eval`: the `default` evaluation,
the `fast` one (does its sanity report warn?) and `evaluation=autoattack` (the reference code, standard
version), and prints robust accuracy with its Wilson 95% interval, the gap to AutoAttack in points, the
seconds the attacks took (sanity probes apart) and the time ratio, then where the default's time went.
Then, on the 20 test images of cnn_a_adv for which a complete verifier (branch and bound) proved an adversarial
example within eps = 0.3, how many each evaluation breaks (../shared/models/README.md).

    python bench/eval_vs_autoattack.py                   # hours on 2 CPU cores, most of it AutoAttack
    python bench/eval_vs_autoattack.py --n 1000 --models certified cnn_a_adv

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

from advcli.runs.report import percent  # noqa: E402

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
MODELS_DIR = Path(data_root()).parent / "models"
RELEASED = {  # name -> (file in ../shared/models, eps it was trained for), evaluated with weights= as a user would
    "certified": ("wong_kolter_2018_mnist_eps0.1.pth", "0.1"),
    "cnn_a_adv": ("cnn_a_adv_mnist_eps0.3.pth", "0.3"),
}
MODELS["mlp_pgd"] = ["model=mlp", "attack=pgd", "attack.steps=10", "epochs=4"]
BREAKABLE = "cnn_a_adv_mnist_eps0.3.breakable_test_indices.txt"


def advcli(*args: str) -> None:
    print("  advcli " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "advcli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"advcli {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def model_args(name: str, out: Path) -> list[str]:
    """What `advcli eval` needs to load model ``name``: a checkpoint advcli trained (trained now if missing),
    or a released state_dict."""
    if name in RELEASED:
        file, eps = RELEASED[name]
        return [f"weights={MODELS_DIR / file}", "model=small_cnn", "model.normalize=none", "dataset=mnist", f"eps={eps}"]
    run = out / name
    if not (run / "metrics.json").is_file():
        advcli("train", *TRAIN, *MODELS[name], f"data.root={data_root()}", f"output_dir={run}")
    return [f"ckpt={run / 'checkpoint.pt'}"]


def evaluated(name: str, preset: str, n: int, out: Path) -> dict:
    where = out / f"{name}-{preset}-{n}"
    if not (where / "metrics.json").is_file():
        sanity = [] if preset == "fast" else ["evaluation.sanity.enabled=false"]
        advcli("eval", *model_args(name, out), f"evaluation={preset}", f"evaluation.num_examples={n}",
               "progress=false", f"data.root={data_root()}", f"output_dir={where}", *sanity)
    return json.loads((where / "metrics.json").read_text())


def proven_breakable() -> str:
    """How many of the 20 verifier-breakable cnn_a_adv test images the default evaluation and standard AutoAttack
    break (in-process, the same code advcli eval runs)."""
    import torch
    from hydra import compose, initialize_config_module

    from advcli import data, models
    from advcli.attacks.reference import autoattack
    from advcli.evaluation.eval_command import check_eval_settings
    from advcli.evaluation.evaluate import eval_settings, evaluate_model

    indices = torch.tensor([int(line) for line in (MODELS_DIR / BREAKABLE).read_text().split()])
    with initialize_config_module(config_module="advcli.configs", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[*model_args("cnn_a_adv", Path()), "device=cpu", "progress=false",
                                                     f"data.root={data_root()}", "evaluation.sanity.enabled=false"])
    job = check_eval_settings(cfg)
    model = models.rebuild_model(job.payload, job.where).eval()
    images = data.load_split("mnist", "test", root=data_root(), download=False).subset(indices)
    settings = eval_settings(cfg.evaluation, job.settings, amp_dtype=None, channels_last=False, adversarial_class=False,
                             progress=False)
    ours = evaluate_model(model, images, job.attack_cfgs, settings).results
    x, y = next(data.batches(images, len(indices)))
    with torch.no_grad():
        theirs = int((model(autoattack(model, x, y, 0.3)).argmax(1) != y).sum())
    broken = round((1 - ours["any_attack"]["acc"]) * len(indices))
    return (f"cnn_a_adv, the {len(indices)} test images a complete verifier proved breakable at eps = 0.3: the default "
            f"evaluation broke {broken}, standard AutoAttack (seed 0) {theirs}")


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
    parser.add_argument("--n", type=int, default=1000, help="test examples (the first N)")
    parser.add_argument("--models", nargs="+", default=[*MODELS, *RELEASED], choices=[*MODELS, *RELEASED])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "eval_vs_autoattack")
    args = parser.parse_args()
    print(describe_machine())
    results = {}
    for name in args.models:
        results[name] = {preset: evaluated(name, preset, args.n, args.out) for preset in PRESETS}
    print(f"\nMNIST, L-inf eps = 0.3 (certified: 0.1), first {args.n} test images; robust accuracy with its Wilson 95% "
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
    if "cnn_a_adv" in args.models:
        print("\n" + proven_breakable())


if __name__ == "__main__":
    main()
