"""What advcli does on a CUDA GPU, in one run of at most ~8 minutes: a table of what ran, its figures and whether it
worked. It prints times, it never asserts one.

    python bench/gpu_check.py                # on a machine with an NVIDIA GPU
    python bench/gpu_check.py --budget 300   # a shorter run: the rows that would not fit are reported as timed out

Rows:

- ``train``: the default recipe (`advcli train`: small_cnn_wide, PGD-5, 7 epochs, EMA; amp=auto -> bf16 on CUDA,
  channels_last=auto -> on), with ``compile=false`` (its final evaluation is the default one, on the first 1,000
  test images) and with ``compile=true`` (the quick evaluation, for its training time);
- ``eval``: ``advcli eval`` of the first run's checkpoint with the default evaluation, which must repeat the
  figures the training run printed;
- ``torchrun``: ``torchrun --standalone --nproc_per_node=1 -m advcli train`` as README "Multi-GPU" says (with one
  process advcli starts no process group), then a one-process NCCL group that runs advcli's training epoch through
  DistributedDataParallel with adversarial weight perturbation (its gradients summed over the ranks);
- ``throughput``: PreActResNet-18 on CIFAR-shaped images, PGD-10 training (eps 8/255, step 2/255, batch 128),
  images per second: a torchattacks.PGD loop (fp32) against advcli's step in fp32 and with its defaults (bf16,
  channels_last), and advcli with awp.gamma=0.005 and with trainer=mart, interleaved like bench/vs_torchattacks.py.
  CIFAR-10 cannot be downloaded on the machines this runs on: the images are advcli's synthetic set at CIFAR's
  shape (3x32x32, 10 classes), which costs what CIFAR-10 costs per image.

The default recipe trains on MNIST from ADVCLI_DATA (default ../shared/data); where MNIST is not there, on the
synthetic set at MNIST's shape and size (1x28x28, 10 classes, 60,000 + 10,000), and the table says so.
Without a GPU it prints that it skipped everything and exits with status 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common import REPO, data_root, describe_machine

from advcli import attacks, data, runtime  # noqa: E402
from advcli.training.epoch import EpochPlan, Optimisation, lr_schedule, train_epoch  # noqa: E402
from advcli.models import build_model  # noqa: E402
from advcli.training.objectives import Mart, MinMax  # noqa: E402

EPS, ALPHA, STEPS, BATCH = 8 / 255, 2 / 255, 10, 128
CIFAR_SHAPE = {"num_classes": 10, "channels": 3, "image_size": 32}
MNIST_SHAPED = ["dataset=synthetic", "dataset.num_train=60000", "dataset.num_test=10000", "dataset.num_classes=10",
                "dataset.image_size=28"]


@dataclass
class Row:
    check: str
    what: str
    result: str
    seconds: float
    ok: bool


def report(row: Row, rows: list[Row]) -> None:
    """Keep the row and print it at once: a run stopped from outside still shows what it did."""
    rows.append(row)
    print(f"[{'ok' if row.ok else 'FAILED'}] {row.check}: {row.what}: {row.result} ({row.seconds:.1f} s)", flush=True)


# --- advcli commands, each in its own process -------------------------------------------------------------

def run_command(args: list[str], timeout: float) -> tuple[bool, str, float]:
    """(finished with status 0, the end of its output or why it did not finish, seconds)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    try:
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s (the budget left for this row)", time.perf_counter() - started
    tail = (done.stdout[-1500:] + done.stderr[-1500:]).strip()
    return done.returncode == 0, tail, time.perf_counter() - started


def last_line(output: str) -> str:
    """What a failed command said last (its error paragraph, or the timeout), less Hydra's hint about tracebacks."""
    text = "\n".join(line for line in output.strip().splitlines() if "HYDRA_FULL_ERROR" not in line).strip()
    return " ".join(text.split("\n\n")[-1].split()) or "failed, with no output"


def advcli_args(command: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "advcli", command, *overrides, "progress=false", "device=cuda"]


def accuracies(metrics: dict) -> str:
    test = metrics["test"]
    return f"clean {100 * test['clean']['acc']:.1f}%, any attack {100 * test['any_attack']['acc']:.1f}%"


def train_rows(out: Path, dataset: list[str], budget: "Budget", rows: list[Row]) -> Path | None:
    """The default recipe with compile off (default evaluation) and on (quick evaluation); the directory of the
    first run when it finished (None when it failed)."""
    variants = [("compile=false", ["compile=false"], 0.45),
                ("compile=true", ["compile=true", "evaluation=fast", "evaluation.sanity.enabled=false"], 0.35)]
    for label, extra, share in variants:
        run_dir = out / label.replace("=", "_")
        ok, tail, seconds = run_command(advcli_args("train", *dataset, *extra, f"output_dir={run_dir}"),
                                        budget.share(share))
        if ok:
            metrics = json.loads((run_dir / "metrics.json").read_text())
            result = (f"{metrics['precision']}, train {metrics['train_time_s']:.1f} s, eval ({metrics['evaluation']}, "
                      f"{metrics['num_test']} images) {metrics['eval_time_s']:.1f} s; {accuracies(metrics)}")
        else:
            result = last_line(tail)
        report(Row("train", f"default recipe, {label}", result, seconds, ok), rows)
    compile_off = out / "compile_false"
    return compile_off if (compile_off / "metrics.json").is_file() else None


def eval_row(run_dir: Path | None, budget: "Budget", rows: list[Row]) -> None:
    """advcli eval of the first run's checkpoint: the default evaluation again, the same figures expected."""
    if run_dir is None:
        report(Row("eval", "default evaluation", "no checkpoint: the compile=false training row failed", 0, False),
               rows)
        return
    trained = json.loads((run_dir / "metrics.json").read_text())
    where = run_dir / "eval"
    ok, tail, seconds = run_command(advcli_args("eval", f"ckpt={run_dir / 'checkpoint.pt'}",
                                                f"evaluation.num_examples={trained['num_test']}",
                                                f"output_dir={where}"), budget.share(0.4))
    result = last_line(tail)
    if ok:
        evaluated = json.loads((where / "metrics.json").read_text())
        ok = evaluated["test"]["any_attack"]["acc"] == trained["test"]["any_attack"]["acc"]
        result = f"{accuracies(evaluated)}; " + ("the same as the training run's" if ok else
                                                 f"DIFFERS from the training run's {accuracies(trained)}")
    report(Row("eval", f"advcli eval, default evaluation, {trained['num_test']} images", result, seconds, ok), rows)


def torchrun_rows(out: Path, dataset: list[str], budget: "Budget", rows: list[Row]) -> None:
    """advcli.training.train under a one-process torchrun, then advcli's epoch in a one-rank NCCL group (DDP, AWP)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    run_dir = out / "torchrun"
    short = ["epochs=1", "data.train_size=10000", "evaluation=fast", "evaluation.num_examples=500",
             "evaluation.sanity.enabled=false", "progress=false", "device=cuda", f"output_dir={run_dir}"]
    ok, tail, seconds = run_command([*torchrun, "-m", "advcli", "train", *dataset, *short], budget.share(0.3))
    result = accuracies(json.loads((run_dir / "metrics.json").read_text())) if ok else last_line(tail)
    report(Row("torchrun", "-m advcli train, 1 epoch of 10,000 images (one process: no process group)",
               result, seconds, ok), rows)
    ok, tail, seconds = run_command([*torchrun, str(Path(__file__).resolve()), "--nccl-worker"], budget.share(0.4))
    lines = [line for line in tail.splitlines() if line.startswith("nccl-worker:")]
    result = lines[-1].removeprefix("nccl-worker: ") if ok and lines else last_line(tail)
    report(Row("torchrun", "NCCL group of 1 rank, DDP, advcli train_epoch (PreActResNet-18, PGD-10, awp.gamma=0.005)",
               result, seconds, ok), rows)


def nccl_worker() -> None:
    """Under torchrun: a one-rank NCCL group, advcli's epoch through DDP with AWP, on synthetic CIFAR-shaped data."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    ddp_epoch(device, "nccl")


def ddp_epoch(device: torch.device, backend: str) -> None:
    """Join the torchrun group with ``backend``, train 10 batches through DDP with AWP; print what happened."""
    import torch.distributed as dist

    dist.init_process_group(backend)
    model, use_cl = runtime.prepare_model(fresh_preact(), device, "auto")
    on_gpu = [device.index] if device.type == "cuda" else None
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=on_gpu)
    images = data.load_split("synthetic", "train", root=None, num_train=10 * BATCH, **CIFAR_SHAPE).to(device)
    opt = advcli_optimisation(model, device, "auto")
    progress = train_epoch(net, data.batches(images, BATCH, channels_last=use_cl), MinMax(pgd10), opt,
                           EpochPlan(eps=EPS, progress_bar=False, log_every=10**9, awp_gamma=0.005,
                                     global_batch_size=lambda k: BATCH))
    total = torch.ones(1, device=device)
    dist.all_reduce(total)
    print(f"nccl-worker: backend {dist.get_backend()}, world {dist.get_world_size()}, all_reduce {total.item():g}, "
          f"{progress.seen} images, train loss {progress.loss_sum / progress.seen:.3f}", flush=True)
    dist.destroy_process_group()


# --- throughput, in this process ------------------------------------------------------------------------

def pgd10(model, x, y, eps):
    return attacks.pgd(model, x, y, eps, alpha=ALPHA, steps=STEPS)


def fresh_preact() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("preact_resnet18", in_channels=3, image_size=32, num_classes=10, mean=(0.5,) * 3,
                       std=(0.25,) * 3)


def advcli_optimisation(model: torch.nn.Module, device: torch.device, amp: str) -> Optimisation:
    amp_dtype = runtime.resolve_amp(amp, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Optimisation(optimizer, lr_schedule("constant", optimizer, total_steps=1),
                        runtime.grad_scaler(device, amp_dtype), amp_dtype)


class TorchattacksLoop:
    """The loop a torchattacks user writes: attack the batch, then one optimiser step on it (fp32)."""

    label = "torchattacks.PGD loop (fp32)"

    def __init__(self, images: data.ImageSet, device: torch.device):
        import torchattacks

        self.model = fresh_preact().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.attack = torchattacks.PGD(self.model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        self.loader = itertools.cycle(list(data.batches(images, BATCH)))

    def run(self, n: int) -> None:
        for x, y in itertools.islice(self.loader, n):
            x_adv = self.attack(x, y)
            self.model.train()
            loss = F.cross_entropy(self.model(x_adv), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()


class AdvcliEpoch:
    """advcli's training epoch (`train_epoch`), fed ``n`` batches at a time."""

    def __init__(self, images: data.ImageSet, device: torch.device, *, amp: str, channels_last, label: str,
                 objective=None, awp_gamma: float = 0.0):
        self.label, self.awp_gamma = label, awp_gamma
        self.objective = objective or MinMax(pgd10)
        self.model, use_cl = runtime.prepare_model(fresh_preact(), device, channels_last)
        self.opt = advcli_optimisation(self.model, device, amp)
        self.loader = itertools.cycle(list(data.batches(images, BATCH, channels_last=use_cl)))

    def run(self, n: int) -> None:
        train_epoch(self.model, itertools.islice(self.loader, n), self.objective, self.opt,
                    EpochPlan(eps=EPS, progress_bar=False, log_every=10**9, attack_mode=self.objective.attack_mode,
                              awp_gamma=self.awp_gamma))


def throughput_variants(images: data.ImageSet, device: torch.device) -> tuple[list, list[Row]]:
    """The variants to time; a torchattacks that is not installed is a row that says so."""
    variants: list = [AdvcliEpoch(images, device, amp="off", channels_last=False, label="advcli, fp32, contiguous"),
                      AdvcliEpoch(images, device, amp="auto", channels_last="auto",
                                  label="advcli, defaults (bf16, channels_last)"),
                      AdvcliEpoch(images, device, amp="auto", channels_last="auto", awp_gamma=0.005,
                                  label="advcli, defaults, awp.gamma=0.005"),
                      AdvcliEpoch(images, device, amp="auto", channels_last="auto", objective=Mart(pgd10),
                                  label="advcli, defaults, trainer=mart")]
    try:
        variants.insert(0, TorchattacksLoop(images, device))
    except ImportError:
        return variants, [Row("throughput", "torchattacks.PGD loop (fp32)",
                              "torchattacks is not installed (pip install torchattacks): no baseline", 0, False)]
    return variants, []


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that it is counted in the variant that queued it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput_rows(batches: int, chunk: int, rows: list[Row], device: torch.device) -> None:
    """Images per second of PGD-10 training, the variants taking turns every ``chunk`` batches."""
    images = data.load_split("synthetic", "train", root=None, num_train=4 * BATCH, **CIFAR_SHAPE).to(device)
    variants, missing = throughput_variants(images, device)
    for row in missing:
        report(row, rows)
    for variant in variants:  # warm-up: cuDNN's algorithm search and lazy initialisation stay out of the times
        variant.run(2)
    seconds = [0.0] * len(variants)
    for round_, start in enumerate(range(0, batches, chunk)):
        n = min(chunk, batches - start)
        for i in ((round_ + j) % len(variants) for j in range(len(variants))):
            torch.manual_seed(round_)
            synchronize(device)
            begin = time.perf_counter()
            variants[i].run(n)
            synchronize(device)
            seconds[i] += time.perf_counter() - begin
    baseline = seconds[0]
    for variant, spent in zip(variants, seconds):
        result = f"{batches * BATCH / spent:,.0f} images/s, {baseline / spent:.2f}x the first row"
        report(Row("throughput", variant.label, result, spent, True), rows)


# --- the run -----------------------------------------------------------------------------------------------

class Budget:
    """The seconds left of the run's budget; a row gets a share of what is left when it starts."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def share(self, fraction: float) -> float:
        return fraction * max(self.deadline - time.perf_counter(), 0)


def print_table(rows: list[Row]) -> None:
    print(f"\n{'check':<11} {'status':<7} {'seconds':>8}  {'what ran':<70} result")
    for row in rows:
        print(f"{row.check:<11} {'ok' if row.ok else 'FAILED':<7} {row.seconds:>8.1f}  {row.what:<70} {row.result}")


def mnist_or_stand_in() -> tuple[list[str], str]:
    """The default recipe's dataset overrides: MNIST where it is on disk, else a synthetic set of its shape."""
    if (Path(data_root()) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return [f"data.root={data_root()}", "data.download=false"], f"MNIST from {data_root()}"
    return MNIST_SHAPED, (f"MNIST is not in {data_root()} (set ADVCLI_DATA): the training rows use synthetic "
                          "MNIST-shaped data (1x28x28, 10 classes, 60,000 + 10,000), so their accuracies say nothing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=420,
                        help="seconds for the whole check (default 420); a command that would overrun it is stopped")
    parser.add_argument("--batches", type=int, default=48, help="timed batches per throughput variant")
    parser.add_argument("--chunk", type=int, default=8, help="batches a variant runs before the next takes its turn")
    parser.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)  # the torchrun row's process
    args = parser.parse_args()
    if args.nccl_worker:
        nccl_worker()
        return 0
    print(describe_machine())
    if not torch.cuda.is_available():
        print(f"gpu_check: SKIPPED, nothing was checked: no CUDA GPU here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). Run it on a machine with an "
              "NVIDIA GPU.")
        return 0
    dataset, source = mnist_or_stand_in()
    print(f"default recipe on {source}; throughput on synthetic CIFAR-shaped images (3x32x32, 10 classes): CIFAR-10 "
          "is not downloaded\n", flush=True)
    rows: list[Row] = []
    budget = Budget(args.budget)
    # first: it takes seconds and needs no subprocess; the advcli commands share what is left of the budget
    throughput_rows(args.batches, args.chunk, rows, torch.device("cuda"))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as out:
        first = train_rows(Path(out), dataset, budget, rows)
        eval_row(first, budget, rows)
        torchrun_rows(Path(out), dataset, budget, rows)
    print_table(rows)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
