"""The fast recipe end to end: `advcli train experiment=fast_at` on MNIST at eps=0.3, then the default evaluation.

Fast adversarial training (Wong et al. 2020) reports 88.77% PGD-50-10 accuracy on MNIST at eps=0.3 after 10
epochs, and 82.93% under AutoAttack for its released model. This runs the whole tool (`advcli.training.train.train` on the
composed config, as the command line does) and evaluates the final model on the first 1,000 test images with the
default evaluation (APGD-CE, APGD-T and Square as a cascade; README "Evaluating a checkpoint"). The same as

    advcli train experiment=fast_at evaluation.num_examples=1000

    python bench/end_to_end.py                      # about 10 minutes on 2 CPU cores
    python bench/end_to_end.py epochs=5             # any Hydra override
    python bench/end_to_end.py evaluation=fast evaluation.attacks.pgd.steps=50 evaluation.attacks.pgd.restarts=10 \
        evaluation.attacks.pgd.alpha=0.01           # the PGD-50-10 of the paper (overstates this model; see README)
    python bench/end_to_end.py dataset=cifar10 model=preact_resnet18 eps=8/255 optimizer=sgd lr=0.2 epochs=15
                                                    # on a GPU: the CIFAR-10 recipe
"""

from __future__ import annotations

import sys
import tempfile
import time

from hydra import compose, initialize_config_module

from common import data_root, describe_machine

from advcli.runs.report import training_results  # noqa: E402
from advcli.training.train import train  # noqa: E402


def main() -> None:
    print(describe_machine())
    out = tempfile.mkdtemp(prefix="advcli-end-to-end-")
    overrides = ["experiment=fast_at", f"data.root={data_root()}", "evaluation.num_examples=1000",
                 f"output_dir={out}", *sys.argv[1:]]
    print("advcli train " + " ".join(overrides))
    with initialize_config_module(config_module="advcli.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    start = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - start
    guard = metrics.get("overfit_guard", {})
    print(f"\n{len(metrics['history'])} epochs, {metrics['train_time_s']:.0f} s of training, {wall:.0f} s in all; "
          f"overfit guard {'triggered at epoch %d' % guard['epoch'] if guard.get('triggered') else 'not triggered'}")
    print(training_results(metrics))
    print(f"(run directory {out})")


if __name__ == "__main__":
    main()
