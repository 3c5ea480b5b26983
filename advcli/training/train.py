"""``advcli train``: min-max adversarial training, min_theta E max_{delta in S} L(f_theta(x + delta), y).

`train(cfg)` reads top to bottom as the run's life:

1. **check** every setting before any work, claim the run directory, then **build** the run: data, model,
   optimiser, schedule (`advcli.training.build`: `check_settings`, `run_directory`, `build_run`);
2. **restore** it from its checkpoint when the same run was stopped before (`resume`; a checkpoint of
   another experiment is refused, see `advcli.config.fingerprint`);
3. **fit**: per epoch, train (`advcli.training.epoch.train_epoch`), validate on a held-out slice of the training split,
   save ``checkpoint.pt`` (and ``best.pt``), and watch for catastrophic overfitting;
4. **evaluate** the final model on the test set against every evaluation attack and report.

No finished work is lost: SIGINT/SIGTERM finish the current batch and save a mid-epoch checkpoint, and
running the same command again in the same run directory (or with ``resume=PATH``) continues exactly
where the run stopped; a finished run only shows its results again.

Run ``advcli train`` (or ``python -m advcli train``) with Hydra overrides, e.g. ``attack=pgd eps=8/255``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from advcli import config, data, distributed, runtime
from advcli.evaluation.evaluate import eval_settings, evaluate, evaluate_model, evaluation_attack_configs
from advcli.runs import checkpoint, paths, report, seeds, tracking
# load_data and Choices too: they were defined here before, and callers import them from here
from advcli.training.build import build_run, check_settings, load_data, run_directory, Choices, Run  # noqa: F401
from advcli.training.epoch import mean_lr, train_epoch, EpochProgress
from advcli.training.guards import never_robust, overfitting, StopRequests

log = logging.getLogger(__name__)


# --- 2. restore ------------------------------------------------------------------------------------------

@dataclass
class TrainingState:
    """Where training stands: what a checkpoint holds besides the weights and optimiser states."""

    epoch: int = 0                          # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf           # best held-out robust accuracy so far (best.pt's)
    stopped: dict[str, Any] | None = None   # what the overfitting guard found, if it fired
    partial: EpochProgress | None = None    # an interrupted epoch's progress
    recorded: dict[str, Any] | None = None  # the checkpoint's fingerprint, as its advcli wrote it (old names)

    def done(self, cfg: DictConfig) -> bool:
        """Nothing left to train: every epoch ran, or the overfitting guard ended the run."""
        ended = self.stopped is not None and cfg.overfit_guard.action in ("rollback", "stop")
        return self.epoch >= cfg.epochs or ended


def resume(run: Run) -> TrainingState:
    """The state of the checkpoint this run continues, loaded into the run's objects; a fresh state if none."""
    path = checkpoint.resume_point(run.cfg.resume, run.out / "checkpoint.pt")
    if path is None:
        return TrainingState()
    payload = checkpoint.load(path)
    checkpoint.check_same_run(payload, path, run.fingerprint)
    checkpoint.check_same_model(payload, path, run.spec)
    run.started_from = payload.get("init")  # what the run started from then, not what the path holds now
    checkpoint.check_new_length(payload, path, epochs=run.cfg.epochs, lr_schedule=run.cfg.lr_schedule)
    checkpoint.restore_training(payload, path, model=run.model, optimizer=run.opt.optimizer,
                                scheduler=run.opt.scheduler, scaler=run.opt.scaler)
    restore_average(run, payload)
    # a changed number of epochs: what is left of the schedule stretches to the new length, without a jump
    run.opt.scheduler.lr_lambdas[0].stretch(run.opt.scheduler.last_epoch, run.cfg.epochs * run.steps_per_epoch)
    if not checkpoint.restore_rank_rng(payload["rng"], run.ranks.rank, run.ranks.world):
        log.warning("the checkpoint was written by %d process(es), this run has %d: the random draws from here on "
                    "differ from those of an unbroken run", len(payload["rng"]), run.ranks.world)
        torch.manual_seed(run.cfg.seed + payload["epoch"] + 1_000_003 * run.ranks.rank)
    state = TrainingState(epoch=payload["epoch"], history=list(payload["history"]),
                          best_score=payload["best_score"], stopped=payload["stopped"],
                          partial=EpochProgress(**payload["partial"]) if payload.get("partial") else None,
                          recorded=payload["fingerprint"])
    where = f"epoch {state.epoch + 1}, batch {state.partial.batches}" if state.partial else f"the end of epoch {state.epoch}"
    log.info("resuming from %s at %s", path, where)
    return state


def restore_average(run: Run, payload: dict[str, Any]) -> None:
    """With ``ema.decay``: the checkpoint's ``model`` is the average (what eval and viz load), ``train_model``
    the weights training continues from."""
    if run.opt.ema is not None:
        run.opt.ema.module.load_state_dict(payload["model"])
        run.opt.ema.n_averaged.fill_(payload["ema_updates"])


def snapshot(run: Run, state: TrainingState, progress: EpochProgress | None = None) -> dict[str, Any]:
    """What a checkpoint holds (every rank calls it: the random states are gathered from all of them)."""
    opt = run.opt
    averaged = {} if opt.ema is None else {"train_model": run.model.state_dict(),
                                           "ema_updates": int(opt.ema.n_averaged)}
    return {"model": run.eval_model.state_dict(), **averaged, "model_spec": run.spec,
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(), "epoch": state.epoch,
            "partial": progress.to_plain() if progress else None,
            "rng": distributed.every_rank(checkpoint.capture_rng()), "history": state.history,
            "best_score": state.best_score, "stopped": state.stopped, "config": config.plain(run.cfg),
            "init": run.started_from,
            "fingerprint": run.fingerprint}


def save(run: Run, path: Path, payload: dict[str, Any]) -> None:
    if run.ranks.is_main:  # one writer; the others wait, so that a rollback reads a finished file
        checkpoint.save(path, payload)
    distributed.barrier()


# --- 3. fit ----------------------------------------------------------------------------------------------

def epoch_batches(run: Run, epoch: int, partial: EpochProgress | None):
    """The epoch's batches, in an order that depends on (seed, epoch) only; a resumed epoch skips those done."""
    order = torch.Generator().manual_seed(run.cfg.seed * 100_003 + epoch)
    loader = data.batches(run.train_set, run.cfg.batch_size, shuffle=True, generator=order, shard=run.ranks.shard,
                          crop_padding=run.choices.dataset.crop_padding, flip=run.choices.dataset.flip,
                          channels_last=run.channels_last)
    return itertools.islice(loader, partial.batches, None) if partial else loader  # replays the crop/flip draws


def validate(run: Run) -> dict[str, float]:
    """Clean and robust accuracy (under validation.attack) on the held-out slice, in the evaluation's precision
    and random stream."""
    if not len(run.val_set):
        return {}
    s = run.choices.settings
    share = run.val_set.subset(data.share(len(run.val_set), run.ranks.shard))
    with runtime.seeded(int(run.cfg.evaluation.seed) + run.ranks.rank, run.val_set.images.device):
        val = evaluate(run.eval_model, data.batches(share, s.eval_batch_size, channels_last=run.channels_last),
                       run.val_attacks, eps=s.eps, amp_dtype=run.eval_amp_dtype, gather=run.ranks.enabled,
                       adversarial_class=run.adversarial_class)
    entry = {"val_clean_acc": val["clean"]["acc"], "val_robust_acc": val["robust"]["acc"]}
    if run.adversarial_class:  # what the guard and best.pt watch: with rejection, the worst of blind and adaptive
        entry.update(val_robust_acc=val["any_attack"]["acc_with_rejection"], val_false_flags=val["clean"]["flagged"])
    return entry


def fit(run: Run, state: TrainingState) -> None:
    """Train the epochs that are left; a signal saves a checkpoint and raises `Interrupted`."""
    with StopRequests() as stop:
        should_stop = stop.poll(run.ranks, run.train_set.images.device, run.cfg.log_every)
        for epoch in range(state.epoch + 1, run.cfg.epochs + 1):
            if state.done(run.cfg):
                break
            fit_epoch(run, state, epoch, stop, should_stop)


def fit_epoch(run: Run, state: TrainingState, epoch: int, stop: StopRequests, should_stop: Callable[..., bool]) -> None:
    """One epoch: train, validate, save, guard."""
    started = time.perf_counter()
    run.model.train()
    done = train_epoch(run.net, epoch_batches(run, epoch, state.partial), run.choices.objective, run.opt,
                       run.epoch_plan(epoch), resume_from=state.partial, should_stop=should_stop)
    state.partial = None
    done.time_s += time.perf_counter() - started
    ckpt_path = run.out / "checkpoint.pt"
    if not done.finished:
        save(run, ckpt_path, snapshot(run, state, done))
        raise stop.interrupted(
            f"stopped the run in epoch {epoch} after batch {done.batches} of {run.steps_per_epoch}; its state is saved "
            f"in {ckpt_path}. Run the same command again with hydra.run.dir={run.out} to continue where it stopped "
            f"(or resume={ckpt_path}).")
    # lr: the rate when the epoch began (the trackers' train/lr); lr_mean: what it trained with, as printed
    entry = {"epoch": epoch, "lr": done.lr, "lr_mean": mean_lr(run.opt.scheduler, (epoch - 1) * run.steps_per_epoch,
                                                               run.steps_per_epoch),
             "train_loss": done.loss_sum / max(done.seen, 1),
             "train_acc": done.correct / max(done.judged, 1), "time_s": done.time_s, **validate(run)}
    state.history.append(entry)
    state.epoch = epoch
    log.info(report.epoch_line(entry, run.cfg.epochs))
    score = entry.get("val_robust_acc", entry["train_acc"])
    is_best, state.best_score = score >= state.best_score, max(score, state.best_score)
    save(run, ckpt_path, snapshot(run, state))
    run.tracker.log_epoch(entry)  # after the save: a resumed run never logs an epoch twice
    if run.cfg.get("keep_epochs"):
        save(run, run.out / f"epoch_{epoch}.pt", snapshot(run, state))
    if is_best:
        save(run, run.out / "best.pt", snapshot(run, state))
    if guard(run, state):
        return
    if should_stop(now=True):  # the signal came during validation or saving: the epoch is complete and saved
        raise stop.interrupted(f"stopped the run after epoch {epoch}; it is saved in {ckpt_path}. Run the same "
                               "command again to continue.")


def guard(run: Run, state: TrainingState) -> bool:
    """The catastrophic-overfitting guard: True when it ended the run (rolled back to best.pt, or stopped)."""
    collapse = overfitting(state.history, run.cfg.overfit_guard)
    if not collapse:
        return False
    state.stopped = collapse
    if run.cfg.overfit_guard.action not in ("rollback", "stop"):
        return False
    if run.cfg.overfit_guard.action == "rollback":
        best = checkpoint.load(run.out / "best.pt")
        run.model.load_state_dict(best.get("train_model", best["model"]))
        restore_average(run, best)
    save(run, run.out / "checkpoint.pt", snapshot(run, state))  # a rerun sees `stopped` and only evaluates
    return True


# --- 4. evaluate and report ----------------------------------------------------------------------------

def final_evaluation(run: Run, state: TrainingState, started: float) -> dict[str, Any]:
    """The final model on the test set against every evaluation attack; metrics.json, the table, the curves."""
    cfg, s, c = run.cfg, run.choices.settings, run.choices
    awp_gamma, awp_warmup = config.awp_settings(cfg)
    warning = never_robust(state.history, c.attack_name, adversarial_class=run.adversarial_class)
    eval_start = time.perf_counter()
    settings = eval_settings(cfg.evaluation, s, amp_dtype=run.eval_amp_dtype, channels_last=run.channels_last,
                             adversarial_class=run.adversarial_class, progress=cfg.progress and run.ranks.is_main)
    found = evaluate_model(run.eval_model, run.test_set, evaluation_attack_configs(cfg.evaluation, run.spec), settings,
                           run.ranks)
    train_time = sum(entry["time_s"] for entry in state.history)
    metrics = {
        "command": "train", "dataset": c.dataset.name, "model": run.spec["name"], "trainer": c.trainer_name,
        "attack": c.attack_name, "attack_settings": settings_of(cfg.attack),
        "trainer_settings": settings_of(cfg.trainer), "eps": s.eps, "eps_text": s.eps_text,
        "eps_255": s.eps * 255, "norm": s.norm, "restarts": s.restarts, "epochs": cfg.epochs,
        "epochs_trained": state.epoch, "seed": cfg.seed, "num_train": len(run.train_set), "num_test": len(run.test_set),
        "examples": examples_used(run),
        "ema_decay": cfg.ema.decay,  # not null: the results are the EMA of the weights'
        "awp_gamma": awp_gamma, "awp_warmup": awp_warmup,  # adversarial weight perturbation (gamma 0: off)
        "init": run.started_from,    # not null: fine-tuned from these weights
        "evaluation": settings.preset, "cascade": settings.cascade, "test": found.results, "history": state.history,
        "train_time_s": train_time,
        "eval_time_s": time.perf_counter() - eval_start, "wall_time_s": time.perf_counter() - started,
        "attack_time_s": found.attack_time_s, "sanity_time_s": found.sanity_time_s,  # as advcli eval records them
        "device": str(run.test_set.images.device), "precision": run.fingerprint["amp"], "torch": torch.__version__,
        "checkpoint": str(run.out / "checkpoint.pt"), "best_checkpoint": str(run.out / "best.pt"),
        "sanity": found.sanity, "overfit_guard": state.stopped or {"triggered": False},
        "fingerprint": config.fingerprint_id(run.fingerprint),
        "settings_id": seeds.settings_id(cfg),  # the same for runs that differ only in their seed
    }
    if warning:
        metrics["warnings"] = [warning]
    if run.ranks.enabled:
        metrics["processes"] = run.ranks.world
    if run.ranks.is_main:
        write_report(run, metrics)
    return metrics


def examples_used(run: Run) -> str:
    """Which images the run trained, held out and was evaluated on, in words (metrics.json's ``examples``)."""
    dataset = run.choices.dataset
    order = data.split_order(dataset.name, **dataset.options)
    return (f"evaluated on the first {len(run.test_set)} images of the test split; trained on the first "
            f"{len(run.train_set)} of the training split, the last {len(run.val_set)} of it held out; both splits in "
            f"{order}")


def settings_of(node: Any) -> dict[str, Any]:
    """An attack's or objective's hyper-parameters as plain data (its name is recorded beside them)."""
    return {k: v for k, v in config.plain(node).items() if not k.startswith("_") and k != "name"}


def write_report(run: Run, metrics: dict[str, Any]) -> None:
    """metrics.json, training_curves.png and the printed table (rank 0)."""
    out, s = run.out, run.choices.settings
    report.write_json(out / "metrics.json", metrics)
    if metrics["history"]:
        report.plot_training_curves(out / "training_curves.png", metrics["history"],
                                    title=f"{metrics['model']} on {metrics['dataset']}, {metrics['attack']} training, "
                                          f"eps={s.eps_text}")
    print(report.training_results(metrics) + f"; wrote {out / 'metrics.json'}"
          + (f" and {out / 'training_curves.png'}" if metrics["history"] else ""))
    run.tracker.log_results(metrics, out)


def finished_results(run: Run, state: TrainingState) -> dict[str, Any] | None:
    """The results of this very run when it already finished here (same settings): shown again, not recomputed.

    metrics.json is written anew (the same results), so that a re-run sweep counts it as this job's result.
    """
    path = run.out / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = {config.fingerprint_id(run.fingerprint)}
    if state.recorded and not config.fingerprint_changes(state.recorded, run.fingerprint):
        same.add(config.fingerprint_id(state.recorded))  # the same settings, recorded under an older name
    if metrics.get("fingerprint") not in same:
        return None
    log.info("this run already finished in %s with the same settings: its results, not a new evaluation", run.out)
    if run.ranks.is_main:
        report.write_json(path, metrics)
        print(report.training_results(metrics) + f"; results in {path}")
    return metrics


# --- the command ---------------------------------------------------------------------------------------

def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, checkpoint every epoch, evaluate on the test set; returns metrics.json's dict."""
    started = time.perf_counter()
    choices = check_settings(cfg)
    with distributed.joined(runtime.resolve_device(cfg.device)) as (ranks, device):
        out = run_directory(cfg, ranks)
        try:
            return train_run(build_run(cfg, choices, ranks, device, out), started)
        finally:
            paths.release(out)  # the directory is free for the next command in this process (rank 0 held it)


def train_run(run: Run, started: float) -> dict[str, Any]:
    """Resume, fit and evaluate a built run; a finished one shows its results."""
    state = resume(run)
    if state.done(run.cfg) and (results := finished_results(run, state)) is not None:
        return results
    with tracking.tracked(run.cfg, run.out, command="train", continuing=bool(state.epoch or state.partial),
                          enabled=run.ranks.is_main) as run.tracker:
        fit(run, state)
        return final_evaluation(run, state, started)
