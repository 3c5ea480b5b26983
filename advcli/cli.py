"""Every command's command-line handling: ``advcli COMMAND [ARGS...]``.

``train``, ``eval``, ``import`` and ``viz`` are Hydra apps (``@hydra.main`` below), so Hydra's overrides, ``--help``,
``--cfg job`` and ``-m`` (multirun) work as Hydra users expect; each hands its config to the library
function that does the work (`advcli.training.train.train`, `advcli.evaluation.eval_command.evaluate_checkpoint`,
`advcli.evaluation.viz.visualize_checkpoints`) through `run_guarded`, which turns a `UserError` into one paragraph
and exit status 2 (and removes the run directory Hydra made for a refused command, if nothing else is in it).
Before Hydra runs, an unknown config group choice (``dataset=nope``) and an unusable run directory are refused the
same way. ``summarize`` takes paths (argparse). Nothing else in advcli reads ``sys.argv``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import os
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from advcli.errors import one_paragraph, ConfigError, UserError

HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into a run's .hydra folder
_existed_before: Path | None = None  # the run directory's deepest folder that existed before this command

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
    check_group_choices(args)
    global _existed_before
    _existed_before = existing_part_of_run_directory(args)
    check_run_directory(args, exclusive=command in ("train", "eval"))
    if command in ("eval", "import"):
        args = eps_list_as_typed(args)
    sys.argv = [f"advcli {command}", *args]
    {"train": train_app, "eval": eval_app, "viz": viz_app, "import": import_app}[command]()


def check_group_choices(args: list[str]) -> None:
    """An unknown choice of a config group (``dataset=nope``) stops here with one paragraph that lists the choices,
    before Hydra makes a run directory or prints its search path. Choices Hydra finds elsewhere (``--config-dir``
    folders) count; with ``hydra.searchpath`` or another primary config, Hydra alone decides."""
    if any(arg.lstrip("+").startswith("hydra.searchpath") or arg.split("=")[0] in ("--config-path", "-cp",
                                                                                 "--config-name", "-cn") for arg in args):
        return
    roots = [Path(str(importlib.resources.files("advcli.configs")))] + config_dirs(args)
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    for arg in args:
        key, is_override, value = arg.partition("=")
        group = key.lstrip("+").split("@", 1)[0].strip("/")
        if not is_override or key.startswith(("~", "-")) or group.startswith("hydra") or \
                not any((root / group).is_dir() for root in roots):
            continue
        for choice in group_values(value, multirun=multirun):
            if not any((root / group / f"{choice}.yaml").is_file() for root in roots):
                raise_unknown_choice(key.lstrip("+"), group, choice, roots)


def config_dirs(args: list[str]) -> list[Path]:
    """The folders given with ``--config-dir DIR`` (or ``-cd DIR``, ``--config-dir=DIR``)."""
    found = []
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            found.append(Path(os.path.expanduser(value)))
    return found


def group_values(value: str, *, multirun: bool) -> list[str]:
    """The choices an override names: one, a list (``logger=[csv,mlflow]``), or a sweep's (``-m dataset=a,b``);
    none for null, interpolations and sweep functions (``choice(...)``, ``glob(...)``), which Hydra reads."""
    value = value.strip()
    if value in ("", "null") or "(" in value or "${" in value:
        return []
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    elif not multirun and "," in value:
        return []  # Hydra refuses a sweep without -m in its own words
    return [part.strip().strip("'\"") for part in value.split(",") if part.strip() not in ("", "null")]


def raise_unknown_choice(key: str, group: str, choice: str, roots: list[Path]) -> None:
    """One paragraph on stderr and exit status 2: what was not found, the group's choices and how to go on."""
    names = sorted({path.relative_to(root / group).with_suffix("").as_posix() for root in roots
                    if (root / group).is_dir() for path in (root / group).rglob("*.yaml")})
    where = " or in the --config-dir folders" if len(roots) > 1 else ""
    print(f"advcli: error: {key}={choice}: no {group} is called {choice} (there is no {group}/{choice}.yaml among "
          f"advcli's configs{where}). The {group} choices are: {', '.join(names)}. Pick one of them, e.g. "
          f"{key}={names[0] if names else '...'}, or write your own {group}/{choice}.yaml into a folder and add "
          f"that folder with --config-dir PATH.", file=sys.stderr)
    sys.exit(2)


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


def existing_part_of_run_directory(args: list[str]) -> Path | None:
    """The deepest folder on the way to the run directory that exists before Hydra makes the rest (``outputs`` or
    the folder holding it for the default ``outputs/DATE/TIME``): a refused command removes what was made below it
    (`remove_unused_run_directory`), never this folder itself. None for a sweep: its jobs keep their folders."""
    if any(arg in ("-m", "--multirun") for arg in args):
        return None
    given = [arg.split("=", 1)[1] for arg in args if arg.startswith("hydra.run.dir=")]
    literal = (given[-1] if given else "outputs/").split("${", 1)[0]  # what ${now:...} will name is not there yet
    folder = Path(os.path.expanduser(literal or ".")).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def remove_unused_run_directory() -> None:
    """After a command was refused: remove the run directory Hydra made for it when it holds nothing but Hydra's
    own files (the config copies in .hydra/, the log) and advcli's released lock, and the empty folders made for it,
    so that a refusal leaves no empty run behind. A directory with anything else in it (a checkpoint, results, a
    user's file), or one that existed before the command, stays as it is."""
    from hydra.core.hydra_config import HydraConfig

    from advcli.runs.paths import holder_of, LOCK_FILE

    if _existed_before is None or not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
    if _existed_before not in run_dir.parents or holder_of(run_dir) is not None:
        return
    hydra_dir = run_dir / ".hydra"
    own = {".hydra", f"{HydraConfig.get().job.name}.log", LOCK_FILE}
    try:
        if not {entry.name for entry in run_dir.iterdir()} <= own or (
                hydra_dir.is_dir() and not {entry.name for entry in hydra_dir.iterdir()} <= HYDRA_FILES):
            return
        for name in HYDRA_FILES:
            (hydra_dir / name).unlink(missing_ok=True)
        if hydra_dir.is_dir():
            hydra_dir.rmdir()
        for name in own - {".hydra"}:
            (run_dir / name).unlink(missing_ok=True)
        for folder in [run_dir, *run_dir.parents]:
            if folder == _existed_before or any(folder.iterdir()):
                break
            folder.rmdir()
    except OSError:  # a file appeared meanwhile, or it cannot be removed: leave what is left
        return


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
            if exit_code == 2:  # refused: no empty run directory left behind
                paths.release_all()
                remove_unused_run_directory()
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
