"""Where and how the arithmetic runs: device, mixed precision, memory format, compilation.

One code path serves CUDA and the CPU: the training and evaluation loops ask this module for a
device, an autocast context and a GradScaler, and never branch on the device themselves.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from typing import Any

import torch
from torch import nn

from advcli import threads
from advcli.config import AMP_MODES, require_choice
from advcli.errors import ConfigError


log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU (with a one-line warning); ``cpu``; ``cuda[:N]``."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("No CUDA device found: running on the CPU (set device=cpu to silence this).")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name} is not a device name; use device=auto, device=cpu or device=cuda (or cuda:N).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name} was asked for, but this machine has no usable CUDA device (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Use device=cpu, or device=auto "
                "to take a GPU only where there is one."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type != "cpu":
        raise ConfigError(f"device={name} is not supported; use device=auto, device=cpu or device=cuda.")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether the CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device, *, native_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` = auto | bf16 | fp16 | off on ``device`` (None means fp32).

    ``auto`` picks bf16 on CUDA devices that support it (else fp16) and on CPUs that compute bf16
    natively; elsewhere fp32, since emulated bf16 is slower than fp32.
    """
    amp = require_choice("amp", amp, AMP_MODES)
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    return torch.bfloat16 if native_bf16 else None


def describe_precision(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16, whose small range needs loss scaling."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (advcli draws all its randomness from torch)."""
    torch.manual_seed(seed)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (BatchNorm statistics frozen) for the block, then back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run the block on generators seeded with ``seed``, then give the caller its own generator states back.

    An evaluation draws its random starts here, so its numbers depend on the model, the settings and the seed
    alone, never on what ran before it (training draws), and it leaves training's random stream untouched.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def prepare_model(model: nn.Module, device: torch.device, channels_last: Any) -> tuple[nn.Module, bool]:
    """Move ``model`` to ``device``; channels_last (``auto`` = for conv nets) speeds convolutions up on
    CPUs and tensor-core GPUs. Returns the model and whether inputs should be channels_last too."""
    use = any(isinstance(m, nn.Conv2d) for m in model.modules()) if str(channels_last) == "auto" else bool(channels_last)
    model = model.to(device)
    if device.type == "cpu":
        model.register_forward_pre_hook(threads.keep_fair)  # every attack's queries follow the load too
    if use:
        model = model.to(memory_format=torch.channels_last)
    return model, use
