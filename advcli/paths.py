"""Run directories: where a run writes, checked before any work depends on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from advcli.errors import ConfigError


def output_dir(cfg: Any) -> Path:
    """The run directory: ``output_dir`` if set, else Hydra's; checked writable before work starts."""
    from hydra.core.hydra_config import HydraConfig

    folder = cfg.get("output_dir")
    if folder is None:
        folder = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "outputs/run"
    return check_writable(Path(folder))


def check_writable(folder: Path) -> Path:
    """Create ``folder`` and prove a file can be written there, before hours of training depend on it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".advcli-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"The output directory {folder} cannot be written ({error.strerror or error}). Choose another with "
            "hydra.run.dir=PATH (or output_dir=PATH), or fix its permissions."
        ) from None
    return folder


def check_can_create(folder: str | Path, *, setting: str = "hydra.run.dir") -> None:
    """Fail early if ``folder`` could not be created: its nearest existing ancestor must be a writable folder."""
    path = Path(os.path.expanduser(str(folder))).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(
            f"The output directory {path} cannot be written ({problem}). Choose another with {setting}=PATH, "
            "or fix its permissions."
        )
