"""Checkpoints: written atomically, loaded as data (never code), and able to rebuild their model.

A checkpoint is a dict of tensors and plain Python values::

    format: "advcli-checkpoint", version: 1
    model: state_dict            model_spec: {name, options, in_channels, image_size, num_classes, mean, std,
                                              adversarial_class: one more output, "adversarial input";
                                              a model of one's own also: target (its class's import path),
                                              arguments (the keyword arguments it was built with)}
    optimizer, scheduler, scaler: state_dicts (for resuming)
    epoch: completed epochs      rng: torch RNG states, one entry per rank
    config: the resolved run config (plain dict)      history: per-epoch metrics
    fingerprint: the settings that define the run (`advcli.config.fingerprint`); a run resumes only into the same

It is loaded with ``torch.load(..., weights_only=True)``, which refuses anything but tensors and
plain containers (storages saved on a GPU are mapped to the CPU), and the model is rebuilt by name from
advcli's own registry. A model of one's own (``model._target_``) is rebuilt by importing the class its spec
records, the ordinary way, from the user's environment (`advcli.models.custom`): the file names a class, it
never carries code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advcli import config
from advcli.errors import CheckpointError, ConfigError

FORMAT = "advcli-checkpoint"
VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then move the file into place: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` (tensors moved to the CPU) atomically, stamped with the format and version."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load(path: str | Path) -> dict[str, Any]:
    """Load an advcli checkpoint as data, or raise a CheckpointError naming the file and the problem."""
    if path is None:  # ckpt=null on the command line
        raise CheckpointError("No checkpoint given: pass ckpt=PATH (a checkpoint.pt from a run directory).")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Pass the checkpoint.pt written in a run directory, e.g. "
            "ckpt=outputs/DATE/TIME/checkpoint.pt."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"Checkpoint {path} was refused: it holds Python objects other than tensors and plain data "
            f"({first_line}). advcli loads checkpoints with weights_only=True so that a file can never run "
            "code; only load files written by advcli."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"Checkpoint {path} cannot be read: it is truncated or not a PyTorch file ({type(error).__name__}). "
            "A run killed while saving leaves the previous checkpoint intact; use that one, or train again."
        ) from None
    return checked(payload, path)


def is_checkpoint(payload: Any) -> bool:
    """Whether what a file held carries advcli's checkpoint marker."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def checked(payload: Any, path: str | Path) -> dict[str, Any]:
    """A loaded file as an advcli checkpoint: its marker and a format version this advcli understands."""
    if not is_checkpoint(payload):
        raise CheckpointError(
            f"Checkpoint {path} is not an advcli checkpoint (no '{FORMAT}' marker). advcli can only evaluate "
            "checkpoints written by `advcli train`."
        )
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {payload['version']}, newer than this advcli understands "
            f"({VERSION}); upgrade advcli."
        )
    return payload


# --- resuming a run ----------------------------------------------------------------------------------

def check_same_run(payload: dict[str, Any], path: str | Path, settings: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint whose run had other settings than ``settings`` (a fingerprint), but for
    those that may change on resume (`advcli.config.MAY_CHANGE_ON_RESUME`)."""
    ways_out = ("Run it in another directory (hydra.run.dir=PATH, or a new hydra.sweep.dir for a sweep), or start "
                "over in this one with resume=never. Only epochs (what is left of the learning-rate schedule stretches "
                "to fit) and the final evaluation's settings (evaluation.attacks, evaluation.num_examples, "
                "evaluation.sanity) may change when a run resumes.")
    stored = payload.get("fingerprint")
    if not isinstance(stored, dict):
        raise CheckpointError(f"Cannot resume from {path}: it was written by an older advcli that did not record the "
                              f"settings of its run, so continuing it could mix settings. advcli eval can still "
                              f"evaluate it. {ways_out}")
    changed = [change for change in config.fingerprint_changes(stored, settings)
               if not config.may_change_on_resume(change[0])]
    if changed:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:8])
        more = f"; and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise CheckpointError(
            f"Cannot resume from {path}: it holds a run with other settings ({shown}{more}). Continuing it would "
            f"train and report a run under settings it was not trained with. {ways_out}")


def check_same_model(payload: dict[str, Any], path: str | Path, spec: dict[str, Any]) -> None:
    """Refuse to continue a run whose model spec differs from this run's: the data's statistics or classes changed
    (an image folder whose files changed), so the model would be trained and labelled as something else."""
    stored = payload.get("model_spec", {})
    changed = [key for key in sorted({*stored, *spec}) if stored.get(key) != spec.get(key)]
    if changed:
        raise CheckpointError(
            f"Cannot resume from {path}: its model was built with other {', '.join(changed)} ("
            + "; ".join(f"{key}: {stored.get(key)!r} -> {spec.get(key)!r}" for key in changed[:3])[:400]
            + "). The data changed since the run started (e.g. images added to an image folder). Start a new run "
            "(resume=never, or another directory).")


def resume_point(choice: Any, ckpt_path: Path) -> Path | None:
    """The checkpoint a run continues (``resume=``): ``PATH``; with ``auto`` the run directory's own checkpoint.pt
    if there is one (running a command again continues it); with ``never`` none."""
    if choice in (None, False, "never"):
        return None
    if choice == "auto":
        return ckpt_path if ckpt_path.is_file() else None
    return Path(str(choice))


def check_new_length(payload: dict[str, Any], path: str | Path, *, epochs: int, lr_schedule: str) -> None:
    """A resumed run may change its number of epochs, but not below what it trained, nor past a schedule's end,
    nor below its planned length when the learning rate depends on that length."""
    trained, planned = payload["epoch"], payload["fingerprint"]["epochs"]
    if trained > epochs:
        raise ConfigError(f"epochs={epochs}, but the run in {path} already trained {trained} epochs. Pass "
                                 f"epochs={trained} or more to continue it, or resume=never to start over.")
    if epochs < planned and lr_schedule != "constant":
        # squeezing the rest of a one-cycle or cosine schedule (or cutting it off) makes neither the planned run
        # nor an epochs-long one, yet the results would be labelled as the latter
        raise ConfigError(
            f"epochs={epochs}: the run in {path} was planned for {planned} epochs with lr_schedule={lr_schedule}, "
            f"whose learning rate depends on the run's length; it trained {trained} of them. Ending it after "
            f"{epochs} epochs would stop (or squeeze) its schedule part-way and record a {epochs}-epoch "
            f"{lr_schedule} run it never was. Resume with epochs={planned} or more; or start a new run with "
            f"epochs={epochs} (resume=never, or another directory). Only lr_schedule=constant runs may be shortened.")
    if epochs > planned and trained == planned and lr_schedule != "constant":
        raise ConfigError(
            f"epochs={epochs}: the run in {path} finished its {planned} epochs, and its schedule "
            f"(lr_schedule={lr_schedule}) has already brought the learning rate down to 0, so more epochs would "
            f"train at lr 0. Start a new run with epochs={epochs} (resume=never, or another directory); a run "
            "that is stopped before its end can be given more epochs.")


def restore_training(payload: dict[str, Any], path: str | Path, *, model: nn.Module, optimizer, scheduler,
                     scaler) -> None:
    """Load a checkpoint's weights and optimiser, schedule and scaler states into this run's objects."""
    try:
        model.load_state_dict(payload.get("train_model", payload["model"]))  # an EMA run: the trained weights
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"Cannot resume from {path}: its training state does not fit this run "
            f"({type(error).__name__}: {' '.join(str(error).split())[:200]}). Use resume=never to start over."
        ) from None


def capture_rng() -> dict[str, Any]:
    """This process's random generator states (CPU, and every CUDA device when there is one)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def restore_rank_rng(saved: list[dict[str, Any]], rank: int, world: int) -> bool:
    """Each rank takes back its own generator states (``saved``: one per rank), so a resumed run draws what the
    unbroken one would. False when the checkpoint was written by another number of processes."""
    if len(saved) != world:
        return False
    restore_rng(saved[rank])
    return True
