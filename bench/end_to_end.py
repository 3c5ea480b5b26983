"""The fast recipe end to end: `advcli train experiment=fast_at` on MNIST at eps=0.3, then PGD-50-10.

Fast adversarial training (Wong et al. 2020) reports 88.77% PGD-50-10 accuracy on MNIST at eps=0.3
after 10 epochs. This runs the whole tool (`advcli.train.train` on the composed config, as the command
line does) and evaluates the final model on the first 1,000 test images with PGD of 50 steps, step
0.01, 10 restarts (evaluation PGD re-attacks only unbroken examples), plus clean and FGSM. The same as

    advcli train experiment=fast_at evaluation.num_examples=1000 evaluation.attacks.pgd.steps=50 \
        evaluation.attacks.pgd.restarts=10 evaluation.attacks.pgd.alpha=0.01

    python bench/end_to_end.py                      # about 10 minutes on 2 CPU cores
    python bench/end_to_end.py epochs=5             # any Hydra override
    python bench/end_to_end.py dataset=cifar10 model=preact_resnet18 eps=8/255 optimizer=sgd lr=0.2 epochs=15 \
        evaluation.attacks.pgd.alpha=0.00784        # on a GPU: the CIFAR-10 recipe
"""

from __future__ import annotations

import sys
import tempfile
import time

from hydra import compose, initialize_config_module

from common import data_root, describe_machine

from advcli.train import train  # noqa: E402


def main() -> None:
    print(describe_machine())
    out = tempfile.mkdtemp(prefix="advcli-end-to-end-")
    overrides = ["experiment=fast_at", f"data.root={data_root()}", "evaluation.num_examples=1000",
                 "evaluation.attacks.pgd.steps=50", "evaluation.attacks.pgd.restarts=10",
                 "evaluation.attacks.pgd.alpha=0.01", f"output_dir={out}", *sys.argv[1:]]
    print("advcli train " + " ".join(overrides))
    with initialize_config_module(config_module="advcli.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    start = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - start
    test = metrics["test"]
    guard = metrics.get("overfit_guard", {})
    print(f"\n{'epochs':>6} {'train s':>8} {'wall s':>7} {'clean':>7} {'FGSM':>7} {'PGD-50-10':>10}  overfit guard")
    print(f"{len(metrics['history']):>6} {metrics['train_time_s']:>8.0f} {wall:>7.0f} {100 * test['clean']['acc']:>6.2f}% "
          f"{100 * test['fgsm']['acc']:>6.2f}% {100 * test['pgd']['acc']:>9.2f}%  "
          f"{'triggered at epoch %d' % guard['epoch'] if guard.get('triggered') else 'not triggered'}")
    print(f"(run directory {out})")


if __name__ == "__main__":
    main()
