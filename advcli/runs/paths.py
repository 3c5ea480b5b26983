"""Run directories: where a run writes, checked before any work depends on it, and held by one process at a time.

A run directory is claimed (`claim`) with ``fcntl.flock`` on its ``.advcli-lock`` file for as long as the command
runs: a second ``advcli train`` (or ``advcli eval``) in the same directory -- a sweep started again while the first
still runs, a requeued cluster job whose old one is alive, two terminals -- is refused instead of training beside
it and overwriting its checkpoint.pt and metrics.json. The operating system drops the lock when the holder dies,
however it dies, so a crashed or killed run never leaves its directory blocked; the file itself stays, holding
the last holder's PID, host and start time for the refusal to name.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from advcli.errors import ConfigError, RunDirectoryBusy

log = logging.getLogger(__name__)

LOCK_FILE = ".advcli-lock"
_held: dict[Path, int] = {}  # the run directories this process holds: their lock files' descriptors


def output_dir(cfg: Any, *, exclusive: bool = True) -> Path:
    """The run directory: ``output_dir`` if set, else Hydra's; checked writable and, when ``exclusive`` (a command
    that writes checkpoints or results there), claimed (`claim`) for this process before work starts."""
    from hydra.core.hydra_config import HydraConfig

    folder = cfg.get("output_dir")
    if folder is None:
        folder = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "outputs/run"
    folder = check_writable(Path(folder))
    return claim(folder) if exclusive else folder


def claim(folder: Path) -> Path:
    """Hold ``folder`` for this process until `release` (or the process's end), or raise `RunDirectoryBusy`
    naming the live process that holds it. Claiming a folder this process already holds is a no-op (a command
    run twice in one Python process, as the tests do)."""
    key = Path(folder).resolve()
    if key in _held:
        return folder
    handle = None
    try:
        handle = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        os.close(handle)
        raise RunDirectoryBusy(busy_message(folder, holder)) from None
    except OSError as error:  # a file system without locks, or another user's lock file: run as before, unguarded
        if handle is not None:
            os.close(handle)
        log.warning("cannot lock %s (%s): nothing stops a second process from running in it at the same time",
                    key / LOCK_FILE, error.strerror or error)
        return folder
    _write_holder(handle)
    _held[key] = handle
    return folder


def release(folder: Path) -> None:
    """Let go of ``folder`` (claimed by `claim`); nothing if this process does not hold it."""
    handle = _held.pop(Path(folder).resolve(), None)
    if handle is not None:
        os.close(handle)  # closing the last descriptor drops the flock


def release_all() -> None:
    for folder in list(_held):
        release(folder)


def holder_of(folder: Path) -> dict[str, Any] | None:
    """Who holds ``folder`` now (pid, host, started, command), or None when no live process does."""
    path = Path(folder) / LOCK_FILE
    if Path(folder).resolve() in _held or not path.is_file():
        return None
    try:
        handle = os.open(path, os.O_RDWR)
    except OSError:  # not ours to open: `claim` decides later
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(handle)
    except OSError:
        return None
    finally:
        os.close(handle)
    return None


def _write_holder(handle: int) -> None:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = " ".join(os.path.basename(arg) if i == 0 else arg for i, arg in enumerate(sys.argv))
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command})
    os.ftruncate(handle, 0)
    os.pwrite(handle, (record + "\n").encode(), 0)
    os.fsync(handle)


def _read_holder(handle: int) -> dict[str, Any]:
    """What the holder wrote into the lock file (nothing yet when it has only just taken the lock)."""
    try:
        found = json.loads(os.pread(handle, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        found = {}
    return found if isinstance(found, dict) else {}


def busy_message(folder: Path, holder: dict[str, Any]) -> str:
    who = (f"process {holder.get('pid', '(PID unknown)')} on {holder.get('host', 'an unknown host')}, started "
           f"{holder.get('started', 'at an unknown time')}")
    command = f" ({holder['command'][:200]})" if holder.get("command") else ""
    return (f"The run directory {folder} is in use by another advcli process: {who}{command}. Two processes in one "
            f"run directory would both train and both overwrite its checkpoint.pt and metrics.json. Wait for that "
            f"process to end (or stop it: kill {holder.get('pid', 'PID')} on {holder.get('host', 'its host')}), then "
            f"run the same command again, which continues the run or shows its results; or give this one another "
            f"directory (hydra.run.dir=PATH, output_dir=PATH, or a new hydra.sweep.dir). A process that died "
            f"leaves no lock behind.")


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


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
