"""Data-parallel training under torchrun (gloo on the CPU): the same weights as one process, one writer,
and the sharded on-device loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from advcli import data
from advcli.data import ImageSet

# Both runs: FGSM without a random start (a deterministic attack, so the only difference between them is
# how the work is split), random crops (their draws must be shared correctly), fp32 (bf16 GEMMs round
# differently at different batch sizes), and a training set whose last batch is uneven. An MLP: in a conv
# net the input gradient's last-bit differences between batch sizes flip the sign of near-zero pixels of
# the FGSM step, and the runs drift apart for reasons that have nothing to do with the split.
COMMON = ["dataset=synthetic", "dataset.num_train=300", "dataset.crop_padding=1", "model=mlp",
          "attack=fgsm", "eps=0.1", "eps_warmup=0", "epochs=2", "batch_size=64", "lr_schedule=constant", "amp=off", "device=cpu",
          "progress=false", "data.val_size=30", "evaluation.num_examples=100", "evaluation.sanity.enabled=false",
          "resume=never", "seed=3", "evaluation=fast"]


def run(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "advcli", "train", *COMMON, f"output_dir={one}"], tmp_path)
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "advcli", "train", *COMMON, f"output_dir={two}"], tmp_path)

    single = torch.load(one / "checkpoint.pt", weights_only=True)
    double = torch.load(two / "checkpoint.pt", weights_only=True)
    assert single["model"].keys() == double["model"].keys()
    print("max |weight difference|, 2 processes vs 1:",
          max((double["model"][k] - w).abs().max().item() for k, w in single["model"].items()))
    for name, weight in single["model"].items():
        torch.testing.assert_close(double["model"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    # one writer: rank 0's files only, and one table printed
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert done.stdout.count("any attack") == 1
    metrics_one, metrics_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert metrics_two["processes"] == 2 and "processes" not in metrics_one
    # the epoch totals are reduced over the ranks: every training example counted once
    for a, b in zip(metrics_one["history"], metrics_two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["train_acc"] == pytest.approx(a["train_acc"])
        assert b["val_clean_acc"] == pytest.approx(a["val_clean_acc"])
    # the sharded, gathered test evaluation: same examples, same clean and FGSM results
    assert metrics_two["num_test"] == metrics_one["num_test"] == 100
    for attack in ("clean", "fgsm"):
        assert metrics_two["test"][attack]["acc"] == pytest.approx(metrics_one["test"][attack]["acc"])

    # advcli eval under torchrun: sharded the same way, one writer, the single-process figures
    evaluated = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                     "advcli", "eval", "evaluation=fast", f"ckpt={one / 'checkpoint.pt'}", "device=cpu", "progress=false",
                     "evaluation.num_examples=100", "evaluation.sanity.enabled=false", f"output_dir={tmp_path / 'eval'}"],
                    tmp_path)
    assert evaluated.stdout.count("any attack") == 1
    metrics_eval = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics_eval["processes"] == 2 and metrics_eval["num_examples"] == 100
    for attack in ("clean", "fgsm"):
        assert metrics_eval["test"][attack]["acc"] == pytest.approx(metrics_one["test"][attack]["acc"])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n, batch_size", [(50, 16), (7, 4), (5, 8)])
def test_shards_of_a_pass_put_together_are_the_unsharded_pass(world, n, batch_size):
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (n, 2, 6, 6), generator=g, dtype=torch.uint8),
                      torch.arange(n, dtype=torch.int64))

    def one_pass(shard):
        order = torch.Generator().manual_seed(7)
        return list(data.batches(images, batch_size, shuffle=True, generator=order, crop_padding=2, flip=True,
                                 shard=shard))

    whole = one_pass(None)
    shards = [one_pass((rank, world)) for rank in range(world)]
    assert all(len(s) == len(whole) for s in shards)  # every rank takes every step, even with an empty share
    for k, (x, y) in enumerate(whole):
        torch.testing.assert_close(torch.cat([s[k][0] for s in shards]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([s[k][1] for s in shards]), y)
        sizes = [len(s[k][1]) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_bad_shard_is_refused():
    images = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="shard"):
        data.batches(images, 2, shard=(2, 2))


def test_sigterm_under_torchrun_stops_every_rank_with_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "advcli", "train", "dataset=synthetic", "dataset.num_train=3000", "model=mlp", "attack=pgd", "eps=0.1",
               "eps_warmup=0", "epochs=4", "batch_size=32", "lr_schedule=constant", "amp=off", "device=cpu", "progress=false", "log_every=2",
               "data.val_size=30", "evaluation.num_examples=50", "evaluation.sanity.enabled=false",
               f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    log = proc.communicate(timeout=120)[0]
    assert log.count("SIGTERM stopped the run") == 1, log[-3000:]  # both ranks stopped; one said so
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)
    assert stopped["epoch"] < 4

    again = run(command, tmp_path)
    assert "resuming from" in again.stdout + again.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2, 3, 4]


def test_two_gloo_ranks_resumed_mid_run_draw_their_own_random_starts_and_end_as_an_unbroken_run(tmp_path):
    # PGD from random starts on both ranks; the second run stops after epoch 1 and is resumed with more epochs
    common = ["dataset=synthetic", "dataset.num_train=300", "model=mlp", "attack=pgd", "attack.steps=2", "eps=0.1",
              "eps_warmup=0", "batch_size=64", "lr_schedule=constant", "amp=off", "device=cpu", "progress=false",
              "data.val_size=30",
              "evaluation.num_examples=100", "evaluation.sanity.enabled=false", "seed=3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "advcli", "train"]
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    run([*torchrun, *common, "epochs=2", f"output_dir={unbroken}"], tmp_path)
    run([*torchrun, *common, "epochs=1", f"output_dir={resumed}"], tmp_path)
    after_one = torch.load(resumed / "checkpoint.pt", weights_only=True)
    states = [rank["torch"] for rank in after_one["rng"]]
    assert len(states) == 2 and not torch.equal(states[0], states[1])  # each rank's own generator is saved
    again = run([*torchrun, *common, "epochs=2", f"output_dir={resumed}"], tmp_path)
    assert "resuming from" in again.stdout + again.stderr

    a = torch.load(unbroken / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    print("max |weight difference|, resumed vs unbroken:",
          max((b["model"][k] - w).abs().max().item() for k, w in a["model"].items()))
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (unbroken, resumed))
    assert [e["train_loss"] for e in metrics_b["history"]] == pytest.approx([e["train_loss"] for e in metrics_a["history"]])


def test_under_torchrun_rank_0_claims_the_run_directory_and_every_rank_leaves_on_a_refusal(tmp_path):
    from conftest import hold_run_directory

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "advcli", "train", *COMMON, "epochs=1", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = hold_run_directory(out)
    try:
        refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in refused.stderr.splitlines() if line.startswith("advcli: error:")]
    assert refused.returncode != 0 and len(errors) == 1 and f"process {holder.pid}" in errors[0], refused.stderr[-3000:]
    run(command, tmp_path)  # the holder gone: both ranks train, rank 0 holding the directory
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
