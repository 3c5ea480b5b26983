"""What R random restarts of evaluation PGD cost, next to the robust fraction.

Evaluation PGD (``early_stop=True``) attacks again only the examples no earlier restart broke, so R
restarts should cost about 1 + (R - 1) x (robust fraction) single runs, not R. This prints, for each R,
the wall time, its ratio to R = 1 and the robust fraction; and, for comparison, the same PGD with the
training semantics (every restart on every example, the highest-loss one kept), which costs R runs.

    python bench/restart_cost.py                                   # a small CNN PGD-trained on synthetic data
    python bench/restart_cost.py --ckpt outputs/DATE/TIME/checkpoint.pt --examples 1000

Defaults run on a 2-core CPU in about 1.5 minutes (3 when other work shares the cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from advcli import attacks, data  # noqa: E402
from advcli import models
from advcli.runs import checkpoint
from advcli.evaluation.evaluate import attack_outcomes  # noqa: E402
from advcli.models import build_model  # noqa: E402


def synthetic_model(device: torch.device) -> tuple[torch.nn.Module, data.ImageSet, float, str]:
    """The Madry CNN, PGD-trained at eps=0.05 for a few seconds on the synthetic set, and its test split."""
    torch.manual_seed(0)
    options = dict(num_train=2048, num_test=1024, image_size=16)
    train_set = data.load_split("synthetic", "train", root=".", **options).to(device)
    test_set = data.load_split("synthetic", "test", root=".", **options)
    model = build_model("cnn", in_channels=1, image_size=16, num_classes=4, mean=(0.5,), std=(0.25,)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(2):
        for x, y in data.batches(train_set, 128, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            x_adv = attacks.pgd(model, x, y, 0.05, steps=5)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_adv), y).backward()
            optimizer.step()
    return model.eval(), test_set, 0.1, "synthetic 1x16x16, 4 classes; Madry CNN PGD-trained at eps=0.05"


def checkpoint_model(path: str, device: torch.device, root: str) -> tuple[torch.nn.Module, data.ImageSet, float, str]:
    payload = checkpoint.load(path)
    trained = payload["config"]
    dataset = dict(trained["dataset"])
    name = dataset.pop("name")
    options = {k: v for k, v in dataset.items() if k not in ("crop_padding", "flip")}
    test_set = data.load_split(name, "test", root=root, download=False, **options)
    model = models.rebuild_model(payload, path).to(device).eval()
    return model, test_set, float(trained["eps"]), f"{name}; {payload['model_spec']['name']} from {path}"


@dataclass
class Cost:
    wall: float    # seconds
    cpu: float     # seconds of this process's CPU time
    passes: int    # examples through the model
    robust: float  # robust fraction: still correctly classified after the attack


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the architecture."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="an advcli checkpoint.pt (default: train a small model on synthetic data)")
    parser.add_argument("--eps", type=float, help="attack radius (default: 0.1 synthetic, the training eps with --ckpt)")
    parser.add_argument("--examples", type=int, default=512, help="test examples to attack (default 512)")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps per restart (default 20)")
    parser.add_argument("--restarts", default="1,5,10", help="restart counts to time (default 1,5,10)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--no-training-semantics", action="store_true", help="skip the keep-the-best comparison")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=os.environ.get("ADVCLI_DATA", "data"), help="dataset root for --ckpt")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.ckpt:
        model, test_set, eps, what = checkpoint_model(args.ckpt, device, args.data)
    else:
        model, test_set, eps, what = synthetic_model(device)
    eps = args.eps if args.eps is not None else eps
    test_set = test_set.subset(slice(0, args.examples)).to(device)
    counts = [int(r) for r in args.restarts.split(",")]

    passes = [0]  # examples through the model, summed over forward passes (with or without a backward)
    model.register_forward_pre_hook(lambda module, inputs: passes.__setitem__(0, passes[0] + len(inputs[0])))

    def run(restarts: int, early_stop: bool) -> Cost:
        attack = lambda m, x, y, e: attacks.pgd(m, x, y, e, steps=args.steps, restarts=restarts,  # noqa: E731
                                                early_stop=early_stop)
        torch.manual_seed(0)
        passes[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        found = attack_outcomes(model, data.batches(test_set, args.batch_size), {"pgd": attack}, eps=eps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return Cost(time.perf_counter() - wall, time.process_time() - cpu, passes[0],
                    found.correct["pgd"].float().mean().item())

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    print(f"device {name}; torch {torch.__version__}; {what}")
    print(f"PGD-{args.steps} (CE), L-inf eps={eps:.4g}, {len(test_set)} examples, batch {args.batch_size}")
    run(1, True)  # warm-up: first-call allocations and kernel selection
    rows = [(restarts, run(restarts, True), None if args.no_training_semantics else run(restarts, False))
            for restarts in counts]
    one, one_plain = rows[0][1], rows[0][2]
    header = (f"{'R':>3} {'wall s':>8} {'wall ratio':>10} {'CPU ratio':>9} {'passes ratio':>12} {'robust fraction':>15}"
              + ("" if args.no_training_semantics else f" | {'keep-best wall s':>16} {'ratio':>6}"))
    print(header)
    print("-" * len(header))
    for restarts, cost, plain in rows:
        line = (f"{restarts:>3} {cost.wall:>8.2f} {cost.wall / one.wall:>10.2f} {cost.cpu / one.cpu:>9.2f} "
                f"{cost.passes / one.passes:>12.2f} {cost.robust:>15.3f}")
        if plain is not None:
            line += f" | {plain.wall:>16.2f} {plain.wall / one_plain.wall:>6.2f}"
        print(line)
    print("ratios are to R=1; CPU: this process's CPU time (steadier than wall time on a shared machine); passes:\n"
          "examples through the model. keep-best: training-style restarts (each attacks every example).")


if __name__ == "__main__":
    main()
