"""Sweeps: one summary per Hydra multirun, and ``advcli summarize PATH`` to rebuild it after the fact.

``advcli train -m eps=2/255,4/255,8/255 attack=fgsm,pgd`` runs one job per combination, each in its own
sub-directory of the sweep directory (``outputs/multirun/DATE/TIME/N``) with its checkpoint and
``metrics.json``. When the sweep ends, `SweepSummary` (a Hydra callback registered in ``train.yaml``)
writes three files in the sweep directory and prints the table:

- ``summary.csv``: one row per job with its overrides, clean and robust accuracy per evaluation
  attack (fractions, exactly as in the job's metrics.json), training time, status and error line;
- ``summary.md``: the same as a readable table (also what the terminal shows);
- ``summary.png``: clean and robust accuracy against eps, one line per training attack.

A job that failed (see `advcli.errors.run_guarded`: in a sweep it records ``failed.json`` and returns)
appears as ``failed`` with its error line. Rows come only from this sweep's jobs: the callback writes a
sweep id to ``sweep.json`` when the sweep starts and to each job's ``job.json`` when the job starts, so
job directories left in a reused sweep directory by an earlier sweep, and results older than the job
that now owns the directory, are left out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from advcli.config import choice_name
from advcli.errors import FAILED_FILE, UserError, one_paragraph

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"     # in the sweep directory: the sweep's id and start/end times
JOB_FILE = "job.json"         # in each job directory: the id of the sweep the job belongs to
METRICS_FILE = "metrics.json"
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
IDENTITY = ("dataset", "model", "attack", "eps")  # always known per job; never repeated as override columns


class SweepError(UserError):
    """A path given to ``advcli summarize`` holds no runs, or a summary cannot be written."""


def job_dir(override_dirname: str) -> str:
    """A sweep job's folder name from its settings (Hydra's ``override_dirname``, e.g. ``attack=pgd,eps=8/255``):
    the same settings give the same folder whatever the job's number, so a re-run sweep finds its jobs' work.
    Characters a path cannot hold (``/``) become ``_``; a name too long for a file system keeps its start and
    a hash of the whole."""
    name = "".join(c if c.isalnum() or c in "._=,+@-[]" else "_" for c in override_dirname) or "defaults"
    if len(name) > 120:
        name = f"{name[:100]}...{hashlib.sha256(override_dirname.encode()).hexdigest()[:12]}"
    return name


# ${advcli.job_dir:...} in train.yaml's hydra.sweep.subdir; registered on import (advcli.train imports this module)
OmegaConf.register_new_resolver("advcli.job_dir", job_dir, replace=True)


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
    if metrics:
        row.update(status="ok", dataset=metrics.get("dataset"), model=metrics.get("model"),
                   attack=metrics.get("attack"), eps=metrics.get("eps_text", metrics.get("eps")),
                   eps_value=metrics.get("eps"))
        for name, result in (metrics.get("test") or {}).items():
            if isinstance(result, dict) and isinstance(result.get("acc"), (int, float)):
                row[f"{name}_acc"] = result["acc"]
        worst = (metrics.get("test") or {}).get("any_attack") or {}
        if isinstance(worst.get("acc_with_rejection"), (int, float)):  # trainer=adv_class: the figure to quote
            row["any_attack_with_rejection_acc"] = worst["acc_with_rejection"]
        for key in ("train_time_s", "eval_time_s"):
            row[key] = metrics.get(key)
    else:  # no results: describe the job from the config it was given
        cfg = _job_config(run_dir)
        if cfg is not None:
            attack = OmegaConf.select(cfg, "attack", default=None)
            row.update(dataset=OmegaConf.select(cfg, "dataset.name", default=None),
                       model=OmegaConf.select(cfg, "model.name", default=None),
                       attack=choice_name(attack) if attack is not None else None,
                       eps=str(OmegaConf.select(cfg, "eps", default="")))
    if failure is not None:
        row.update(status="failed", error=str(failure.get("error", "")), error_type=str(failure.get("type", "")),
                   user_error=bool(failure.get("user_error")))
    elif not metrics:
        row["error"] = "no metrics.json or failed.json: the job is still running, was killed, or wrote elsewhere"
    return row


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
# Columns and writers


def attack_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Evaluation attacks in the order the runs report them (clean first, ``any_attack`` last)."""
    names: list[str] = []
    for row in rows:
        for key in row:
            if key.endswith("_acc") and key[:-4] not in names:
                names.append(key[:-4])
    names.sort(key=lambda name: (name != "clean", name.startswith("any_attack")))
    return names


def override_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Override keys across rows, in command-line order, except those shown as identity columns."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row["overrides"] if key not in keys and key not in IDENTITY]
    return keys


def csv_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return (["job", "status", *IDENTITY, "eps_value", *override_keys(rows), *[f"{n}_acc" for n in attack_names(rows)],
             "train_time_s", "eval_time_s", "error_type", "error", "dir"])


def _cell(row: dict[str, Any], column: str) -> Any:
    """A row's value for ``column``: its own field, else the override of that name ("" when neither)."""
    value = row[column] if column in row else row["overrides"].get(column)
    return "" if value is None else value


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Every column, numbers as Python writes them (they read back equal to metrics.json's)."""
    columns = csv_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _cell(row, column) for column in columns})
    path.write_text(buffer.getvalue())


def _percent(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or math.isnan(value) else f"{100 * value:.2f}"


def table(rows: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """The human table (markdown, padded so it reads in a terminal too) and the settings common to all rows.

    Columns that hold the same value in every row (dataset, model, fixed overrides) move out of the table
    into the returned ``key=value`` list; eps and the training attack always stay.
    """
    common_text, varying = [], []
    for key in ["dataset", "model", *override_keys(rows)]:
        values = list(dict.fromkeys(str(_cell(row, key)) for row in rows))
        if len(values) == 1 and values[0] != "":  # the same in every row (a blank cell: not overridden there)
            common_text.append(f"{key}={values[0]}")
        elif values != [""]:
            varying.append(key)
    names = attack_names(rows)
    header = ["job", "status", "attack", "eps", *varying, *[n.replace("_", " ") + " %" for n in names], "train s"]
    body = []
    for row in rows:
        body.append([str(_cell(row, "job")), row["status"], str(_cell(row, "attack")), str(_cell(row, "eps")),
                     *[str(_cell(row, key)) for key in varying], *[_percent(row.get(f"{n}_acc")) for n in names],
                     "-" if row.get("train_time_s") is None else f"{row['train_time_s']:.1f}"])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = {i for i, title in enumerate(header) if title.endswith("%") or title in ("job", "train s")}

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *map(fmt, body)]), common_text


def format_duration(seconds: float) -> str:
    """``42 s``, ``7.3 min``, ``2.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def describe(rows: Sequence[dict[str, Any]], sweep: dict | None = None) -> str:
    """summary.md's text: the table, what all jobs shared, the failed jobs' errors, the sweep's wall time."""
    text, common = table(rows)
    failed = [row for row in rows if row["status"] != "ok"]
    lines = ["# Sweep summary", ""]
    tally = {status: sum(r["status"] == status for r in rows) for status in ("ok", "failed", "missing")}
    counts = ", ".join([f"{len(rows)} job{'s' if len(rows) != 1 else ''}", f"{tally['ok']} ok"]
                       + [f"{tally['failed']} failed"] * bool(tally["failed"])
                       + [f"{tally['missing']} without results"] * bool(tally["missing"]))
    if sweep and sweep.get("wall_time_s") is not None:
        counts += f"; sweep wall time {format_duration(sweep['wall_time_s'])}"
    lines.append(counts + ".")
    if common:
        lines.append(f"All jobs: {' '.join(common)}.")
    names = [n for n in attack_names(rows) if n not in ("clean", "any_attack")]
    lines += ["", text, "",
              f"Accuracy in % on the test set: clean, and under each evaluation attack ({', '.join(names)}); "
              "`any attack` counts an example as robust only if every attack failed. `train s`: training time."]
    if failed:
        lines += ["", "Failed or unfinished jobs:" if tally["missing"] else "Failed jobs:", ""]
        shared = {item.split("=", 1)[0] for item in common}
        for row in failed:
            settings = " ".join(f"{k}={v}" for k, v in row["overrides"].items() if k not in shared)
            kind = f"{row['error_type']}: " if row["error_type"] and not row["user_error"] else ""
            lines.append(f"- job {_cell(row, 'job')} ({settings or row['dir']}): {kind}{row['error']}")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """summary.png: clean (dashed) and robust (solid, worst case over the evaluation attacks) accuracy
    against eps, one colour per training attack (and per value of any other swept setting).

    Uses matplotlib's object API with the Agg canvas, so no global backend is switched. Returns False
    (and writes nothing) when no finished job has a numeric eps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "ok" and isinstance(r.get("eps_value"), (int, float))]
    if not done:
        return False
    names = attack_names(done)
    robust = "any_attack" if "any_attack" in names else ([n for n in names if n != "clean"] or ["clean"])[-1]
    attacked = [n for n in names if n not in ("clean", "any_attack")]
    _, common = table(done)
    fixed = {text.split("=", 1)[0] for text in common}
    group_keys = ["attack"] + [k for k in ["dataset", "model", *override_keys(done)] if k not in fixed]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in done:
        label = " ".join([str(_cell(row, "attack"))] + [f"{k}={_cell(row, k)}" for k in group_keys[1:]])
        groups.setdefault(label, []).append(row)

    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [f"C{i}" for i in range(10)]
    for i, (label, group) in enumerate(sorted(groups.items())):
        group.sort(key=lambda r: r["eps_value"])
        x = [r["eps_value"] for r in group]
        colour = colours[i % len(colours)]
        for name, style, what in (("clean", "--o", "clean"), (robust, "-s", "robust")):
            y = [100 * r[f"{name}_acc"] if isinstance(r.get(f"{name}_acc"), (int, float)) else math.nan for r in group]
            ax.plot(x, y, style, color=colour, ms=4, label=f"trained {label}: {what}")
    ticks = sorted({r["eps_value"]: str(r["eps"]) for r in done}.items())
    ax.set_xticks([t for t, _ in ticks], [text for _, text in ticks])
    ax.set_xlabel("eps (train and test)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    what = f"robust = worst case over {', '.join(attacked)}" if robust == "any_attack" else f"robust = {robust}"
    settings = textwrap.wrap(" ".join(common), width=90, max_lines=2, placeholder=" ...")
    ax.set_title("\n".join([*settings, what]), fontsize=7)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def write_summary(rows: Sequence[dict[str, Any]], folder: Path, sweep: dict | None = None) -> str:
    """Write summary.csv, summary.md and summary.png into ``folder``; returns summary.md's text."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(rows, folder / "summary.csv")
        text = describe(rows, sweep)
        plotted = plot(rows, folder / "summary.png")
        if not plotted and (folder / "summary.png").exists():
            (folder / "summary.png").unlink()  # an earlier summary's plot would not match this table
        (folder / "summary.md").write_text(text + ("\n![clean and robust accuracy against eps](summary.png)\n"
                                                   if plotted else ""))
    except OSError as error:
        raise SweepError(f"The summary cannot be written to {folder} ({error.strerror or error}). "
                         "Pass another folder with advcli summarize --out DIR PATH ...") from None
    return text


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
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(
            {"id": self.sweep_id, "started": time.time(), "overrides": list(config.hydra.overrides.task)}, indent=2))

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
            return
        print(f"\n{text}\nwrote {', '.join(SUMMARY_FILES)} in {sweep_dir}", flush=True)


# ----------------------------------------------------------------------------------------------------
# advcli summarize

USAGE = """usage: advcli summarize [--out DIR] PATH [PATH ...]

Rebuild a sweep's summary (summary.csv, summary.md, summary.png) and print its table. PATH is a sweep
directory (outputs/multirun/DATE/TIME: one row per job of that sweep, failed jobs included) or a run
directory (outputs/DATE/TIME, with a metrics.json); several run directories make one table. The files
go to the sweep directory, or for several paths to their common parent folder, or to --out DIR.

examples:
  advcli summarize outputs/multirun/2026-11-25/03-00-00
  advcli summarize --out results/eps outputs/2026-11-25/10-*"""


def summary_folder(paths: Sequence[Path]) -> Path:
    """Where the files go by default: the one path given, else the deepest folder holding all of them."""
    if len(paths) == 1:
        return paths[0]
    resolved = [p.resolve() for p in paths]
    common = resolved[0].parent
    while not all(common in p.parents for p in resolved):
        common = common.parent
    return common


def run_summarize(args: Sequence[str]) -> str:
    """``advcli summarize [--out DIR] PATH...``: summarize, write the files, return the printed text."""
    args = list(args)
    out = None
    if "--out" in args or "-o" in args:
        at = args.index("--out") if "--out" in args else args.index("-o")
        if at + 1 >= len(args):
            raise SweepError("--out needs a folder: advcli summarize --out DIR PATH ...")
        out = Path(args.pop(at + 1))
        args.pop(at)
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise SweepError(f"unknown option {unknown[0]}; the only option is --out DIR. See advcli summarize --help.")
    if not args:
        raise SweepError("no PATH given: pass a sweep directory (outputs/multirun/DATE/TIME) or run directories; "
                         "see advcli summarize --help.")
    paths = [Path(a) for a in args]
    rows = summarize(paths)
    sweep = _read_json(paths[0] / SWEEP_FILE) if len(paths) == 1 else None
    folder = out or summary_folder(paths)
    text = write_summary(rows, folder, sweep)
    return f"{text}\nwrote {', '.join(SUMMARY_FILES)} in {folder}"


def main() -> None:
    """Entry point of ``advcli summarize`` (argv as `advcli.cli` leaves it: the command, then the paths)."""
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        sys.exit(0)
    try:
        print(run_summarize(args))
    except UserError as error:
        print(f"advcli: error: {one_paragraph(error)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
