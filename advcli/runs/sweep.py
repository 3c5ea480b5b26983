"""Sweeps (Hydra multirun): each job's folder and records, finding a sweep's runs, and the callback that writes
the summary (`advcli.runs.summary`) when the sweep ends; ``advcli summarize PATH`` rebuilds it after the fact.

``advcli train -m eps=2/255,4/255,8/255 attack=fgsm,pgd`` runs one job per combination, each in its own
folder of the sweep directory, named by its settings (``outputs/multirun/DATE/TIME/attack=pgd,eps=8_255``,
see `job_dir`), with its checkpoint and ``metrics.json``. Running the same command again in the same sweep
directory finds each job's earlier work there, whatever the job's number.

A job that fails records ``failed.json`` (`record_failure`) and returns, so the sweep goes on; the summary
shows it as ``failed`` with its error line. Rows come only from this sweep's jobs: the callback writes a
sweep id to ``sweep.json`` when the sweep starts and to each job's ``job.json`` when the job starts, so
job directories left in a reused sweep directory by an earlier sweep, and results older than the job
that now owns the directory, are left out.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from advcli.config import choice_name
from advcli.errors import one_paragraph, RunDirectoryBusy, SweepError, UserError
from advcli.runs import seeds
from advcli.runs.paths import in_multirun
from advcli.runs.report import accuracy_interval, examples_in
from advcli.runs.summary import SUMMARY_FILES, write_summary

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"     # in the sweep directory: the sweep's id and start/end times
JOB_FILE = "job.json"         # in each job directory: the id of the sweep the job belongs to
METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"   # what a failed job leaves in its directory



def job_dir(job_overrides: Sequence[str], sweep_dir: str) -> str:
    """A sweep job's folder name from its values of the swept settings (``attack=pgd,eps=8_255``), read from the
    sweep's command line in ``sweep.json``: the same settings give the same folder whatever the job's number, so
    a re-run sweep finds its jobs' work (and a folder holding a run with other settings is refused, not reused:
    `advcli.runs.checkpoint.check_same_run`). Without ``sweep.json`` every override names the folder. Characters a
    path cannot hold (``/``) become ``_``; a name too long for a file system keeps its start and a hash."""
    swept = (_read_json(Path(sweep_dir) / SWEEP_FILE) or {}).get("swept")
    items = sorted(text for text in map(str, job_overrides) if swept is None or text.split("=", 1)[0] in swept)
    whole = ",".join(items)
    name = "".join(c if c.isalnum() or c in "._=,+@-[]" else "_" for c in whole) or "job"
    if len(name) > 120:
        name = f"{name[:100]}...{hashlib.sha256(whole.encode()).hexdigest()[:12]}"
    return name


def swept_keys(command_line: Sequence[str]) -> list[str]:
    """The keys a multirun's command line sweeps over (``eps=0.1,0.2`` and ``range(...)``, not ``eps=0.1``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(command_line))
    return [o.get_key_element() for o in overrides if o.is_sweep_override()]


# ----------------------------------------------------------------------------------------------------
# Finding the runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run_dir(path: Path) -> bool:
    """A run (or sweep job) directory: Hydra's ``.hydra/overrides.yaml``, a metrics.json or a failed.json."""
    return any((path / name).is_file() for name in (".hydra/overrides.yaml", METRICS_FILE, FAILED_FILE))


def runs_below(folder: Path, depth: int = 4) -> tuple[list[Path], int]:
    """The run directories below ``folder`` in order, and how many were left out as another sweep's.

    ``hydra.sweep.subdir`` may nest job directories, so the search goes ``depth`` levels down (hidden
    folders such as ``.submitit`` skipped). Within a sweep directory (its ``sweep.json`` holds the id
    of the sweep that last started there) only that sweep's jobs count, in job order; a folder of
    several sweeps or runs gives each one's runs in turn.
    """
    found, skipped = [], 0
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if is_run_dir(child):
            found.append(child)
        elif depth > 1:
            below, left_out = runs_below(child, depth - 1)
            found, skipped = found + below, skipped + left_out
    sweep_id = (_read_json(folder / SWEEP_FILE) or {}).get("id")
    if sweep_id is None:  # not a sweep, or one run without advcli's callback: nothing to tell jobs apart by
        return found, skipped
    markers = {job: _read_json(job / JOB_FILE) or {} for job in found}
    mine = [job for job in found if markers[job].get("sweep_id") == sweep_id]
    mine.sort(key=lambda job: (_job_num(job, markers[job]) if _job_num(job, markers[job]) is not None else math.inf,
                               str(job)))
    return mine, skipped + len(found) - len(mine)


def _fresh(result: Path, job_marker: Path) -> bool:
    """Whether ``result`` was written by the job that owns the directory now (not left by an earlier one)."""
    if not result.is_file():
        return False
    if not job_marker.is_file():
        return True
    # both written by the job's own machine, the marker first: a coarse clock can make them equal, never reversed
    return result.stat().st_mtime >= job_marker.stat().st_mtime


def parse_override(text: str) -> tuple[str, str]:
    """``eps=8/255`` -> (``eps``, ``8/255``); ``+key=v`` and ``++key=v`` lose their prefix."""
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def _job_config(run_dir: Path) -> DictConfig | None:
    try:
        return OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except Exception:  # missing or unreadable: the row simply shows fewer details
        return None


def _job_num(run_dir: Path, marker: dict | None) -> int | None:
    if marker and isinstance(marker.get("num"), int):
        return marker["num"]
    if run_dir.name.isdigit():
        return int(run_dir.name)
    try:
        num = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.num
        return int(num) if num is not None else None
    except Exception:
        return None


def read_run(run_dir: Path) -> dict[str, Any]:
    """One summary row for a run directory: what it was asked to do and what came out.

    ``status`` is ``ok`` (a metrics.json), ``failed`` (a failed.json: ``error`` holds its line) or
    ``missing`` (neither: the job still runs, was killed, or wrote its results elsewhere).
    """
    marker_path = run_dir / JOB_FILE
    marker = _read_json(marker_path)
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_path)] if overrides_path.is_file() else []
    num = _job_num(run_dir, marker)
    row: dict[str, Any] = {"job": run_dir.name if num is None else num, "dir": str(run_dir), "status": "missing",
                           "overrides": dict(parse_override(o) for o in overrides), "error": "", "error_type": "",
                           "user_error": False}

    metrics = _read_json(run_dir / METRICS_FILE) if _fresh(run_dir / METRICS_FILE, marker_path) else None
    failure = _read_json(run_dir / FAILED_FILE) if _fresh(run_dir / FAILED_FILE, marker_path) else None
    job_cfg = _job_config(run_dir)
    row["settings_id"] = (seeds.settings_id(job_cfg) if job_cfg is not None
                          else (metrics or {}).get("settings_id"))  # the same settings less the seed: the same id
    if metrics:
        row.update(status="ok", dataset=metrics.get("dataset"), model=metrics.get("model"),
                   attack=metrics.get("attack"), eps=metrics.get("eps_text", metrics.get("eps")),
                   eps_value=metrics.get("eps"), seed=metrics.get("seed"), precision=metrics.get("precision"))
        row.update(accuracy_columns(metrics))
        for key in ("train_time_s", "eval_time_s"):
            row[key] = metrics.get(key)
    else:  # no results: describe the job from the config it was given
        cfg = job_cfg
        if cfg is not None:
            attack = OmegaConf.select(cfg, "attack", default=None)
            row.update(dataset=OmegaConf.select(cfg, "dataset.name", default=None),
                       model=OmegaConf.select(cfg, "model.name", default=None),
                       attack=choice_name(attack) if attack is not None else None,
                       eps=str(OmegaConf.select(cfg, "eps", default="")),
                       seed=OmegaConf.select(cfg, "seed", default=None))
    if failure is not None:
        row.update(status="failed", error=str(failure.get("error", "")), error_type=str(failure.get("type", "")),
                   user_error=bool(failure.get("user_error")))
    elif not metrics:
        row["error"] = "no metrics.json or failed.json: the job is still running, was killed, or wrote elsewhere"
    return row


def accuracy_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """A finished run's accuracy columns: ``n`` (examples evaluated) and, per evaluation attack, ``{name}_acc``
    with its 95% Wilson interval ``{name}_ci_low``/``{name}_ci_high`` (fractions). A metrics.json written
    before rows carried ``n`` gets the run's ``num_test`` (``num_examples`` for ``advcli eval``)."""
    test = {name: result for name, result in (metrics.get("test") or {}).items()
            if isinstance(result, dict) and isinstance(result.get("acc"), (int, float))}
    fallback = metrics.get("num_test", metrics.get("num_examples"))
    columns: dict[str, Any] = {}
    counts = [count for result in test.values() if (count := examples_in(result, fallback)) is not None]
    if counts:
        columns["n"] = max(counts)  # one evaluation: every row is over the same examples
    if metrics.get("evaluation"):
        columns["evaluation"] = metrics["evaluation"]  # the preset: "fast" numbers must not pass for default ones
    accuracies = [(name, result, "acc") for name, result in test.items()]
    if isinstance(test.get("any_attack", {}).get("acc_with_rejection"), (int, float)):
        # trainer=adv_class: the figure to quote
        accuracies.append(("any_attack_with_rejection", test["any_attack"], "acc_with_rejection"))
    for name, result, key in accuracies:
        columns[f"{name}_acc"] = result[key]
        interval = accuracy_interval(result, fallback, key=key)
        if interval is not None:
            columns[f"{name}_ci_low"], columns[f"{name}_ci_high"] = interval
    return columns


def summarize(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One row per run: each path is a sweep directory (all of that sweep's jobs) or a run directory.

    Rows come in the order of the paths, a sweep's jobs by job number.
    Raises `SweepError` for a path that holds no runs.
    """
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise SweepError(f"{path} is not a directory. Pass a sweep directory (outputs/multirun/DATE/TIME) or "
                             "one or more run directories (each with a metrics.json).")
        if is_run_dir(path):
            rows.append(read_run(path))
            continue
        jobs, skipped = runs_below(path)
        if not jobs:
            raise SweepError(
                f"{path} holds no runs: a sweep directory has one sub-directory per job (with .hydra/overrides.yaml, "
                f"and metrics.json once the job is done), a run directory has a metrics.json. Pass a sweep directory "
                f"such as outputs/multirun/DATE/TIME, or run directories such as outputs/DATE/TIME."
            )
        if skipped:
            log.info("%s: left out %d job director%s from an earlier sweep into the same directory",
                     path, skipped, "y" if skipped == 1 else "ies")
        rows.extend(read_run(job) for job in jobs)
    return rows


# ----------------------------------------------------------------------------------------------------
# A failed job


def parallel_jobs() -> int:
    """How many jobs of this sweep run side by side on this machine: a joblib launcher's ``n_jobs`` (-1: one
    per core), else 1 (one run, a sequential sweep, or SLURM jobs that each get their own cores)."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return 1
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    n_jobs = int(launcher.get("n_jobs", -1) or 1)
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def record_failure(error: Exception, *, debug: bool = False, sweep_goes_on: bool = True) -> dict:
    """Write the job's ``failed.json`` (one-line error, exception type) and report the error. A job refused because
    a live process holds its directory (`advcli.runs.paths.claim`) is skipped: nothing is written into that process's
    directory, whose results are still to come.

    The paragraph goes to stderr like a single run's; the traceback of anything but a UserError (a bug,
    or any error with ``debug=true``) goes to the job's log, so a sweep's summary can point at it.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    user_error = isinstance(error, UserError)
    record = {"error": one_paragraph(error), "type": type(error).__name__, "user_error": user_error,
              "job": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task), "time": time.time()}
    folder = Path(hydra_cfg.runtime.output_dir)
    if isinstance(error, RunDirectoryBusy):  # the directory is the live job's: its results must not read as failed
        print(f"advcli: job {hydra_cfg.job.num} skipped: {record['error']}", file=sys.stderr, flush=True)
        return record
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED_FILE).write_text(json.dumps(record, indent=2) + "\n")
    where = "" if user_error else f"{type(error).__name__}: "
    log.error("job %s failed: %s%s", hydra_cfg.job.num, where, record["error"],
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


# ----------------------------------------------------------------------------------------------------
# The Hydra callback


def _in_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


class SweepSummary(Callback):
    """Registered under ``hydra.callbacks`` in train.yaml: marks the sweep and its jobs, and writes the
    summary when the sweep ends (on the machine that launched it, whatever the launcher)."""

    def __init__(self) -> None:
        self.sweep_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_id = uuid.uuid4().hex
        command_line = list(config.hydra.overrides.task)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(
            {"id": self.sweep_id, "started": time.time(), "overrides": command_line,
             "swept": swept_keys(command_line)}, indent=2))
        _start_tracking(config, sweep_dir, command_line)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _in_multirun(config):
            return
        sweep_id = self.sweep_id or (_read_json(Path(config.hydra.sweep.dir) / SWEEP_FILE) or {}).get("id")
        job_dir = Path(config.hydra.runtime.output_dir)
        (job_dir / JOB_FILE).write_text(json.dumps({"sweep_id": sweep_id, "num": config.hydra.job.num}) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            sweep = _read_json(sweep_dir / SWEEP_FILE) or {}
            if "started" in sweep:
                sweep["wall_time_s"] = time.time() - sweep["started"]
                (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep, indent=2))
            rows = summarize([sweep_dir])
            text = write_summary(rows, sweep_dir, sweep)
        except Exception as error:  # the jobs' results are safe on disk; say how to get the summary later
            log.error("the sweep summary failed (%s); rebuild it with: advcli summarize %s", error, sweep_dir,
                      exc_info=not isinstance(error, UserError))
        else:
            print(f"\n{text}\nwrote {', '.join(SUMMARY_FILES)} in {sweep_dir}", flush=True)
        finally:
            _end_tracking(sweep_dir)


_TRACKING_ENDED: set[Path] = set()  # sweep directories whose parent run this process has ended


def _start_tracking(config: DictConfig, sweep_dir: Path, command_line: list[str]) -> None:
    """The sweep's parent run in the tracker (`advcli.runs.tracking.start_sweep`); a tracker that cannot start stops
    the sweep before any job, in one paragraph."""
    from advcli.runs import tracking

    try:
        tracking.start_sweep(config, sweep_dir, command_line)
    except UserError as error:
        print(f"advcli: error: {one_paragraph(error)}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    # Ctrl-C or SIGTERM ends a sweep without on_multirun_end (Hydra's multirun has no finally): the parent run
    # must not stay RUNNING then
    atexit.register(_end_tracking, sweep_dir, status="KILLED")


def _end_tracking(sweep_dir: Path, status: str = "FINISHED") -> None:
    """The summary files to the sweep's parent run, which ends (once); a tracker gone by now costs a warning."""
    from advcli.runs import tracking

    if sweep_dir in _TRACKING_ENDED:
        return
    _TRACKING_ENDED.add(sweep_dir)
    try:
        tracking.end_sweep(sweep_dir, [sweep_dir / name for name in SUMMARY_FILES], status=status)
    except Exception as error:
        log.warning("the sweep's tracker run could not be closed (%s); the summary is in %s",
                    one_paragraph(error, with_type=True, limit=300), sweep_dir)


def run_summarize(paths: list[Path], out: Path | None = None, *, per_job: bool = False) -> str:
    """``advcli summarize``: summarize ``paths``, write the files (into ``out``, else `summary_folder`), return
    the text to print. Jobs that differ only in ``seed`` make one row per group unless ``per_job``."""
    from advcli.runs.summary import summary_folder

    rows = summarize(paths)
    sweep = _read_json(paths[0] / SWEEP_FILE) if len(paths) == 1 else None
    folder = out or summary_folder(paths)
    text = write_summary(rows, folder, sweep, per_job=per_job)
    return f"{text}\nwrote {', '.join(SUMMARY_FILES)} in {folder}"
