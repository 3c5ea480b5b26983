"""Data-parallel runs under ``torchrun``: which process this is, which examples are its own, and the
collectives that put the ranks' results back together.

``torchrun --nproc_per_node=N -m advcli train ...`` starts N copies of the same command and tells each
its rank through the environment (RANK, WORLD_SIZE, LOCAL_RANK). advcli spawns nothing itself. Each
rank holds the whole (small) dataset on its device, draws the same seeded order of the epoch, and
takes its own slice of every global batch; the attack runs per rank on its slice; DistributedDataParallel
averages the gradients; every rank steps the same optimiser, so the weights stay identical. Only
rank 0 writes checkpoints, logs and pictures.

Without torchrun (WORLD_SIZE unset or 1) `Ranks` is a single process and every function here is a
no-op, so the training loop has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from advcli.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world)`` for `advcli.data.batches` and `advcli.data.share`; None for a single process."""
        return (self.rank, self.world) if self.enabled else None


def from_environment() -> Ranks:
    """The ranks torchrun announced in the environment (a single process when it did not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's device.

    On CUDA each rank takes the GPU of its LOCAL_RANK. A no-op for a single process.
    """
    if not ranks.enabled:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= ranks.local_rank:
            raise ConfigError(
                f"torchrun started {ranks.world} processes per node, but this node has {torch.cuda.device_count()} "
                "GPU(s); use --nproc_per_node at most the number of GPUs (or device=cpu for gloo on the CPU).")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank, world_size=ranks.world,
                                timeout=datetime.timedelta(minutes=30))
    log.info("rank %d of %d on %s (%s backend)", ranks.rank, ranks.world, device, dist.get_backend())
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """This process's ranks and device (`start`) for the block; the process group is left after it."""
    ranks = from_environment()
    try:
        yield ranks, start(ranks, device)
        # every rank finished: leave together, so that no rank tears gloo down while another still talks to it
        # (a rank leaving early has aborted at exit: "terminate called without an active exception"). Not on an
        # error, where the other ranks may never arrive; torchrun stops them.
        barrier()
    finally:
        stop()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (the training forward passes go through it); itself alone.

    Attacks run on the bare model: they need input gradients only, and DDP would try to reduce
    parameter gradients that an attack never makes.
    """
    if not ranks.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def active() -> bool:
    """Whether this process is one of several ranks of a torchrun job."""
    return dist.is_initialized() and dist.get_world_size() > 1


def is_first_rank() -> bool:
    """Rank 0, or the only process."""
    return not active() or dist.get_rank() == 0


def batch_mean(losses: torch.Tensor, global_size: int | None) -> torch.Tensor:
    """The loss to back-propagate: the mean of per-example ``losses`` over the global batch.

    DDP averages the ranks' gradients, so each rank scales its sum by world / ``global_size`` (the examples
    of this global batch over all ranks, known from the split): the average is then the gradient of the
    global batch mean, even when the ranks' shares differ by one, with no extra communication.
    """
    if not active():
        return losses.mean()
    return losses.sum() * (dist.get_world_size() / global_size)


def total_counts(*counts: int, device: torch.device) -> list[int]:
    """Python counts summed over all ranks (themselves for a single process)."""
    if not active():
        return list(counts)
    return [int(c) for c in total(torch.tensor(counts, device=device)).tolist()]


def every_rank(value):
    """``[rank 0's value, rank 1's, ...]`` on every rank (any picklable object; ``[value]`` for one process)."""
    if not active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def total(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all ranks (``value`` itself for a single process)."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def largest(value: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``value`` over all ranks (``value`` itself for a single process)."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def _all_reduce(value: torch.Tensor, op) -> torch.Tensor:
    if active():
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks stop at the same batch)."""
    if not active():
        return flag
    return bool(total(torch.tensor([int(flag)], device=device)).item())


def gather(part: torch.Tensor) -> torch.Tensor:
    """The ranks' ``part`` tensors (first dimension may differ by rank) concatenated in rank order."""
    if not active():
        return part
    if part.dtype == torch.bool:  # gloo has no bool collectives
        return gather(part.to(torch.uint8)).bool()
    sizes = [torch.zeros(1, dtype=torch.long, device=part.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(part)], device=part.device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=part.device)
    padded[: len(part)] = part
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[: int(size.item())] for piece, size in zip(pieces, sizes)])


def same_on_all_ranks(value):
    """Rank 0's ``value`` (any picklable object) on every rank, e.g. the run directory Hydra made there."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
