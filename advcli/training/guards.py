"""What watches a training run and may end it: catastrophic overfitting (`overfitting`), robustness that never
came (`never_robust`), and SIGINT/SIGTERM (`StopRequests`). `advcli.training.train` acts on what they say."""

from __future__ import annotations

import itertools
import logging
import signal
import threading
from typing import Any, Callable

import torch

from advcli import distributed
from advcli.errors import Interrupted

log = logging.getLogger(__name__)


def overfitting(history: list[dict[str, Any]], guard_cfg: Any) -> dict[str, Any] | None:
    """Catastrophic overfitting (Wong et al. 2020): held-out robust accuracy collapsing while training goes on.

    Returns what happened when the latest epoch's PGD accuracy fell more than ``guard_cfg.drop`` (absolute)
    below the best so far, else None; logs a warning saying what the guard does about it.
    """
    scores = [entry["val_robust_acc"] for entry in history if "val_robust_acc" in entry]
    if guard_cfg.action == "off" or len(scores) < 2:
        return None
    best = max(scores)
    if best - scores[-1] <= guard_cfg.drop:
        return None
    best_epoch = next(entry["epoch"] for entry in history if entry.get("val_robust_acc") == best)
    action = {"rollback": f"rolling back to epoch {best_epoch} (best.pt) and stopping",
              "stop": "stopping with the last weights", "warn": "going on (overfit_guard.action=warn)"}[guard_cfg.action]
    log.warning("catastrophic overfitting: held-out robust accuracy fell from %.2f%% (epoch %d) to %.2f%% (epoch %d); %s",
                100 * best, best_epoch, 100 * scores[-1], history[-1]["epoch"], action)
    return {"triggered": True, "epoch": history[-1]["epoch"], "best_epoch": best_epoch, "best_val_robust_acc": best,
            "val_robust_acc": scores[-1], "action": guard_cfg.action}


def never_robust(history: list[dict[str, Any]], attack: str, *, floor: float = 0.05,
                 adversarial_class: bool = False) -> str | None:
    """A warning when adversarial training never bought held-out robustness: PGD accuracy at or below ``floor``
    in every epoch while the model learned the clean task. `overfitting` cannot see this (nothing to fall from),
    and it is how FGSM training that overfits from its first epochs looks."""
    scores = [entry["val_robust_acc"] for entry in history if "val_robust_acc" in entry]
    if attack == "none" or not scores or max(scores) > floor or history[-1].get("val_clean_acc", 0.0) < 0.5:
        return None
    if adversarial_class:  # trainer=adv_class: the flag stops the blind attack, and the adaptive one walks around it
        message = (f"held-out robust accuracy with rejection never rose above {100 * max(scores):.1f}% in {len(scores)} "
                   f"epoch(s) (held-out clean {100 * history[-1]['val_clean_acc']:.1f}%): the adversarial-input output "
                   "flags the training attack's inputs, but an adaptive attack that avoids the flag breaks the model "
                   "(see the pgd_adaptive row). This is the known weakness of the defence, not a training failure.")
    else:
        message = (f"held-out robust accuracy never rose above {100 * max(scores):.1f}% in {len(scores)} epoch(s) of "
                   f"{attack} training (held-out clean {100 * history[-1]['val_clean_acc']:.1f}%): the training attack is "
                   "not making the model robust (catastrophic overfitting from the start, or an eps this model and "
                   "schedule cannot reach). Try attack=pgd, a lower lr, eps_warmup=1 or more epochs.")
    log.warning(message)
    return message


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

    def poll(self, ranks: distributed.Ranks, device: torch.device, every: int) -> Callable[..., bool]:
        """``should_stop(now=False)``. Under torchrun every rank must stop after the same batch, so the ranks
        agree (a collective, and on CUDA a host sync) every ``every`` batches, and whenever ``now``."""
        polls = itertools.count(1)

        def should_stop(now: bool = False) -> bool:
            if not ranks.enabled:
                return self.signum is not None
            return (now or next(polls) % every == 0) and distributed.any_rank(self.signum is not None, device)
        return should_stop

    def interrupted(self, message: str) -> Interrupted:
        signum = self.signum or signal.SIGTERM  # a rank that got no signal stops because another did
        return Interrupted(f"{signal.Signals(signum).name} {message}", signum)
