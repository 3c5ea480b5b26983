"""On a model whose gradients mislead (FGSM training from a random start on MNIST at eps = 0.3), the default
evaluation reaches standard AutoAttack's number, and the fast one overstates it but says so in its sanity report.
The full-size comparison is bench/eval_vs_autoattack.py."""

from __future__ import annotations

import pytest

from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.training.train import train
from conftest import compose_config

N = 200  # test images
TRAIN = ["experiment=fast_at", "model=small_cnn", "lr_peak=0.4", "eps=0.3", "eps_warmup=1", "epochs=2",
         "data.train_size=10000", "data.val_size=200", "evaluation=fast", "evaluation.num_examples=100",
         "evaluation.sanity.enabled=false", "device=cpu", "progress=false"]


@pytest.mark.slow
def test_default_evaluation_is_within_half_a_point_of_autoattack_where_pgd_is_fooled(tmp_path, real_data_root):
    train(compose_config("train", [*TRAIN, f"data.root={real_data_root}", f"output_dir={tmp_path / 'run'}"]))
    ckpt = tmp_path / "run" / "checkpoint.pt"

    def evaluated(preset: str, *more: str) -> dict:
        return evaluate_checkpoint(compose_config("eval", [
            f"ckpt={ckpt}", f"evaluation={preset}", f"evaluation.num_examples={N}", f"data.root={real_data_root}",
            "device=cpu", "progress=false", f"output_dir={tmp_path / preset}", *more]))

    default = evaluated("default", "evaluation.sanity.enabled=false")["test"]
    fast = evaluated("fast")
    reference = evaluated("autoattack", "evaluation.sanity.enabled=false")["test"]["any_attack"]["acc"]
    ours, pgd20 = default["any_attack"]["acc"], fast["test"]["pgd"]["acc"]
    print(f"\nfirst {N} MNIST test images, eps=0.3: PGD-20 {pgd20:.3f}, fast {fast['test']['any_attack']['acc']:.3f}, "
          f"default {ours:.3f}, standard AutoAttack {reference:.3f}")
    assert pgd20 >= reference + 0.03, "the fixture model should have a gap between PGD and AutoAttack"
    assert ours <= reference + 0.005
    assert default["any_attack"]["n"] == N and default["apgd_t"]["attacked"] <= default["apgd_ce"]["attacked"]
    checks = {check["name"]: check for check in fast["sanity"]["checks"]}
    assert fast["test"]["any_attack"]["acc"] > reference + 0.01 and checks["attack_converged"]["verdict"] == "warn"
