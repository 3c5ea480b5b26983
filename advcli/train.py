"""``advcli train``: min-max adversarial training, min_theta E max_{delta in S} L(f_theta(x + delta), y).

The config becomes objects at the top of `train`; below it the loop works on plain values:
for each batch the training attack maximises the loss inside the threat model, the optimiser
minimises the loss on the perturbed batch. Each epoch ends with a robust check on a held-out slice
of the training split (watch it for catastrophic overfitting) and an atomic checkpoint; the run
ends by evaluating the final model on the test set against every evaluation attack.

Run ``python -m advcli.train`` or ``advcli train`` with Hydra overrides, e.g. ``attack=pgd eps=8/255``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from advcli import attacks, checkpoint, config, data, report, runtime
from advcli.attacks import Attack
from advcli.errors import UserError, run_guarded
from advcli.evaluate import evaluate, evaluation_attacks, output_dir, prepare_model
from advcli.models import uses_batchnorm

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: ``constant``; ``onecycle`` (linear up to lr over the first
    half, then down to 0: the cyclic schedule of Wong et al. 2020); ``cosine`` (down to 0)."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "onecycle":
        half = max(1, total_steps // 2)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: step / half if step < half else max(0.0, (total_steps - step) / max(1, total_steps - half)))
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    raise ValueError(f"unknown lr schedule {name!r}")


def train_epoch(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], attack: Attack, *,
                eps: float, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                amp_dtype: torch.dtype | None, attack_mode: str = "train", epoch: int = 1,
                warmup_steps: int = 0, steps_done: int = 0,
                total: int | None = None, progress: bool = True, log_every: int = 20) -> dict[str, float]:
    """One pass of min-max training over ``loader``; returns the mean adversarial loss and accuracy.

    With ``warmup_steps`` the training eps grows linearly from 0 to ``eps`` over that many optimiser
    steps (``steps_done`` were taken in earlier epochs): at a large eps (0.3 on MNIST) a model trained
    at full strength from the first step often never leaves chance accuracy.

    Metrics accumulate on the device; the host reads them only every ``log_every`` batches (for the
    progress bar and the divergence check) and at the end, so the step itself never waits on a sync.
    """
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for batch, (x, y) in enumerate(bar, start=1):
        if attack_mode == "eval":
            model.eval()  # BatchNorm uses running statistics while the attack searches
        step_eps = eps * min(1.0, (steps_done + batch) / warmup_steps) if warmup_steps else eps
        with runtime.autocast(device, amp_dtype):
            x_adv = attack(model, x, y, step_eps)
        model.train()
        with runtime.autocast(device, amp_dtype):
            logits = model(x_adv)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen += y.shape[0]
        if batch % log_every == 0 or batch == total:
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(
                    f"Training diverged in epoch {epoch} (loss became {mean_loss} by batch {batch}). The learning "
                    f"rate (lr={optimizer.param_groups[0]['lr']:.3g} now) is the usual cause; a large eps "
                    f"(eps={eps:.4g}) can also push the loss up faster than training can follow. Lower lr, or "
                    "use amp=off if it happened under fp16. The last completed epoch's checkpoint is intact."
                )
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{correct.item() / seen:.2%}")
    bar.close()
    mean_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"Training diverged in epoch {epoch}: the mean loss is {mean_loss}. Lower lr or eps.")
    return {"train_loss": mean_loss, "train_acc": correct.item() / max(seen, 1)}


def capture_rng() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, checkpoint every epoch, evaluate on the test set; returns metrics.json's dict."""
    started = time.perf_counter()
    dataset = config.dataset_choice(cfg.dataset)
    info = data.dataset_info(dataset.name, **dataset.options)
    s = config.run_settings(cfg, dim=info.in_channels * info.image_size**2)  # every value checked before any work
    config.check_training(cfg)
    out = output_dir(cfg)
    device = runtime.resolve_device(cfg.device)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    eval_amp_dtype = runtime.resolve_amp(cfg.evaluation.amp, device)
    log.info("device %s, %s, eps %s (%s), run directory %s", device, runtime.describe_precision(amp_dtype),
             config.format_eps(s.eps), s.norm, out)
    runtime.seed_everything(cfg.seed)

    train_full = data.load_split(dataset.name, "train", root=s.data_root, download=cfg.data.download, **dataset.options)
    test_set = data.load_split(dataset.name, "test", root=s.data_root, download=cfg.data.download, **dataset.options)
    # the robust check each epoch uses a held-out slice of the training split, never the test set
    n_val = min(int(cfg.data.val_size), len(train_full) // 10)
    train_set = train_full.subset(slice(0, len(train_full) - n_val))
    val_set = train_full.subset(slice(len(train_full) - n_val, len(train_full)))
    if cfg.data.train_size is not None:
        train_set = train_set.subset(slice(0, int(cfg.data.train_size)))
    if s.num_test is not None:
        test_set = test_set.subset(slice(0, s.num_test))
    train_set, val_set, test_set = train_set.to(device), val_set.to(device), test_set.to(device)
    model_options = OmegaConf.to_container(cfg.model, resolve=True)
    model_name = model_options.pop("name")

    spec = checkpoint.model_spec(model_name, model_options, in_channels=info.in_channels,
                                 image_size=info.image_size, num_classes=info.num_classes, mean=info.mean, std=info.std)
    model = checkpoint.build_from_spec(spec)
    model, channels_last = prepare_model(model, device, cfg.channels_last)
    net = torch.compile(model) if cfg.compile else model

    optimizer = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    steps_per_epoch = data.num_batches(len(train_set), cfg.batch_size, drop_last=False)
    scheduler = lr_schedule(cfg.lr_schedule, optimizer, total_steps=cfg.epochs * steps_per_epoch)
    warmup_steps = round(float(cfg.eps_warmup) * steps_per_epoch)
    scaler = runtime.grad_scaler(device, amp_dtype)
    train_attack = hydra.utils.instantiate(cfg.attack)
    val_attacks = {"clean": attacks.none, "pgd": hydra.utils.instantiate(cfg.validation.attack)}
    if cfg.attack_mode == "eval" and uses_batchnorm(model):
        log.info("the training attack runs with BatchNorm in eval mode (attack_mode=eval)")

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if cfg.resume:
        payload = checkpoint.load(cfg.resume)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        start_epoch, history = payload["epoch"], list(payload["history"])
        restore_rng(payload["rng"])
        log.info("resumed from %s after epoch %d", cfg.resume, start_epoch)

    ckpt_path = out / "checkpoint.pt"
    train_time = sum(entry["time_s"] for entry in history)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # an epoch's order depends on (seed, epoch) only
        loader = data.batches(train_set, cfg.batch_size, shuffle=True, generator=order, crop_padding=dataset.crop_padding,
                              flip=dataset.flip, channels_last=channels_last)
        model.train()
        entry: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        entry.update(train_epoch(net, loader, train_attack, eps=s.eps, optimizer=optimizer, scheduler=scheduler,
                                 warmup_steps=warmup_steps, steps_done=(epoch - 1) * steps_per_epoch,
                                 scaler=scaler, amp_dtype=amp_dtype, attack_mode=cfg.attack_mode, epoch=epoch,
                                 total=steps_per_epoch, progress=cfg.progress, log_every=cfg.log_every))
        entry["time_s"] = time.perf_counter() - epoch_start
        train_time += entry["time_s"]
        if len(val_set):
            val = evaluate(model, data.batches(val_set, s.eval_batch_size, channels_last=channels_last), val_attacks,
                           eps=s.eps, amp_dtype=amp_dtype)
            entry.update({f"val_{name}_acc": val[name]["acc"] for name in val_attacks})
        history.append(entry)
        log.info(report.epoch_line(entry, cfg.epochs))
        checkpoint.save(ckpt_path, {
            "model": model.state_dict(), "model_spec": spec, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "rng": capture_rng(), "history": history, "config": OmegaConf.to_container(cfg, resolve=True),
        })

    eval_start = time.perf_counter()
    test_attacks, described = evaluation_attacks(cfg.evaluation.attacks)
    results = evaluate(model, data.batches(test_set, s.eval_batch_size, channels_last=channels_last), test_attacks,
                       eps=s.eps, amp_dtype=eval_amp_dtype, progress=cfg.progress, desc="test",
                       total=data.num_batches(len(test_set), s.eval_batch_size))
    for name in described:
        results[name].update(described[name])
    metrics = {
        "command": "train", "dataset": dataset.name, "model": cfg.model.name,
        "attack": cfg.attack._target_.rsplit(".", 1)[-1], "eps": s.eps, "eps_text": s.eps_text,
        "eps_255": s.eps * 255, "norm": s.norm, "restarts": s.restarts, "epochs": cfg.epochs, "seed": cfg.seed,
        "num_train": len(train_set), "num_test": len(test_set), "test": results, "history": history,
        "train_time_s": train_time, "eval_time_s": time.perf_counter() - eval_start,
        "wall_time_s": time.perf_counter() - started, "device": str(device),
        "precision": runtime.describe_precision(amp_dtype), "torch": torch.__version__,
        "checkpoint": str(ckpt_path),
    }
    report.write_json(out / "metrics.json", metrics)
    print(f"\n{dataset.name} / {cfg.model.name}, trained with {metrics['attack']} for {cfg.epochs} epoch(s); "
          f"test set ({len(test_set)} examples):\n{report.results_table(results, eps=s.eps, norm=s.norm)}\n"
          f"train {train_time:.1f}s, eval {metrics['eval_time_s']:.1f}s; wrote {out / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the final PGD robust accuracy, so Hydra sweepers can optimise it."""
    metrics = run_guarded(train, cfg)
    return metrics["test"].get("pgd", metrics["test"]["clean"])["acc"]


if __name__ == "__main__":
    main()
