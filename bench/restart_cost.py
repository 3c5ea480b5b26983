"""What R random restarts of evaluation PGD cost, next to the robust fraction.

Evaluation PGD (``early_stop=True``) attacks again only the examples no earlier restart broke, so R
restarts should cost about 1 + (R - 1) x (robust fraction) single runs, not R. This prints, for each R,
the wall time, its ratio to R = 1 and the robust fraction; and, for comparison, the same PGD with the
training semantics (every restart on every example, the highest-loss one kept), which costs R runs.

    python bench/restart_cost.py                                   # a small MLP PGD-trained on synthetic data
    python bench/restart_cost.py --ckpt outputs/DATE/TIME/checkpoint.pt --examples 1000

Defaults run on a CPU in well under 3 minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from advcli import attacks, checkpoint, data  # noqa: E402
from advcli.evaluate import attack_outcomes  # noqa: E402
from advcli.models import build_model  # noqa: E402


def synthetic_model(device: torch.device) -> tuple[torch.nn.Module, data.ImageSet, float, str]:
    """An MLP PGD-trained at eps=0.05 for a few seconds on the synthetic set, and its test split."""
    torch.manual_seed(0)
    options = dict(num_train=2048, num_test=1024, image_size=16)
    train_set = data.load_split("synthetic", "train", root=".", **options).to(device)
    test_set = data.load_split("synthetic", "test", root=".", **options)
    model = build_model("mlp", in_channels=1, image_size=16, num_classes=4, mean=(0.5,), std=(0.25,),
                        hidden=[256, 256]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(4):
        for x, y in data.batches(train_set, 128, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            x_adv = attacks.pgd(model, x, y, 0.05, steps=5)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_adv), y).backward()
            optimizer.step()
    return model.eval(), test_set, 0.1, "synthetic 1x16x16, 4 classes; MLP 256-256 PGD-trained at eps=0.05"


def checkpoint_model(path: str, device: torch.device, root: str) -> tuple[torch.nn.Module, data.ImageSet, float, str]:
    payload = checkpoint.load(path)
    trained = payload["config"]
    dataset = dict(trained["dataset"])
    name = dataset.pop("name")
    options = {k: v for k, v in dataset.items() if k not in ("crop_padding", "flip")}
    test_set = data.load_split(name, "test", root=root, download=False, **options)
    model = checkpoint.rebuild_model(payload, path).to(device).eval()
    return model, test_set, float(trained["eps"]), f"{name}; {payload['model_spec']['name']} from {path}"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the architecture."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="an advcli checkpoint.pt (default: train a small model on synthetic data)")
    parser.add_argument("--eps", type=float, help="attack radius (default: 0.1 synthetic, the training eps with --ckpt)")
    parser.add_argument("--examples", type=int, default=1024, help="test examples to attack (default 1024)")
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

    def run(restarts: int, early_stop: bool) -> tuple[float, float]:
        attack = lambda m, x, y, e: attacks.pgd(m, x, y, e, steps=args.steps, restarts=restarts,  # noqa: E731
                                                early_stop=early_stop)
        torch.manual_seed(0)
        started = time.perf_counter()
        found = attack_outcomes(model, data.batches(test_set, args.batch_size), {"pgd": attack}, eps=eps)
        return time.perf_counter() - started, found.correct["pgd"].float().mean().item()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    print(f"device {name}; torch {torch.__version__}; {what}")
    print(f"PGD-{args.steps} (CE), L-inf eps={eps:.4g}, {len(test_set)} examples, batch {args.batch_size}")
    run(1, True)  # warm-up: first-call allocations and kernel selection
    rows = []
    for restarts in counts:
        seconds, robust = run(restarts, True)
        plain = None if args.no_training_semantics else run(restarts, False)[0]
        rows.append((restarts, seconds, robust, plain))
    base, base_plain = rows[0][1], rows[0][3]
    header = f"{'R':>3} {'wall s':>8} {'ratio to R=1':>13} {'robust fraction':>16}"
    if not args.no_training_semantics:
        header += f" {'keep-best s':>12} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for restarts, seconds, robust, plain in rows:
        line = f"{restarts:>3} {seconds:>8.2f} {seconds / base:>13.2f} {robust:>16.3f}"
        if plain is not None:
            line += f" {plain:>12.2f} {plain / base_plain:>6.2f}"
        print(line)
    if not args.no_training_semantics:
        print("keep-best: training-style restarts (every restart attacks every example), for comparison")


if __name__ == "__main__":
    main()
