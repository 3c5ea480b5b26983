"""advcli's training step against the loop users write around torchattacks.PGD, in the same run.

Both train the Madry MNIST CNN for one epoch of PGD-7 adversarial training at eps=0.1 on the same
10,000 images, in the same order, from the same initial weights, with the same step size and Adam;
then both models are measured on the first 1,000 test images (clean and PGD-20, fp32). advcli runs
through its own `advcli.train.train_epoch` with its defaults (amp=auto, channels_last=auto) and with
everything off (fp32, contiguous). torchattacks is a benchmark-only dependency (pip install torchattacks).

    python bench/vs_torchattacks.py                    # about 2-3 minutes on 2 CPU cores
    python bench/vs_torchattacks.py --train 60000      # the full training split
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import describe_machine, mnist, timed

from advcli import attacks, data, runtime  # noqa: E402
from advcli.evaluate import prepare_model  # noqa: E402
from advcli.models import build_model  # noqa: E402
from advcli.train import lr_schedule, train_epoch  # noqa: E402

EPS, STEPS, BATCH = 0.1, 7, 128
ALPHA = 2.5 * EPS / STEPS


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, image_size=28, num_classes=10, mean=(0.1307,), std=(0.3081,))


def torchattacks_epoch(model, images: data.ImageSet, order: torch.Generator) -> None:
    """The loop a torchattacks user writes: attack the batch, then one optimiser step on it."""
    import torchattacks

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    attack = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    for x, y in data.batches(images, BATCH, shuffle=True, generator=order):
        x_adv = attack(x, y)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def advcli_epoch(model, images: data.ImageSet, order: torch.Generator, *, amp: str, channels_last) -> torch.nn.Module:
    device = next(model.parameters()).device
    model, use_cl = prepare_model(model, device, channels_last)
    amp_dtype = runtime.resolve_amp(amp, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = data.batches(images, BATCH, shuffle=True, generator=order, channels_last=use_cl)
    train_epoch(model, loader, lambda m, x, y, e: attacks.pgd(m, x, y, e, alpha=ALPHA, steps=STEPS), eps=EPS,
                optimizer=optimizer, scheduler=lr_schedule("constant", optimizer, total_steps=1),
                scaler=runtime.grad_scaler(device, amp_dtype), amp_dtype=amp_dtype, progress=False, log_every=10**9)
    return model


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10_000, help="training images (one epoch)")
    parser.add_argument("--test", type=int, default=1_000, help="test images for the accuracies")
    args = parser.parse_args()
    print(describe_machine())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, test = mnist("train", args.train).to(device), mnist("test", args.test).to(device)
    print(f"Madry CNN, MNIST, {args.train} training images, batch {BATCH}, PGD-{STEPS} eps={EPS} alpha={ALPHA:.4f}, "
          f"Adam 1e-3; accuracies on {args.test} test images (PGD-20, fp32)\n")

    rows = []
    model = fresh_model().to(device)
    torch.manual_seed(1)
    _, baseline = timed(torchattacks_epoch, model, images, torch.Generator().manual_seed(0))
    rows.append(("torchattacks.PGD loop (fp32)", baseline, *accuracy(model, test)))
    for label, amp, channels_last in (("advcli, defaults (amp=auto, channels_last=auto)", "auto", "auto"),
                                      ("advcli, amp=off channels_last=false", "off", False)):
        torch.manual_seed(1)
        trained, seconds = timed(advcli_epoch, fresh_model().to(device), images, torch.Generator().manual_seed(0),
                                 amp=amp, channels_last=channels_last)
        rows.append((label, seconds, *accuracy(trained, test)))

    print(f"{'variant':<50} {'train s':>8} {'img/s':>7} {'speed-up':>9} {'clean':>7} {'PGD-20':>7}")
    for label, seconds, clean, robust in rows:
        print(f"{label:<50} {seconds:>8.1f} {args.train / seconds:>7.0f} {baseline / seconds:>8.2f}x "
              f"{100 * clean:>6.1f}% {100 * robust:>6.1f}%")


if __name__ == "__main__":
    main()
