"""Cost of one adversarial training step, relative to the naive floor of (k + 1) clean steps.

PGD-k training runs k attack steps (forward + input-gradient backward) and one training step per
batch, so a naive runner costs about (k + 1) clean steps. Attack steps need no weight gradients, so
a good runner sits below that floor. This times advcli's own training step (`advcli.train.train_epoch`
with advcli's attacks and on-device batches) on the Madry MNIST CNN for attack=none, FGSM and PGD-k,
k = 3, 7, 10, and prints each step's time and PGD-k / ((k + 1) x clean step), for fp32 (contiguous and
channels_last) and for the defaults (amp=auto, channels_last=auto).

    python bench/step_cost.py                     # batch 128, 20 timed batches each; ~2 minutes on 2 CPU cores
    python bench/step_cost.py --batches 50 --batch-size 256
"""

from __future__ import annotations

import argparse

import torch

from common import describe_machine, mnist, timed

from advcli import attacks, data, runtime  # noqa: E402
from advcli.evaluate import prepare_model  # noqa: E402
from advcli.models import build_model  # noqa: E402
from advcli.train import lr_schedule, train_epoch  # noqa: E402

VARIANTS = {  # name: (amp, channels_last)
    "fp32": ("off", False),
    "fp32 + channels_last": ("off", True),
    "defaults (amp=auto, channels_last=auto)": ("auto", "auto"),
}


def step_time(attack, *, amp: str, channels_last, images: data.ImageSet, batch_size: int, batches: int,
              eps: float = 0.1) -> float:
    """Seconds per training step, median-free: total over ``batches`` batches after 3 warm-up batches."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, image_size=28, num_classes=10, mean=(0.1307,), std=(0.3081,))
    model, use_cl = prepare_model(model, device, channels_last)
    amp_dtype = runtime.resolve_amp(amp, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = lr_schedule("constant", optimizer, total_steps=1)
    scaler = runtime.grad_scaler(device, amp_dtype)
    images = images.to(device)

    def run(n: int):
        loader = data.batches(images.subset(slice(0, n * batch_size)), batch_size, channels_last=use_cl)
        return train_epoch(model, loader, attack, eps=eps, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                           amp_dtype=amp_dtype, progress=False, log_every=10**9)

    run(3)
    _, seconds = timed(run, batches)
    return seconds / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per cell")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    print(describe_machine())
    images = mnist("train", args.batches * args.batch_size)
    attack_list = {"none": (attacks.none, 0), "fgsm": (attacks.fgsm, 1)}
    attack_list.update({f"pgd-{k}": (lambda m, x, y, e, k=k: attacks.pgd(m, x, y, e, steps=k), k) for k in (3, 7, 10)})
    print(f"Madry CNN, MNIST, batch {args.batch_size}, eps 0.1, {args.batches} timed batches per cell\n")
    print(f"{'variant':<42} {'attack':<7} {'ms/step':>8} {'÷ (k+1)·clean':>14}")
    for variant, (amp, channels_last) in VARIANTS.items():
        clean = None
        for name, (attack, k) in attack_list.items():
            seconds = step_time(attack, amp=amp, channels_last=channels_last, images=images,
                                batch_size=args.batch_size, batches=args.batches)
            clean = seconds if name == "none" else clean
            ratio = seconds / ((k + 1) * clean)
            print(f"{variant:<42} {name:<7} {1000 * seconds:>8.1f} {ratio:>14.2f}")
        print()


if __name__ == "__main__":
    main()
