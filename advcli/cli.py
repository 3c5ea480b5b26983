"""Every command's command-line handling: ``advcli COMMAND [ARGS...]``.

``train``, ``eval``, ``import`` and ``viz`` are Hydra apps (``@hydra.main`` below), so Hydra's overrides, ``--help``,
``--cfg job`` and ``-m`` (multirun) work as Hydra users expect; each hands its config to the library
function that does the work (`advcli.training.train.train`, `advcli.evaluation.eval_command.evaluate_checkpoint`,
`advcli.evaluation.viz.visualize_checkpoints`) through `run_guarded`, which turns a `UserError` into one paragraph
and exit status 2. ``summarize`` takes paths (argparse). Nothing else in advcli reads ``sys.argv``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from advcli.errors import one_paragraph, ConfigError, UserError

COMMANDS = {
    "train": "train a model (min-max adversarial training), then evaluate it against every attack",
    "eval": "evaluate a checkpoint: advcli eval ckpt=PATH [eps=...] [restarts=...]",
    "viz": "pictures of a checkpoint: advcli viz ckpt=PATH [compare=PATH2] [eps=...]",
    "import": "a model advcli did not train as a checkpoint: advcli import weights=PATH model=NAME dataset=NAME "
              "save_checkpoint=OUT",
    "summarize": "rebuild a sweep's summary table and plot: advcli summarize PATH [PATH ...]",
}

USAGE = "usage: advcli {" + ",".join(COMMANDS) + "} [HYDRA OVERRIDES ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {text}" for name, text in COMMANDS.items()
) + "\n\nExamples:\n  advcli train attack=pgd eps=8/255\n  advcli train -m eps=2/255,4/255,8/255\n" \
    "  advcli eval ckpt=outputs/DATE/TIME/checkpoint.pt eps=0.2 restarts=5\n" \
    "  advcli viz ckpt=outputs/DATE/TIME/checkpoint.pt compare=outputs/DATE2/TIME2/checkpoint.pt\n" \
    "  advcli eval weights=model.pth model=small_cnn model.normalize=none dataset=mnist eps=0.1\n  advcli train --help\n" \
    "  advcli summarize outputs/multirun/DATE/TIME"


def main() -> None:
    """``advcli COMMAND ...`` (and ``python -m advcli COMMAND ...``, which torchrun can start)."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command, args = sys.argv[1], sys.argv[2:]
    if command not in COMMANDS:
        print(f"advcli: error: unknown command {command!r}; valid commands are: {', '.join(COMMANDS)}.\n\n{USAGE}",
              file=sys.stderr)
        sys.exit(2)
    if command == "summarize":
        return summarize_command(args)
    check_run_directory(args, exclusive=command in ("train", "eval"))
    if command in ("eval", "import"):
        args = eps_list_as_typed(args)
    sys.argv = [f"advcli {command}", *args]
    {"train": train_app, "eval": eval_app, "viz": viz_app, "import": import_app}[command]()


def check_run_directory(args: list[str], *, exclusive: bool = False) -> None:
    """Hydra creates the run directory before advcli's code runs and shows a traceback when it cannot;
    check it first so that a bad ``hydra.run.dir``/``hydra.sweep.dir`` gets a one-paragraph error. With
    ``exclusive`` (train, eval) a run directory that another live process holds is refused here too."""
    from advcli.runs.paths import check_can_create

    if any(arg in ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i") for arg in args):
        return
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    folders = [arg.split("=", 1)[1] for arg in args if arg.startswith(key)] or ["outputs"]
    try:
        for folder in folders:
            check_can_create(folder, setting=key.rstrip("="))
        if exclusive and not multirun and folders != ["outputs"]:
            check_not_in_use(Path(os.path.expanduser(folders[-1])))
    except UserError as error:
        print(f"advcli: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


def check_not_in_use(folder: Path) -> None:
    """Refuse a run directory that another live process holds before Hydra writes its config files and log into
    it (`advcli.runs.paths.claim` takes the lock itself later; this only stops the second command earlier)."""
    from advcli.runs.paths import busy_message, holder_of
    from advcli.errors import RunDirectoryBusy

    holder = holder_of(folder) if folder.is_dir() else None
    if holder is not None:
        raise RunDirectoryBusy(busy_message(folder, holder))


def eps_list_as_typed(args: list[str]) -> list[str]:
    """``eps=0,1/255,2/255`` -> ``eps=[0,1/255,2/255]`` unless ``-m``/``--multirun`` asks for a sweep.

    Hydra reads a comma list as a sweep and refuses it without ``-m``; ``advcli eval`` takes it as the
    eps values of one robustness curve, as typed. Sweep functions (``eps=range(...)``) stay as they are.
    """
    if any(arg in ("-m", "--multirun") for arg in args):
        return args
    rewritten = []
    for arg in args:
        value = arg[len("eps="):] if arg.startswith("eps=") else ""
        if "," in value and not value.lstrip().startswith("[") and "(" not in value:
            arg = f"eps=[{value}]"
        rewritten.append(arg)
    return rewritten


def run_guarded(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)``; a UserError becomes one paragraph on stderr and exit status 2.

    ``debug=true`` in the config re-raises instead, for the full traceback. In a sweep (Hydra multirun)
    one failed job must not stop the others, yet Hydra's basic sweeper re-raises a job's exception and the
    summary would never be written: there any Exception is recorded (`advcli.runs.sweep.record_failure`) and the
    job returns `advcli.runs.sweep.failed_result`. An error that carries its own exit status (an interruption:
    Ctrl-C, SIGTERM) is recorded, then still exits.
    """
    from omegaconf.errors import MissingMandatoryValue
    from tqdm.contrib.logging import logging_redirect_tqdm

    from advcli import threads
    from advcli.runs import paths
    from advcli.runs import sweep

    try:
        try:
            threads.configure(cfg.get("threads", "auto"), parallel_jobs=sweep.parallel_jobs())
            with logging_redirect_tqdm():  # log lines print above the progress bars instead of through them
                return task(cfg)
        except MissingMandatoryValue as missing:  # a `???` key of the config left unset, e.g. ckpt
            key = missing.full_key or "a required key"
            raise ConfigError(f"{key} is required and was not given: pass {key}=VALUE on the command line "
                              "(ckpt takes the path of a checkpoint.pt written by advcli train).") from None
    except Exception as error:
        exit_code = getattr(error, "exit_code", 2)
        if sweep.in_multirun():
            record = sweep.record_failure(error, debug=cfg.get("debug", False), sweep_goes_on=exit_code == 2)
            if exit_code == 2:
                return sweep.failed_result(record)
        elif not isinstance(error, UserError) or cfg.get("debug", False):
            raise
        elif os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same error: say it once
            print(f"advcli: error: {one_paragraph(error)}", file=sys.stderr, flush=True)
        sys.exit(exit_code)
    finally:
        paths.release_all()  # the run directory is free for the next job of a sweep run in this process


def robust_accuracy(metrics: dict[str, Any]) -> float:
    """What a run returns to Hydra's sweepers: the PGD robust accuracy (clean accuracy without a PGD row)."""
    return metrics["test"].get("pgd", metrics["test"]["clean"])["acc"]


def _library(module: str, name: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(module), name)  # imported when the command runs: `advcli --help` stays quick


# train.yaml names a sweep job's folder with ${advcli.job_dir:...} (see advcli.runs.sweep.job_dir); registered with
# the apps, so that every process that runs a job (joblib and SLURM workers too) can resolve it
OmegaConf.register_new_resolver(
    "advcli.job_dir", lambda overrides, sweep_dir: _library("advcli.runs.sweep", "job_dir")(overrides, sweep_dir),
    replace=True)


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="train")
def train_app(cfg: DictConfig) -> float:
    """``advcli train``: `advcli.training.train.train`; returns the final PGD robust accuracy for sweepers."""
    return robust_accuracy(run_guarded(_library("advcli.training.train", "train"), cfg))


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="eval")
def eval_app(cfg: DictConfig) -> float:
    """``advcli eval``: `advcli.evaluation.eval_command.evaluate_checkpoint`; the PGD robust accuracy at the largest eps."""
    return robust_accuracy(run_guarded(_library("advcli.evaluation.eval_command", "evaluate_checkpoint"), cfg))


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="eval")
def import_app(cfg: DictConfig) -> None:
    """``advcli import``: `advcli.models.sources.import_model` (the eval config: weights=, robustbench=, model=, dataset=)."""
    run_guarded(_library("advcli.models.sources", "import_model"), cfg)


@hydra.main(version_base="1.3", config_path="pkg://advcli.configs", config_name="viz")
def viz_app(cfg: DictConfig) -> None:
    """``advcli viz``: `advcli.evaluation.viz.visualize_checkpoints`."""
    run_guarded(_library("advcli.evaluation.viz", "visualize_checkpoints"), cfg)


def summarize_command(args: list[str]) -> None:
    """``advcli summarize [--out DIR] PATH [PATH ...]``."""
    parser = argparse.ArgumentParser(
        prog="advcli summarize",
        description="Rebuild a sweep's summary (summary.csv, summary.md, summary.png) and print its table. PATH is "
                    "a sweep directory (outputs/multirun/DATE/TIME: one row per job of that sweep, failed jobs "
                    "included) or a run directory (outputs/DATE/TIME, with a metrics.json); several run directories "
                    "make one table. Jobs that differ only in seed make one row: per column the mean, the sample "
                    "standard deviation and n (--per-job: a row per job). The files go to the sweep directory, or for "
                    "several paths to their common parent folder, or to --out DIR.",
        epilog="examples:\n  advcli summarize outputs/multirun/2026-11-25/03-00-00\n"
               "  advcli summarize --out results/eps outputs/2026-11-25/10-*",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument("-o", "--out", type=Path, metavar="DIR", help="write the summary files here")
    parser.add_argument("--per-job", action="store_true", help="a row per job, even for jobs that differ only in seed")
    options = parser.parse_args(args)
    from advcli.runs.sweep import run_summarize

    try:
        print(run_summarize(options.paths, options.out, per_job=options.per_job))
    except UserError as error:
        print(f"advcli: error: {one_paragraph(error)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
