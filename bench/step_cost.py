"""Cost of one adversarial training step, relative to the naive floor of (k + 1) clean steps.

PGD-k training runs k attack steps (forward + input-gradient backward) and one training step per
batch, so a naive runner costs about (k + 1) clean steps. Attack steps need no weight gradients, so
a good runner sits below that floor. This times advcli's own training step (`advcli.training.train.train_epoch`
with advcli's attacks and on-device batches) on the Madry MNIST CNN for attack=none, FGSM and PGD-k,
k = 3, 7, 10, and prints each step's time and PGD-k / ((k + 1) x clean step), for fp32 (contiguous and
channels_last) and for the defaults (amp=auto, channels_last=auto).

    python bench/step_cost.py                     # batch 128, best of 3 rounds of 6 batches; ~2 minutes on 2 CPU cores
    python bench/step_cost.py --batches 20 --repeats 5 --batch-size 256
"""

from __future__ import annotations

import argparse

import torch

from common import describe_machine, mnist, timed

from advcli import attacks, data, runtime  # noqa: E402
from advcli.runtime import prepare_model  # noqa: E402
from advcli.models import build_model  # noqa: E402
from advcli.training.epoch import EpochPlan, Optimisation, lr_schedule, train_epoch  # noqa: E402
from advcli.training.objectives import MinMax

VARIANTS = {  # name: (amp, channels_last)
    "fp32": ("off", False),
    "fp32 + channels_last": ("off", True),
    "defaults (amp=auto, channels_last=auto)": ("auto", "auto"),
}


class Trainer:
    """advcli's training epoch on the Madry CNN for one (amp, channels_last) setting, fed a few batches at a time."""

    def __init__(self, *, amp: str, channels_last, images: data.ImageSet, batch_size: int, eps: float = 0.1):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        model = build_model("cnn", in_channels=1, image_size=28, num_classes=10, mean=(0.1307,), std=(0.3081,))
        self.model, self.channels_last = prepare_model(model, device, channels_last)
        self.amp_dtype = runtime.resolve_amp(amp, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.opt = Optimisation(self.optimizer, lr_schedule("constant", self.optimizer, total_steps=1),
                                runtime.grad_scaler(device, self.amp_dtype), self.amp_dtype)
        self.images, self.batch_size, self.eps = images.to(device), batch_size, eps

    def seconds_per_step(self, attack, batches: int) -> float:
        loader = data.batches(self.images.subset(slice(0, batches * self.batch_size)), self.batch_size,
                              channels_last=self.channels_last)
        _, seconds = timed(train_epoch, self.model, loader, MinMax(attack), self.opt,
                           EpochPlan(eps=self.eps, progress_bar=False, log_every=10**9))
        return seconds / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per cell and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each cell keeps its fastest")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    print(describe_machine())
    images = mnist("train", args.batches * args.batch_size)
    attack_list = {"none": (attacks.none, 0), "fgsm": (attacks.fgsm, 1)}
    attack_list.update({f"pgd-{k}": (lambda m, x, y, e, k=k: attacks.pgd(m, x, y, e, steps=k), k) for k in (3, 7, 10)})
    print(f"Madry CNN, MNIST, batch {args.batch_size}, eps 0.1; per cell the fastest of {args.repeats} interleaved rounds "
          f"of {args.batches} batches\n")
    print(f"{'variant':<42} {'attack':<7} {'ms/step':>8} {'÷ (k+1)·clean':>14}")
    for variant, (amp, channels_last) in VARIANTS.items():
        trainer = Trainer(amp=amp, channels_last=channels_last, images=images, batch_size=args.batch_size)
        trainer.seconds_per_step(attacks.none, 3)  # warm-up
        # the attacks take turns for --repeats rounds; each keeps its fastest round, so a burst of other
        # work on the machine inflates no cell (and the clean step, the denominator, least of all)
        best = {name: float("inf") for name in attack_list}
        for _ in range(args.repeats):
            for name, (attack, _k) in attack_list.items():
                best[name] = min(best[name], trainer.seconds_per_step(attack, args.batches))
        for name, (_attack, k) in attack_list.items():
            ratio = best[name] / ((k + 1) * best["none"])
            print(f"{variant:<42} {name:<7} {1000 * best[name]:>8.1f} {ratio:>14.2f}")
        print()


if __name__ == "__main__":
    main()
