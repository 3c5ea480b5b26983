"""advcli's training step against the loop users write around torchattacks.PGD, in the same run.

Each variant trains the Madry MNIST CNN for one epoch of PGD-7 adversarial training at eps=0.1 on the
same 10,000 images, in the same order, from the same initial weights, with the same step size and Adam;
then its model is measured on the first 1,000 test images (clean and PGD-20, fp32). advcli runs through
its own `advcli.training.train.train_epoch` and on-device batches, with its defaults (amp=auto, channels_last=auto)
and with everything off (fp32, contiguous). torchattacks is a benchmark-only dependency
(pip install torchattacks).

The variants take turns, ``--chunk`` batches at a time (the order rotating every round), and each
variant's time is the sum of its own chunks: on a shared machine a slow minute then costs every variant
alike instead of whichever happened to run in it.

    python bench/vs_torchattacks.py                    # about 3 minutes on 2 CPU cores
    python bench/vs_torchattacks.py --train 60000      # the full training split

The last lines are the per-step target: advcli's time against the plain loop of the same settings (fp32 against
fp32; defaults against the plain loop in the precision and memory format the defaults pick here), >= 0.97x.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time

import torch
import torch.nn.functional as F

from common import describe_machine, mnist

from advcli import attacks, data, runtime  # noqa: E402
from advcli.runtime import prepare_model  # noqa: E402
from advcli.models import build_model  # noqa: E402
from advcli.training.epoch import EpochPlan, Optimisation, lr_schedule, train_epoch  # noqa: E402
from advcli.training.objectives import MinMax

EPS, STEPS, BATCH = 0.1, 7, 128
ALPHA = 2.5 * EPS / STEPS


def fresh_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, image_size=28, num_classes=10, mean=(0.1307,), std=(0.3081,))
    return model.to(device)


class TorchattacksLoop:
    """The loop a torchattacks user writes: attack the batch, then one optimiser step on it (fp32)."""

    label = "torchattacks.PGD loop (fp32)"

    def __init__(self, images: data.ImageSet, device: torch.device):
        import torchattacks

        self.model = fresh_model(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.attack = torchattacks.PGD(self.model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        self.loader = data.batches(images, BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))

    def run(self, n: int) -> None:
        for x, y in itertools.islice(self.loader, n):
            x_adv = self.attack(x, y)
            self.model.train()
            loss = F.cross_entropy(self.model(x_adv), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()


class PlainLoop:
    """The issue's reference: a plain loop with its own PGD, parameters' requires_grad off during the attack
    (fp32; with ``fast=True`` under bf16 autocast and channels_last, as the issue's fastest row).

    It shows what the machine allows without advcli's machinery: where this row is no faster than the
    torchattacks loop, the fp32 gap is in the kernels, not in the Python around them.
    """

    def __init__(self, images: data.ImageSet, device: torch.device, fast: bool = False):
        # fast: the precision and memory format advcli's defaults pick on this machine (amp=auto, channels_last=auto)
        amp_dtype = runtime.resolve_amp("auto", device) if fast else None
        self.label = (f"plain loop, {runtime.describe_precision(amp_dtype)} + channels_last" if fast
                      else "plain loop, requires_grad off (fp32)")
        self.model, use_cl = prepare_model(fresh_model(device), device, fast)
        self.autocast = runtime.autocast(device, amp_dtype) if fast else contextlib.nullcontext()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loader = data.batches(images, BATCH, shuffle=True, generator=torch.Generator().manual_seed(0),
                                   channels_last=use_cl)

    def pgd(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for p in self.model.parameters():
            p.requires_grad_(False)
        delta = torch.empty_like(x).uniform_(-EPS, EPS)
        for _ in range(STEPS):
            delta.requires_grad_(True)
            loss = F.cross_entropy(self.model((x + delta).clamp(0, 1)), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        for p in self.model.parameters():
            p.requires_grad_(True)
        return (x + delta).clamp(0, 1)

    def run(self, n: int) -> None:
        for x, y in itertools.islice(self.loader, n):
            self.model.train()
            with self.autocast:
                x_adv = self.pgd(x, y)
                loss = F.cross_entropy(self.model(x_adv).float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


class Advcli:
    """advcli's training epoch (`train_epoch`, advcli's PGD, on-device batches), fed ``n`` batches at a time."""

    def __init__(self, images: data.ImageSet, device: torch.device, *, amp: str, channels_last, label: str):
        self.label = label
        self.model, use_cl = prepare_model(fresh_model(device), device, channels_last)
        self.amp_dtype = runtime.resolve_amp(amp, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.opt = Optimisation(self.optimizer, lr_schedule("constant", self.optimizer, total_steps=1),
                                runtime.grad_scaler(device, self.amp_dtype), self.amp_dtype)
        self.loader = data.batches(images, BATCH, shuffle=True, generator=torch.Generator().manual_seed(0),
                                   channels_last=use_cl)

    def run(self, n: int) -> None:
        train_epoch(self.model, itertools.islice(self.loader, n),
                    MinMax(lambda m, x, y, e: attacks.pgd(m, x, y, e, alpha=ALPHA, steps=STEPS)), self.opt,
                    EpochPlan(eps=EPS, progress_bar=False, log_every=10**9))


def accuracy(model, test: data.ImageSet) -> tuple[float, float]:
    """Clean and PGD-20 accuracy (fp32, eval mode) on ``test``."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    clean = robust = 0
    for x, y in data.batches(test, 500):
        with torch.no_grad():
            clean += (model(x).argmax(1) == y).sum().item()
        x_adv = attacks.pgd(model, x, y, EPS, steps=20)
        with torch.no_grad():
            robust += (model(x_adv).argmax(1) == y).sum().item()
    return clean / len(test), robust / len(test)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10_000, help="training images (one epoch)")
    parser.add_argument("--test", type=int, default=1_000, help="test images for the accuracies")
    parser.add_argument("--chunk", type=int, default=8, help="batches a variant runs before the next takes its turn")
    args = parser.parse_args()
    print(describe_machine())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, test = mnist("train", args.train).to(device), mnist("test", args.test).to(device)
    print(f"Madry CNN, MNIST, {args.train} training images, batch {BATCH}, PGD-{STEPS} eps={EPS} alpha={ALPHA:.4f}, "
          f"Adam 1e-3; accuracies on {args.test} test images (PGD-20, fp32); variants interleaved every "
          f"{args.chunk} batches\n")

    variants = [TorchattacksLoop(images, device), PlainLoop(images, device),
                Advcli(images, device, amp="auto", channels_last="auto",
                       label="advcli, defaults (amp=auto, channels_last=auto)"),
                Advcli(images, device, amp="off", channels_last=False, label="advcli, amp=off channels_last=false"),
                PlainLoop(images, device, fast=True)]
    seconds = [0.0] * len(variants)
    batches = data.num_batches(args.train, BATCH)
    for round_, start in enumerate(range(0, batches, args.chunk)):
        n = min(args.chunk, batches - start)
        for i in ((round_ + j) % len(variants) for j in range(len(variants))):
            torch.manual_seed(round_)  # the same random starts for every variant
            synchronize()
            begin = time.perf_counter()
            variants[i].run(n)
            synchronize()
            seconds[i] += time.perf_counter() - begin

    print(f"{'variant':<50} {'train s':>8} {'img/s':>7} {'speed-up':>9} {'clean':>7} {'PGD-20':>7}")
    for variant, spent in zip(variants, seconds):
        clean, robust = accuracy(variant.model, test)
        print(f"{variant.label:<50} {spent:>8.1f} {args.train / spent:>7.0f} {seconds[0] / spent:>8.2f}x "
              f"{100 * clean:>6.1f}% {100 * robust:>6.1f}%")
    torchattacks_s, plain_s, defaults_s, fp32_s, plain_fast_s = seconds
    print(f"\nadvcli per step against the plain loop of the same settings (speed ratio; target >= 0.97x):\n"
          f"  fp32:     {plain_s / fp32_s:.3f}x\n  defaults: {plain_fast_s / defaults_s:.3f}x")


if __name__ == "__main__":
    main()
