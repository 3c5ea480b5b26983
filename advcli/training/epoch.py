"""One optimiser step and one pass over the training data: `train_step`, `train_epoch`, the per-step
learning-rate schedule. No config, no files: `advcli.training.train` builds the pieces and calls these.

A step runs the objective (its attack, then the loss on the attack's output; `advcli.training.objectives`), and the
optimiser takes one step on the mean loss over the (global) batch; with adversarial weight perturbation
(``awp.gamma``, `advcli.training.awp`) that loss's gradient is taken at weights pushed up the loss. Metrics accumulate
on the device; the host reads them only every ``log_every`` batches (progress bar and divergence check), so a
step never waits on a sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from advcli import distributed, runtime
from advcli.errors import TrainingDiverged
from advcli.training import awp
from advcli.training.objectives import Examples, Objective, Step


# --- the learning rate, per optimiser step ---------------------------------------------------------

def lr_factor(name: str, step: float, total: int, peak: float = 0.5) -> float:
    """The learning rate at ``step`` of ``total`` as a fraction of ``lr``: ``constant``; ``onecycle`` (linear up
    to 1 at the fraction ``peak`` of training, then down to 0: the cyclic schedule of Wong et al. 2020, who peak
    at 0.4 on MNIST and 0.5 on CIFAR-10); ``cosine`` (from 1 down to 0)."""
    if name == "constant":
        return 1.0
    if name == "onecycle":
        top = max(1, round(total * peak))
        return step / top if step < top else max(0.0, (total - step) / max(1, total - top))
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise ValueError(f"unknown lr schedule {name!r}")


class LrSchedule:
    """`lr_factor` for `torch.optim.lr_scheduler.LambdaLR`, stretchable when a resumed run changes its length.

    A callable object rather than a function, so that LambdaLR's state_dict saves its settings (and its
    stretches) with the checkpoint and restores them on resume.
    """

    def __init__(self, name: str, total_steps: int, peak: float = 0.5):
        self.name, self.total_steps, self.peak = name, int(total_steps), float(peak)
        self.stretches: list[list[int]] = []  # [step, length before] per resume that changed the run's length

    def stretch(self, step: int, total_steps: int) -> None:
        """From ``step`` on, what was left of the schedule is stretched (or squeezed) to end at ``total_steps``:
        the rate goes on from where it was, without a jump, and still reaches the schedule's end."""
        if int(total_steps) != self.total_steps:
            self.stretches.append([int(step), self.total_steps])
            self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        position, total = float(step), self.total_steps
        for start, before in reversed(self.stretches):  # map the step back onto the schedule before each stretch
            if position > start and total > start:
                position = start + (position - start) * (before - start) / (total - start)
            total = before
        return lr_factor(self.name, position, total, self.peak)


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                peak: float = 0.5) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (see `lr_factor`), stepped after every optimiser step."""
    lr_factor(name, 0, max(total_steps, 1), peak)  # an unknown name fails here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(name, total_steps, peak))



def mean_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, first_step: int, steps: int) -> float:
    """The mean learning rate of the ``steps`` optimiser steps from ``first_step`` on: what an epoch trained with,
    where its first or last rate alone can read as 0 (a one-cycle schedule starts and ends there)."""
    schedule, base = scheduler.lr_lambdas[0], scheduler.base_lrs[0]
    return base * sum(schedule(step) for step in range(first_step, first_step + steps)) / max(steps, 1)

# --- one step and one pass -------------------------------------------------------------------------

@dataclass
class Optimisation:
    """What an optimiser step needs: the optimiser, its per-step schedule, fp16's GradScaler, the autocast dtype."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None = None
    ema: AveragedModel | None = None   # updated after every step (`advcli.training.averaging.ema_model`)

    @classmethod
    def fp32(cls, optimizer: torch.optim.Optimizer, device_type: str = "cpu") -> "Optimisation":
        """A constant learning rate in fp32, for benches and tests."""
        return cls(optimizer, lr_schedule("constant", optimizer, total_steps=1),
                   torch.amp.GradScaler(device_type, enabled=False))


@dataclass
class EpochPlan:
    """How a pass runs: which epoch of how many batches, the eps of each batch, BatchNorm's mode during the attack.

    With ``warmup_steps`` the eps grows linearly from 0 to ``eps`` over that many optimiser steps
    (``steps_before`` were taken before this epoch): at a large eps (0.3 on MNIST) a model trained at full
    strength from the first step often never leaves chance accuracy. With ``awp_gamma`` > 0 the steps after
    the first ``awp_warmup_steps`` (of the whole run) use adversarial weight perturbation of that size. Under
    torchrun ``global_batch_size(k)`` says how many examples global batch k (from 1) holds over all ranks.
    """

    eps: float
    epoch: int = 1
    total: int | None = None
    warmup_steps: int = 0
    steps_before: int = 0
    attack_mode: str = "train"
    awp_gamma: float = 0.0
    awp_warmup_steps: int = 0
    global_batch_size: Callable[[int], int] | None = None
    progress_bar: bool = True
    log_every: int = 20
    on_sync: Callable[[int, float, float], None] | None = None  # (batch, running loss, running acc) at each sync

    def eps_at(self, batch: int) -> float:
        if not self.warmup_steps:
            return self.eps
        return self.eps * min(1.0, (self.steps_before + batch) / self.warmup_steps)

    def awp_gamma_at(self, batch: int) -> float:
        """AWP's gamma for batch ``batch`` (from 1) of this epoch: 0 until the warm-up is over."""
        return self.awp_gamma if self.steps_before + batch > self.awp_warmup_steps else 0.0


@dataclass
class EpochProgress:
    """Running totals of one epoch; saved in a mid-epoch checkpoint."""

    batches: int = 0                    # batches done so far in this epoch
    seen: int = 0                       # examples done so far
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0     # of `judged` outputs (two per example for trainer=adv_class)
    judged: int = 0
    first_bad_batch: torch.Tensor | int = -1  # first batch whose loss was NaN/inf (-1: none)
    time_s: float = 0.0                 # training time spent in this epoch before an interruption
    lr: float | None = None             # the learning rate when the epoch began
    finished: bool = False

    def to_plain(self) -> dict[str, Any]:
        return {"batches": self.batches, "seen": self.seen, "loss_sum": float(self.loss_sum),
                "correct": int(self.correct), "judged": self.judged, "time_s": self.time_s, "lr": self.lr}


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, opt: Optimisation, *,
               eps: float, global_size: int | None = None, awp_gamma: float = 0.0) -> Step:
    """One optimiser step on the objective's per-example losses (their mean over the global batch).

    With ``awp_gamma`` > 0 the gradient is taken at the weights perturbed by `advcli.training.awp.perturbation` (found
    from the same loss on the same adversarial examples), and the optimiser applies it to the weights themselves.
    """
    with runtime.autocast(x.device, opt.amp_dtype):
        found = objective.examples(model, x, y, eps)
    diff = awp.Perturbation()
    if awp_gamma > 0:  # on the bare model: DDP reduces gradients only in backward(); awp sums them over ranks
        diff = awp.perturbation(distributed.unwrap(model),
                                lambda bare: opt.scaler.scale(batch_loss(bare, objective, found, opt, global_size)[1]),
                                awp_gamma)
    with awp.perturbed(diff):
        step, loss = batch_loss(model, objective, found, opt, global_size)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
    opt.scaler.step(opt.optimizer)  # the weights are restored: the step from w with the gradient at w + v
    opt.scaler.update()
    opt.scheduler.step()
    if opt.ema is not None:
        opt.ema.update_parameters(model)
    return step


def batch_loss(model: nn.Module, objective: Objective, found: Examples, opt: Optimisation,
               global_size: int | None) -> tuple[Step, torch.Tensor]:
    """The objective's loss on ``found`` under the run's autocast: the step, and the loss to back-propagate."""
    with runtime.autocast(found.x.device, opt.amp_dtype):
        step = objective.loss(model, found)
    return step, distributed.batch_mean(step.loss, global_size)


@dataclass
class _Totals:
    """An epoch's sums on the device; the host reads them only when it must."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    first_bad: torch.Tensor
    seen: int = 0
    judged: int = 0
    bar: Any = field(default=None, repr=False)

    def add(self, step: Step, batch: int, examples: int) -> None:
        local_sum = step.loss.detach().sum()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(local_sum), batch, self.first_bad)
        self.loss_sum += local_sum
        self.correct += (step.logits.detach().argmax(dim=1) == step.targets).sum()
        self.seen += examples
        self.judged += step.targets.shape[0]


def _check_finite(totals: _Totals, plan: EpochPlan, opt: Optimisation) -> None:
    bad = int(distributed.largest(totals.first_bad).item())  # with several ranks: the latest rank's
    if bad >= 0:
        raise TrainingDiverged(
            f"Training diverged: the loss became NaN or infinite in epoch {plan.epoch} at batch {bad}. The learning "
            f"rate (lr={opt.optimizer.param_groups[0]['lr']:.3g} at that point) is the usual cause; a large eps "
            f"(eps={plan.eps:.4g}) can also push the loss up faster than training can follow. Lower lr (or use "
            "amp=off if this happened under fp16). The checkpoint of the last completed epoch, if any, is intact.")


def train_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], objective: Objective,
                opt: Optimisation, plan: EpochPlan, resume_from: EpochProgress | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> EpochProgress:
    """One pass of training over ``batches`` (or, continuing ``resume_from``, its rest).

    Under torchrun ``model`` is wrapped in DistributedDataParallel and ``batches`` yields this rank's share of
    each global batch; the epoch's totals are summed over the ranks at the end. Returns the epoch's progress,
    ``finished`` False when ``should_stop()`` ended it early.
    """
    device = next(model.parameters()).device
    state = resume_from or EpochProgress(lr=opt.optimizer.param_groups[0]["lr"])
    # a resumed epoch's earlier totals (already over all ranks) start rank 0's sums, so they are counted once
    # and a resumed run adds up exactly as an unbroken one
    first = distributed.is_first_rank()
    totals = _Totals(torch.as_tensor(state.loss_sum if first else 0.0, dtype=torch.float32, device=device),
                     torch.as_tensor(state.correct if first else 0, dtype=torch.long, device=device),
                     torch.as_tensor(state.first_bad_batch, dtype=torch.long, device=device))
    bar = tqdm(batches, total=plan.total, initial=state.batches, desc=f"epoch {plan.epoch}", leave=False,
               disable=not plan.progress_bar, dynamic_ncols=True)
    batch, stopped = state.batches, False
    for batch, (x, y) in enumerate(bar, start=state.batches + 1):
        if plan.attack_mode == "eval":
            model.eval()  # BatchNorm uses running statistics while the attack searches; the objective trains after
        size = plan.global_batch_size(batch) if plan.global_batch_size else None
        step = train_step(model, x, y, objective, opt, eps=plan.eps_at(batch), global_size=size,
                          awp_gamma=plan.awp_gamma_at(batch))
        totals.add(step, batch, len(y))
        if batch % plan.log_every == 0 or batch == plan.total:
            _check_finite(totals, plan, opt)
            loss = totals.loss_sum.item() / max(state.seen + totals.seen, 1)
            acc = totals.correct.item() / max(state.judged + totals.judged, 1)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2%}")
            if plan.on_sync is not None:  # e.g. the loggers (log_batches=true): values the host holds already
                plan.on_sync(batch, loss, acc)
        if should_stop():
            stopped = True
            break
    bar.close()
    _check_finite(totals, plan, opt)
    seen, judged = distributed.total_counts(totals.seen, totals.judged, device=device)
    return EpochProgress(batches=batch, seen=state.seen + seen, loss_sum=distributed.total(totals.loss_sum).item(),
                         correct=int(distributed.total(totals.correct).item()), judged=state.judged + judged,
                         time_s=state.time_s, lr=state.lr, finished=not stopped or batch == plan.total)
