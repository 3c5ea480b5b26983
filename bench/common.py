"""Shared by the benchmarks: what machine this is, and MNIST (or a stand-in of its shape) as tensors."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from advcli import data, runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def describe_machine() -> str:
    """Device, torch version and CPU capability, for the header of every benchmark's output."""
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    return (f"device {device}; CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16 {runtime.cpu_has_native_bf16()}")


def data_root() -> str:
    return os.environ.get("ADVCLI_DATA", str((REPO / ".." / "shared" / "data").resolve()))


def mnist(split: str, n: int | None = None) -> data.ImageSet:
    """The first ``n`` MNIST images of ``split`` from ADVCLI_DATA (default ../shared/data)."""
    images = data.load_split("mnist", split, root=data_root(), download=False)
    return images.subset(slice(0, n)) if n else images


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call, with CUDA work finished before the clock stops."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
