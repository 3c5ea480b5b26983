"""``advcli train``: min-max adversarial training, min_theta E max_{delta in S} L(f_theta(x + delta), y).

The config becomes objects at the top of `train`; below it the loop works on plain values:
for each batch the training attack maximises the loss inside the threat model, the optimiser
minimises the loss on the perturbed batch. Each epoch ends with a robust check on a held-out slice
of the training split (watch it for catastrophic overfitting) and an atomic checkpoint
(``checkpoint.pt``, plus ``best.pt`` for the best held-out robust accuracy); the run ends by
evaluating the final model on the test set against every evaluation attack.

No finished work is lost: SIGINT/SIGTERM finish the current batch and save a mid-epoch checkpoint,
and running the same command again in the same run directory (or with ``resume=PATH``) continues
exactly where the run stopped.

Run ``python -m advcli.train`` or ``advcli train`` with Hydra overrides, e.g. ``attack=pgd eps=8/255``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from advcli import attacks, checkpoint, config, data, distributed, report, runtime
from advcli.errors import ConfigError, UserError, run_guarded
from advcli.evaluate import evaluate, evaluate_model, evaluation_attack_configs, output_dir, prepare_model
from advcli.objectives import Step
from advcli.models import uses_batchnorm

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                peak: float = 0.5) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: ``constant``; ``onecycle`` (linear up to lr at the fraction
    ``peak`` of training, then down to 0: the cyclic schedule of Wong et al. 2020, who peak at 0.4 on
    MNIST and 0.5 on CIFAR-10); ``cosine`` (down to 0)."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "onecycle":
        half = max(1, round(total_steps * peak))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: step / half if step < half else max(0.0, (total_steps - step) / max(1, total_steps - half)))
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    raise ValueError(f"unknown lr schedule {name!r}")


@dataclass
class EpochProgress:
    """Running totals of one epoch, on the device; saved in a mid-epoch checkpoint."""

    batches: int = 0                    # batches done so far in this epoch
    seen: int = 0                       # examples done so far
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0     # of `judged` outputs (two per example for trainer=adv_class)
    judged: int = 0
    first_bad_batch: torch.Tensor | int = -1  # first batch whose loss was NaN/inf (-1: none)
    time_s: float = 0.0                 # training time spent in this epoch before an interruption
    finished: bool = False

    def to_plain(self) -> dict[str, Any]:
        return {"batches": self.batches, "seen": self.seen, "loss_sum": float(self.loss_sum),
                "correct": int(self.correct), "judged": self.judged, "time_s": self.time_s}


class StopRequests:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current batch (a second
    Ctrl-C stops at once). Signal handlers can only be set from the main thread; elsewhere (some
    Hydra launchers) this does nothing and the default handlers stay."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing this batch and saving a checkpoint (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def __call__(self) -> bool:
        return self.signum is not None


def train_epoch(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                objective: Callable[..., Step], *,
                eps: float, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                amp_dtype: torch.dtype | None, attack_mode: str = "train", epoch: int = 1,
                warmup_steps: int = 0, steps_done: int = 0, progress_state: EpochProgress | None = None,
                should_stop: Callable[[], bool] = lambda: False, global_batch_size: Callable[[int], int] | None = None,
                total: int | None = None, progress: bool = True, log_every: int = 20) -> EpochProgress:
    """One pass of training over ``loader`` (or its rest, continuing ``progress_state``): per batch the
    ``objective`` (`advcli.objectives`, e.g. ``MinMax(attack)``) runs its attack and returns per-example
    losses, and the optimiser takes one step on their mean over the (global) batch.

    Under torchrun ``model`` is wrapped in DistributedDataParallel and ``loader`` yields this rank's
    share of each global batch; ``global_batch_size(k)`` says how many examples global batch k (from 1)
    holds over all ranks, and each rank's loss is scaled by world / that, so that DDP's average of the
    ranks' gradients is the gradient of the global batch mean whatever the shares' sizes (with no extra
    communication). The epoch's totals are summed over the ranks at the end.

    With ``warmup_steps`` the training eps grows linearly from 0 to ``eps`` over that many optimiser
    steps (``steps_done`` were taken before this epoch): at a large eps (0.3 on MNIST) a model
    trained at full strength from the first step often never leaves chance accuracy.

    Metrics accumulate on the device; the host reads them only every ``log_every`` batches (progress
    bar and divergence check), so the step itself never waits on a sync. Returns the epoch's
    progress, ``finished`` False when ``should_stop()`` ended it early.
    """
    device = next(model.parameters()).device
    state = progress_state or EpochProgress()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    first_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    # running sums, summed over the ranks at the end; a resumed epoch's earlier totals (``state``, already over
    # all ranks) start rank 0's, so that they are counted once and a resumed run adds up exactly as an unbroken one
    loss_sum = torch.as_tensor(state.loss_sum if first_rank else 0.0, dtype=torch.float32, device=device)
    correct = torch.as_tensor(state.correct if first_rank else 0, dtype=torch.long, device=device)
    first_bad = torch.as_tensor(state.first_bad_batch, dtype=torch.long, device=device)
    seen, judged, batch, stopped = 0, 0, state.batches, False  # this call's examples, this rank's
    bar = tqdm(loader, total=total, initial=state.batches, desc=f"epoch {epoch}", leave=False,
               disable=not progress, dynamic_ncols=True)

    def check(batch: int) -> float:
        mean_loss = loss_sum.item() / max(state.seen + seen, 1)  # rank 0's view, for the progress bar
        bad = int(distributed.largest(first_bad).item())  # with several ranks: the latest rank's
        if bad >= 0:
            raise TrainingDiverged(
                f"Training diverged: the loss became NaN or infinite in epoch {epoch} at batch {bad}. The learning "
                f"rate (lr={optimizer.param_groups[0]['lr']:.3g} at that point) is the usual cause; a large eps "
                f"(eps={eps:.4g}) can also push the loss up faster than training can follow. Lower lr (or use "
                "amp=off if this happened under fp16). The checkpoint of the last completed epoch, if any, is intact."
            )
        return mean_loss

    for batch, (x, y) in enumerate(bar, start=state.batches + 1):
        if attack_mode == "eval":
            model.eval()  # BatchNorm uses running statistics while the attack searches
        step_eps = eps * min(1.0, (steps_done + batch) / warmup_steps) if warmup_steps else eps
        with runtime.autocast(device, amp_dtype):
            step = objective(model, x, y, step_eps)
        if world > 1:  # DDP averages the ranks' gradients: scale so the average is the global batch mean
            loss = step.loss.sum() * (world / global_batch_size(batch))
        else:
            loss = step.loss.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        local_sum = step.loss.detach().sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(local_sum), batch, first_bad)
        loss_sum += local_sum
        correct += (step.logits.detach().argmax(dim=1) == step.targets).sum()
        seen += y.shape[0]
        judged += step.targets.shape[0]
        if batch % log_every == 0 or batch == total:
            acc = correct.item() / max(state.judged + judged, 1)
            bar.set_postfix(loss=f"{check(batch):.4f}", acc=f"{acc:.2%}")
        if should_stop():
            stopped = True
            break
    bar.close()
    check(batch)
    finished = not stopped or batch == total
    if world > 1:
        counts = distributed.total(torch.tensor([seen, judged], device=device)).tolist()
        loss_sum, correct, (seen, judged) = distributed.total(loss_sum), distributed.total(correct), counts
    return EpochProgress(batches=batch, seen=state.seen + seen, loss_sum=loss_sum.item(), correct=int(correct.item()),
                         judged=state.judged + judged, time_s=state.time_s, finished=finished)


def overfitting(history: list[dict[str, Any]], guard: Any) -> dict[str, Any] | None:
    """Catastrophic overfitting (Wong et al. 2020): held-out PGD accuracy collapsing while training goes on.

    Returns what happened when the latest epoch's PGD accuracy fell more than ``guard.drop`` (absolute)
    below the best so far, else None; logs a warning saying what the guard does about it.
    """
    scores = [entry["val_pgd_acc"] for entry in history if "val_pgd_acc" in entry]
    if guard.action == "off" or len(scores) < 2:
        return None
    best = max(scores)
    if best - scores[-1] <= guard.drop:
        return None
    best_epoch = next(entry["epoch"] for entry in history if entry.get("val_pgd_acc") == best)
    action = {"rollback": f"rolling back to epoch {best_epoch} (best.pt) and stopping",
              "stop": "stopping with the last weights", "warn": "going on (overfit_guard.action=warn)"}[guard.action]
    log.warning("catastrophic overfitting: held-out PGD accuracy fell from %.2f%% (epoch %d) to %.2f%% (epoch %d); %s",
                100 * best, best_epoch, 100 * scores[-1], history[-1]["epoch"], action)
    return {"triggered": True, "epoch": history[-1]["epoch"], "best_epoch": best_epoch, "best_val_pgd_acc": best,
            "val_pgd_acc": scores[-1], "action": guard.action}


def never_robust(history: list[dict[str, Any]], attack: str, *, floor: float = 0.05,
                 adversarial_class: bool = False) -> str | None:
    """A warning when adversarial training never bought held-out robustness: PGD accuracy at or below ``floor``
    in every epoch while the model learned the clean task. `overfitting` cannot see this (nothing to fall from),
    and it is how FGSM training that overfits from its first epochs looks."""
    scores = [entry["val_pgd_acc"] for entry in history if "val_pgd_acc" in entry]
    if attack == "none" or not scores or max(scores) > floor or history[-1].get("val_clean_acc", 0.0) < 0.5:
        return None
    if adversarial_class:  # trainer=adv_class: the flag stops the blind attack, and the adaptive one walks around it
        message = (f"held-out PGD accuracy with rejection never rose above {100 * max(scores):.1f}% in {len(scores)} "
                   f"epoch(s) (held-out clean {100 * history[-1]['val_clean_acc']:.1f}%): the adversarial-input output "
                   "flags the training attack's inputs, but an adaptive attack that avoids the flag breaks the model "
                   "(see the pgd_adaptive row). This is the known weakness of the defence, not a training failure.")
    else:
        message = (f"held-out PGD accuracy never rose above {100 * max(scores):.1f}% in {len(scores)} epoch(s) of "
                   f"{attack} training (held-out clean {100 * history[-1]['val_clean_acc']:.1f}%): the training attack is "
                   "not making the model robust (catastrophic overfitting from the start, or an eps this model and "
                   "schedule cannot reach). Try attack=pgd, a lower lr, eps_warmup=1 or more epochs.")
    log.warning(message)
    return message


def capture_rng() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def find_resume_point(cfg: DictConfig, ckpt_path: Path) -> Path | None:
    """The checkpoint to continue from: ``resume=PATH``; with ``resume=auto`` the run directory's own
    checkpoint.pt if there is one (running a command again continues it); ``resume=never``: none."""
    choice = cfg.resume
    if choice in (None, False, "never"):
        return None
    if choice == "auto":
        return ckpt_path if ckpt_path.is_file() else None
    return Path(str(choice))


def check_resumable(payload: dict[str, Any], path: Path, spec: dict[str, Any], dataset: str) -> None:
    """The checkpoint must be of the same model and data as this run."""
    stored = payload.get("model_spec", {})
    if stored != spec or payload.get("config", {}).get("dataset", {}).get("name") != dataset:
        raise checkpoint.CheckpointError(
            f"Cannot resume from {path}: it holds a {stored.get('name')} model for "
            f"{payload.get('config', {}).get('dataset', {}).get('name')} "
            f"({stored.get('num_classes')} classes, {stored.get('in_channels')}x{stored.get('image_size')}x"
            f"{stored.get('image_size')}), but this run builds {spec['name']} for {dataset} ({spec['num_classes']} "
            f"classes, {spec['in_channels']}x{spec['image_size']}x{spec['image_size']}). Use the same model and dataset, "
            "another run directory (hydra.run.dir=...), or resume=never to start over in this one."
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, checkpoint every epoch, evaluate on the test set; returns metrics.json's dict."""
    started = time.perf_counter()
    dataset = config.dataset_choice(cfg.dataset)
    info = data.dataset_info(dataset.name, **dataset.options)
    s = config.run_settings(cfg, dim=info.in_channels * info.image_size**2)  # every value checked before any work
    config.check_training(cfg)
    train_attack = hydra.utils.instantiate(cfg.attack)
    objective = hydra.utils.instantiate(cfg.trainer, attack=train_attack)
    attack_name = cfg.attack._target_.rsplit(".", 1)[-1]
    if objective.extra_outputs and attack_name == "none":
        raise ConfigError(f"trainer={trainer_name(cfg)} trains on the training attack's outputs, but attack=none makes "
                          "none. Pick a training attack, e.g. attack=pgd or attack=fgsm attack.random_start=true.")
    ranks = distributed.from_environment()
    device = distributed.start(ranks, runtime.resolve_device(cfg.device))
    try:
        return _train(cfg, ranks, device, dataset, info, s, objective, started)
    finally:
        distributed.stop()


def _train(cfg: DictConfig, ranks: distributed.Ranks, device: torch.device, dataset: config.DatasetChoice,
           info: data.DatasetInfo, s: config.RunSettings, objective: Callable[..., Step],
           started: float) -> dict[str, Any]:
    attack_name = cfg.attack._target_.rsplit(".", 1)[-1]
    main_rank = ranks.is_main
    if not main_rank:  # one log, from rank 0
        logging.getLogger().setLevel(logging.WARNING)
    out = distributed.same_on_all_ranks(output_dir(cfg) if main_rank else None)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    eval_amp_dtype = runtime.resolve_amp(cfg.evaluation.amp, device)
    log.info("device %s, %s, eps %s (%s), run directory %s%s", device, runtime.describe_precision(amp_dtype),
             config.format_eps(s.eps), s.norm, out, f", {ranks.world} processes" if ranks.enabled else "")
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
                                 image_size=info.image_size, num_classes=info.num_classes, mean=info.mean, std=info.std,
                                 adversarial_class=bool(objective.extra_outputs))
    model = checkpoint.build_from_spec(spec)  # the same seed on every rank; DDP also broadcasts rank 0's weights
    model, channels_last = prepare_model(model, device, cfg.channels_last)
    net = distributed.wrap(torch.compile(model) if cfg.compile else model, ranks, device)
    if ranks.enabled:  # the ranks' attacks draw different random starts
        torch.manual_seed(cfg.seed + 1_000_003 * ranks.rank)

    optimizer = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    steps_per_epoch = data.num_batches(len(train_set), cfg.batch_size, drop_last=False)
    scheduler = lr_schedule(cfg.lr_schedule, optimizer, total_steps=cfg.epochs * steps_per_epoch,
                            peak=float(cfg.lr_peak))
    warmup_steps = round(float(cfg.eps_warmup) * steps_per_epoch)
    scaler = runtime.grad_scaler(device, amp_dtype)
    val_attacks = {"clean": attacks.none, "pgd": hydra.utils.instantiate(cfg.validation.attack)}
    if spec["adversarial_class"]:  # the flag counts as a defence only against an attack that tries to avoid it
        val_attacks["pgd_adaptive"] = functools.partial(val_attacks["pgd"], loss="rejection_margin")
    if cfg.attack_mode == "eval" and uses_batchnorm(model):
        log.info("the training attack runs with BatchNorm in eval mode (attack_mode=eval)")

    ckpt_path, best_path = out / "checkpoint.pt", out / "best.pt"
    history: list[dict[str, Any]] = []
    start_epoch, partial, best_score, stopped = 0, None, -math.inf, None
    resume_path = find_resume_point(cfg, ckpt_path)
    if resume_path is not None:
        payload = checkpoint.load(resume_path)
        check_resumable(payload, resume_path, spec, dataset.name)
        try:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            scaler.load_state_dict(payload["scaler"])
        except (KeyError, ValueError, RuntimeError) as error:
            raise checkpoint.CheckpointError(
                f"Cannot resume from {resume_path}: its training state does not fit this run "
                f"({type(error).__name__}: {' '.join(str(error).split())[:200]}). Use the optimizer it was trained "
                "with, or resume=never to start over."
            ) from None
        start_epoch, history = payload["epoch"], list(payload["history"])
        best_score, stopped = payload.get("best_score", -math.inf), payload.get("stopped")
        if payload.get("partial"):
            partial = EpochProgress(**{"judged": payload["partial"]["seen"], **payload["partial"]})
        restore_rng(payload["rng"])
        where = f"epoch {start_epoch + 1}, batch {partial.batches}" if partial else f"the end of epoch {start_epoch}"
        log.info("resuming from %s at %s", resume_path, where)

    def snapshot(epoch_done: int, progress: EpochProgress | None = None) -> dict[str, Any]:
        return {"model": model.state_dict(), "model_spec": spec, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch_done,
                "partial": progress.to_plain() if progress else None, "rng": capture_rng(), "history": history,
                "best_score": best_score, "stopped": stopped, "config": OmegaConf.to_container(cfg, resolve=True)}

    def save(path: Path, payload: dict[str, Any]) -> None:
        if main_rank:  # one writer; the others wait, so that a rollback reads a finished file
            checkpoint.save(path, payload)
        distributed.barrier()

    polls = itertools.count(1)

    def stop_requested(now: bool = False) -> bool:
        """Whether SIGINT/SIGTERM asked to stop. Under torchrun every rank must stop after the same batch, so the
        ranks agree (a collective, and on CUDA a host sync) every `log_every` batches, and whenever ``now``."""
        if not ranks.enabled:
            return stop()
        return (now or next(polls) % cfg.log_every == 0) and distributed.any_rank(stop(), device)

    train_time = sum(entry["time_s"] for entry in history)
    with StopRequests() as stop:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if stopped and cfg.overfit_guard.action in ("rollback", "stop"):
                break
            epoch_start = time.perf_counter()
            order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # an epoch's order depends on (seed, epoch)
            loader = data.batches(train_set, cfg.batch_size, shuffle=True, generator=order, shard=ranks.shard,
                                  crop_padding=dataset.crop_padding, flip=dataset.flip, channels_last=channels_last)
            if partial is not None:  # replay the generator's draws for the batches already done
                loader = itertools.islice(loader, partial.batches, None)
            model.train()
            entry: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
            done = train_epoch(net, loader, objective, eps=s.eps, optimizer=optimizer, scheduler=scheduler,
                               warmup_steps=warmup_steps, steps_done=(epoch - 1) * steps_per_epoch,
                               progress_state=partial, should_stop=stop_requested, scaler=scaler, amp_dtype=amp_dtype,
                               global_batch_size=lambda k: min(cfg.batch_size, len(train_set) - (k - 1) * cfg.batch_size),
                               attack_mode=cfg.attack_mode, epoch=epoch, total=steps_per_epoch,
                               progress=cfg.progress and main_rank, log_every=cfg.log_every)
            partial = None
            done.time_s += time.perf_counter() - epoch_start
            if not done.finished:
                save(ckpt_path, snapshot(epoch - 1, done))
                signum = stop.signum or signal.SIGTERM  # a rank that got no signal stops because another did
                name = signal.Signals(signum).name
                raise Interrupted(
                    f"{name} stopped the run in epoch {epoch} after batch {done.batches} of {steps_per_epoch}; its state "
                    f"is saved in {ckpt_path}. Run the same command again with hydra.run.dir={out} to continue "
                    f"where it stopped (or resume={ckpt_path}).", signum)
            entry.update(train_loss=done.loss_sum / max(done.seen, 1), train_acc=done.correct / max(done.judged, 1),
                         time_s=done.time_s)
            train_time += entry["time_s"]
            if len(val_set):
                val = evaluate(model, data.batches(val_set.subset(data.share(len(val_set), ranks.shard)),
                                                   s.eval_batch_size, channels_last=channels_last),
                               val_attacks, eps=s.eps, amp_dtype=amp_dtype, gather=ranks.enabled,
                               adversarial_class=spec["adversarial_class"])
                entry.update(val_clean_acc=val["clean"]["acc"], val_pgd_acc=val["pgd"]["acc"])
                if spec["adversarial_class"]:  # what the guard and best.pt watch: PGD accuracy with rejection,
                    # the worst of blind and adaptive PGD
                    entry.update(val_pgd_acc=val["any_attack"]["acc_with_rejection"],
                                 val_false_flags=val["clean"]["flagged"])
            history.append(entry)
            log.info(report.epoch_line(entry, cfg.epochs))
            score = entry.get("val_pgd_acc", entry["train_acc"])
            is_best = score >= best_score
            best_score = max(score, best_score)
            save(ckpt_path, snapshot(epoch))
            if is_best:
                save(best_path, snapshot(epoch))
            collapse = overfitting(history, cfg.overfit_guard)
            if collapse:
                stopped = collapse
                if cfg.overfit_guard.action in ("rollback", "stop"):
                    if cfg.overfit_guard.action == "rollback":
                        model.load_state_dict(checkpoint.load(best_path)["model"])
                    save(ckpt_path, snapshot(epoch))  # a rerun sees `stopped` and only evaluates
                    break
            if stop_requested(now=True):  # the signal came during validation or saving: the epoch is complete and saved
                signum = stop.signum or signal.SIGTERM
                raise Interrupted(f"{signal.Signals(signum).name} stopped the run after epoch {epoch}; it is saved "
                                  f"in {ckpt_path}. Run the same command again to continue.", signum)

    warning = never_robust(history, attack_name, adversarial_class=spec["adversarial_class"])
    eval_start = time.perf_counter()
    found = evaluate_model(model, test_set, evaluation_attack_configs(cfg.evaluation, spec),
                           adversarial_class=spec["adversarial_class"],
                           eps_values=[(s.eps, s.eps_text)], norm=s.norm,
                           batch_size=s.eval_batch_size, channels_last=channels_last, amp_dtype=eval_amp_dtype,
                           sanity_cfg=cfg.evaluation.get("sanity"), progress=cfg.progress and main_rank, desc="test",
                           ranks=ranks)
    results = found.results
    metrics = {
        "command": "train", "dataset": dataset.name, "model": model_name, "trainer": trainer_name(cfg),
        "attack": attack_name, "eps": s.eps, "eps_text": s.eps_text,
        "eps_255": s.eps * 255, "norm": s.norm, "restarts": s.restarts, "epochs": cfg.epochs, "seed": cfg.seed,
        "num_train": len(train_set), "num_test": len(test_set), "test": results, "history": history,
        "train_time_s": train_time, "eval_time_s": time.perf_counter() - eval_start,
        "wall_time_s": time.perf_counter() - started, "device": str(device),
        "precision": runtime.describe_precision(amp_dtype), "torch": torch.__version__,
        "checkpoint": str(ckpt_path), "best_checkpoint": str(best_path), "sanity": found.sanity,
        "overfit_guard": stopped or {"triggered": False},
    }
    if warning:
        metrics["warnings"] = [warning]
    if ranks.enabled:
        metrics["processes"] = ranks.world
    if not main_rank:
        return metrics
    report.write_json(out / "metrics.json", metrics)
    if history:
        report.plot_training_curves(out / "training_curves.png", history,
                                    title=f"{model_name} on {dataset.name}, {metrics['attack']} training, eps={s.eps_text}")
    how = metrics["attack"] if metrics["trainer"] == "standard" else f"{metrics['trainer']} ({metrics['attack']})"
    print(f"\n{dataset.name} / {model_name}, trained with {how} for {cfg.epochs} epoch(s); "
          f"test set ({len(test_set)} examples):\n{report.results_table(results, eps=s.eps, norm=s.norm)}\n"
          + (f"{report.sanity_table(found.sanity)}\n" if found.sanity else "") +
          f"train {train_time:.1f}s, eval {metrics['eval_time_s']:.1f}s; wrote {out / 'metrics.json'}"
          + (f" and {out / 'training_curves.png'}" if history else ""))
    return metrics


def trainer_name(cfg: DictConfig) -> str:
    """The ``trainer=`` choice (standard, trades, adv_class), also where Hydra did not compose the config."""
    names = {"MinMax": "standard", "Trades": "trades", "AdversarialClass": "adv_class"}
    target = cfg.trainer._target_.rsplit(".", 1)[-1] if "trainer" in cfg else "MinMax"
    return names.get(target, target)


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the final PGD robust accuracy, so Hydra sweepers can optimise it."""
    metrics = run_guarded(train, cfg)
    return metrics["test"].get("pgd", metrics["test"]["clean"])["acc"]


if __name__ == "__main__":
    main()
