"""The one exception type a user sees: bad input or an environment problem, explained in a paragraph.

Every module raises a subclass of `UserError` (`DataError`, `ModelError`, `CheckpointError`, ...) for
problems the user can fix; the command-line entry points print its message as one paragraph and exit
with status 2 instead of showing a traceback (set `debug=true` to see the traceback). Anything else is a
bug in advcli and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is invalid (bad eps, steps <= 0, unknown choice, ...)."""


class ModelError(UserError):
    """A model that cannot be built from the given name or options (exported as `advcli.models.ModelError`;
    defined here so that the architecture modules under `advcli.models` can raise it too)."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


FAILED_FILE = "failed.json"  # what a failed sweep job leaves in its directory (read by advcli.sweep)


def one_paragraph(error: BaseException) -> str:
    """The error's message on one line (whitespace collapsed); the type's name when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def run_guarded(task, cfg):
    """Run ``task(cfg)``; a UserError becomes one paragraph on stderr and exit status 2.

    ``debug=true`` in the config re-raises instead, for the full traceback.

    In a sweep (Hydra multirun) one failed job must not stop the others; but Hydra's basic sweeper
    re-raises a job's exception, and the summary at the sweep's end would never be written. There any
    Exception becomes `record_failure`'s ``failed.json`` in the job's directory, the paragraph on
    stderr and, for anything but a UserError, the traceback in the job's log; the job then returns
    `failed_result` (NaN accuracies, so the sweep objective is NaN) and the sweep goes on. An error that
    carries its own exit status (an interruption: Ctrl-C, SIGTERM) is recorded, then still exits.
    """
    import os
    import sys

    from omegaconf.errors import MissingMandatoryValue

    try:
        try:
            return task(cfg)
        except MissingMandatoryValue as missing:  # a `???` key of the config left unset, e.g. ckpt
            key = missing.full_key or "a required key"
            raise ConfigError(f"{key} is required and was not given: pass {key}=VALUE on the command line "
                              "(ckpt takes the path of a checkpoint.pt written by advcli train).") from None
    except Exception as error:
        exit_code = getattr(error, "exit_code", 2)
        if in_multirun():
            record = record_failure(error, debug=cfg.get("debug", False), sweep_goes_on=exit_code == 2)
            if exit_code == 2:
                return failed_result(record)
        elif not isinstance(error, UserError) or cfg.get("debug", False):
            raise
        elif os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same error: say it once
            print(f"advcli: error: {one_paragraph(error)}", file=sys.stderr, flush=True)
        sys.exit(exit_code)


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(error: Exception, *, debug: bool = False, sweep_goes_on: bool = True) -> dict:
    """Write the job's ``failed.json`` (one-line error, exception type) and report the error.

    The paragraph goes to stderr like a single run's; the traceback of anything but a UserError (a bug,
    or any error with ``debug=true``) goes to the job's log, so a sweep's summary can point at it.
    """
    import json
    import logging
    import sys
    import time
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    user_error = isinstance(error, UserError)
    record = {"error": one_paragraph(error), "type": type(error).__name__, "user_error": user_error,
              "job": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task), "time": time.time()}
    folder = Path(hydra_cfg.runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED_FILE).write_text(json.dumps(record, indent=2) + "\n")
    where = "" if user_error else f"{type(error).__name__}: "
    logging.getLogger(__name__).error("job %s failed: %s%s", hydra_cfg.job.num, where, record["error"],
                                      exc_info=error if debug or not user_error else None)
    then = "the sweep goes on" if sweep_goes_on else "the sweep stops"
    print(f"advcli: error: {where}{record['error']} (job {hydra_cfg.job.num} failed; recorded in "
          f"{folder / FAILED_FILE}; {then})", file=sys.stderr, flush=True)
    return record


def failed_result(record: dict) -> dict:
    """What a failed sweep job returns in place of its metrics: the error and NaN accuracies, so the
    entry point's objective (``metrics["test"][...]["acc"]``) is NaN and a sweeper can tell it apart."""
    nan = float("nan")
    return {"failed": record, "test": {"clean": {"acc": nan, "loss": nan}, "pgd": {"acc": nan, "loss": nan}}}
