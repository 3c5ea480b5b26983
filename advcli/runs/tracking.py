"""What a run tells the experiment trackers chosen with ``logger=...``, and when (the trackers: `advcli.runs.loggers`).

Through every chosen logger, a run (``advcli train`` or ``advcli eval``) logs, from rank 0 only:

- at its start: the resolved config as parameters, and tags saying what ran where (`tracked`);
- after each epoch is saved: the epoch's history entry as metrics at step = epoch (`epoch_metrics`); with
  ``log_batches=true`` also the running training loss and accuracy every ``log_every`` batches, at the global
  batch number, read where the progress bar already waits for them, so no training step waits for a logger;
- at its end: per evaluation attack the test accuracy, loss and 95% interval (`result_metrics`) at step 0 (one
  value per run, which MLflow compares as one bar per run), the sanity verdicts as tags (`result_tags`), the
  results table and the sanity report as texts, and the run directory's files (`run_files`);
- its status: ``FINISHED``, ``FAILED`` (an error) or ``KILLED`` (Ctrl-C, SIGTERM).

The run directory's ``tracking.json`` keeps each logger's run (`advcli.runs.loggers.Logger.state`): a resumed run
continues its own MLflow run, and ``advcli eval`` of its checkpoint is nested under it. A sweep opens one MLflow
parent run (`start_sweep`; its id in the sweep directory's ``tracking.json``, which jobs in other processes read)
and nests each job's run under it; TensorBoard and CSV logs live in each job's folder, so ``tensorboard --logdir
SWEEP_DIR`` shows one run per job. A logger that fails after its run started is dropped with a warning: the
training goes on, and the run directory keeps every number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from advcli import config
from advcli.errors import one_paragraph, ConfigError, Interrupted, TrackingError, UserError
from advcli.runs import loggers, paths, report
from advcli.runs.stats import is_number

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
LOGGERS = ("csv", "tensorboard", "mlflow")
RESULT_KEYS = ("acc", "loss", "acc_with_rejection", "flagged", "attacked")  # per attack row of metrics.json


# --- which loggers --------------------------------------------------------------------------------------

def chosen(cfg: Any) -> dict[str, dict[str, Any]]:
    """``cfg.logger`` as ``{name: options}`` (empty for ``logger=none``); an unknown name is refused."""
    node = cfg.get("logger")
    picked = config.plain(node) if node else {}
    unknown = [name for name, options in picked.items() if name not in LOGGERS or not isinstance(options, dict)]
    if unknown:
        raise ConfigError(f"logger: {unknown[0]} is not a logger advcli knows; the loggers are {', '.join(LOGGERS)} "
                          "(configs/logger/), chosen as logger=mlflow or several as logger=[csv,mlflow], with "
                          "their settings under logger.NAME (e.g. logger.mlflow.tracking_uri=sqlite:///mlflow.db).")
    return picked


def check(cfg: Any) -> None:
    """Before any work: the chosen loggers exist and their libraries import (`loggers.require`)."""
    for name in chosen(cfg):
        loggers.require(name)


# --- what is logged -------------------------------------------------------------------------------------

def _number(value: Any) -> bool:
    """A value a tracker logs: NaN included, so a diverged run shows as one."""
    return is_number(value, nan_is_number=True)


def epoch_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """An epoch's history entry as metrics: ``val_robust_acc`` -> ``val/robust_acc``, ``train_loss`` ->
    ``train/loss``, ``lr`` -> ``train/lr`` (at the epoch's start), ``time_s`` -> ``train/time_s``."""
    return {("val/" + key[4:] if key.startswith("val_") else "train/" + key.removeprefix("train_")): float(value)
            for key, value in entry.items() if key != "epoch" and _number(value)}


def result_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json's test results as ``test/acc/ATTACK`` (and ``test/loss/ATTACK``, ``test/attacked/ATTACK``, ...:
    one group per quantity, so a tracker shows every attack's accuracy side by side), with the 95% interval as
    ``test/ci_low/ATTACK`` and ``test/ci_high/ATTACK`` where the evaluation reports it; the example count as
    ``test/n``; the times as ``time/train_s``, ``time/eval_s``, ``time/wall_s`` (fractions and seconds)."""
    found: dict[str, float] = {}
    counts = []
    for name, row in (metrics.get("test") or {}).items():
        found.update({f"test/{key}/{name}": float(row[key]) for key in RESULT_KEYS if _number(row.get(key))})
        interval = row.get("ci95")
        if isinstance(interval, (list, tuple)) and len(interval) == 2:
            found[f"test/ci_low/{name}"], found[f"test/ci_high/{name}"] = map(float, interval)
        counts += [row["n"]] if _number(row.get("n")) else []
    if counts or _number(metrics.get("num_test", metrics.get("num_examples"))):
        found["test/n"] = float(max(counts) if counts else metrics.get("num_test", metrics.get("num_examples")))
    for key in ("train_time_s", "eval_time_s", "wall_time_s"):
        if _number(metrics.get(key)):
            found[f"time/{key.removesuffix('_time_s')}_s"] = float(metrics[key])
    return found


def result_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The verdicts: ``sanity`` (pass or warn) and ``sanity.CHECK`` per check, ``overfit_guard``, ``warnings``,
    and the evaluation preset."""
    tags = {"evaluation": str(metrics.get("evaluation", "custom"))}
    sanity = metrics.get("sanity")
    if sanity:
        tags["sanity"] = sanity["verdict"]
        tags.update({f"sanity.{check['name']}": check["verdict"] for check in sanity["checks"]})
    guard = metrics.get("overfit_guard")
    if guard is not None:
        tags["overfit_guard"] = "triggered" if guard.get("triggered") else "not triggered"
    if metrics.get("warnings"):
        tags["warnings"] = " | ".join(map(str, metrics["warnings"]))
    return tags


def results_text(metrics: Mapping[str, Any]) -> str:
    """The results table as the terminal shows it."""
    if metrics.get("command") == "train":
        return report.training_results(metrics).strip()
    return report.results_table(metrics["test"], eps=metrics["eps"], norm=metrics["norm"],
                                n=metrics.get("num_examples"), cascade=metrics.get("cascade"))


def run_files(folder: Path) -> list[tuple[Path, str]]:
    """The run directory's files as ``(path, folder in the tracker)``: metrics.json, the log, the pictures, the
    curves, the checkpoints (each logger decides which it keeps), and Hydra's config files under ``hydra``."""
    files = [(path, "") for path in sorted(folder.iterdir())
             if path.is_file() and not path.name.startswith(".") and path.name != TRACKING_FILE]
    return files + [(path, "hydra") for path in sorted((folder / ".hydra").glob("*.yaml"))]


# --- the tracker ----------------------------------------------------------------------------------------

class Tracker:
    """What a run logs, sent to each of its loggers; with none (``logger=none``, or a rank other than 0) a no-op.

    A logger that raises is dropped with a warning, so a tracker that goes away mid-run never ends the training."""

    def __init__(self, opened: Mapping[str, loggers.Logger] | None = None):
        self.loggers = dict(opened or {})

    def _each(self, method: str, *args: Any) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, method)(*args)
            except Exception as error:
                self._drop(name, error)

    def _drop(self, name: str, error: Exception) -> None:
        """Leave a failed logger out from here on, its tracker run ended as FAILED where it still can be."""
        logger = self.loggers.pop(name)
        log.warning("logger %s failed (%s) and is left out from here on; the run goes on, and its directory keeps "
                    "every number", name, one_paragraph(error, with_type=True, limit=300))
        try:
            logger.close("FAILED")
        except Exception:  # noqa: BLE001 - the tracker is already gone; the warning above says so
            pass

    def start(self, cfg_plain: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self._each("log_config", cfg_plain)
        self._each("set_tags", tags)

    def log_epoch(self, entry: Mapping[str, Any]) -> None:
        """One epoch's history entry, at step = epoch."""
        if self.loggers:
            self._each("log_metrics", epoch_metrics(entry), int(entry["epoch"]))

    def on_batches(self, epoch: int, steps_per_epoch: int) -> Callable[[int, float, float], None] | None:
        """For ``log_batches=true``: what the epoch calls at each ``log_every`` sync with (batch, running loss,
        running accuracy); logged as ``batch/train_loss`` and ``batch/train_acc`` at the global batch number."""
        if not self.loggers:
            return None

        def log_batch(batch: int, loss: float, acc: float) -> None:
            step = (epoch - 1) * steps_per_epoch + batch
            self._each("log_metrics", {"batch/train_loss": loss, "batch/train_acc": acc}, step)
        return log_batch

    def log_results(self, metrics: Mapping[str, Any], folder: Path) -> None:
        """The final results, verdicts, texts and the run directory's files."""
        if not self.loggers:
            return
        try:  # what is logged, computed here: a problem in it must not fail a run whose results are on disk
            values, tags, text = result_metrics(metrics), result_tags(metrics), results_text(metrics)
            sanity = report.sanity_table(metrics["sanity"]) if metrics.get("sanity") else None
            files = run_files(Path(folder))
        except Exception as error:  # noqa: BLE001
            for name in list(self.loggers):
                self._drop(name, error)
            return
        self._each("log_metrics", values, 0)  # a run's single value: MLflow compares it as bars
        self._each("set_tags", tags)
        self._each("log_text", "results", text)
        if sanity is not None:
            self._each("log_text", "sanity", sanity)
        self._each("log_files", files)

    def close(self, status: str) -> None:
        self._each("close", status)


# --- a run's loggers -------------------------------------------------------------------------------------

def read_state(folder: Path | None) -> dict[str, Any]:
    """A run (or sweep) directory's ``tracking.json``: ``{logger name: its state}``; empty when there is none."""
    try:
        return json.loads((Path(folder) / TRACKING_FILE).read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return {}


def write_state(folder: Path, state: Mapping[str, Any]) -> None:
    report.write_json(Path(folder) / TRACKING_FILE, dict(state))


def sweep_folder() -> Path | None:
    """The sweep directory when this process runs a job of a multirun."""
    if not paths.in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir)


def run_name(command: str, out: Path, sweep: Path | None) -> str:
    """A sweep job by its folder (``attack=pgd,eps=0.1``: the comparison views read like the sweep), else the
    command and the run directory's last two parts (``train 2026-12-02/10-00-00``)."""
    return out.name if sweep is not None else f"{command} {out.parent.name}/{out.name}"


def open_logger(name: str, options: Mapping[str, Any], out: Path, *, run: str, previous: Mapping[str, Any],
                parent: Mapping[str, Any], tags: Mapping[str, str]) -> loggers.Logger:
    """Logger ``name`` for the run in ``out``; a tracker that cannot start its run stops here, in one paragraph."""
    try:
        if name == "csv":
            return loggers.CsvLogger(out / "csv", continuing=name in previous)
        if name == "tensorboard":
            return loggers.TensorBoardLogger(out / "tensorboard")
        return loggers.MlflowLogger(options, run_name=run, previous=previous.get(name), parent=parent.get(name),
                                    tags=tags)
    except UserError:
        raise
    except Exception as error:
        where = f" at {options['tracking_uri']}" if options.get("tracking_uri") else ""
        raise TrackingError(
            f"logger={name} could not start its run{where}: {one_paragraph(error, with_type=True, limit=400)}. Check "
            f"the logger's settings (logger.{name}.*; for MLflow, logger.mlflow.tracking_uri names the store, e.g. "
            "sqlite:///mlflow.db or http://HOST:5000), or run without it (logger=none).") from None


@contextlib.contextmanager
def tracked(cfg: Any, out: Path, *, command: str, continuing: bool = False, link: Mapping[str, Any] | None = None,
            enabled: bool = True, tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
    """The run's `Tracker` for the ``with`` block: loggers opened, config logged, ended with the run's status.

    ``continuing``: a resumed run, which goes on in the tracker runs of the run directory's ``tracking.json``.
    ``link``: another run's tracking state to nest under (``advcli eval`` under its training run), unless the
    sweep has a parent run. ``enabled``: False on ranks other than 0."""
    picked = chosen(cfg) if enabled else {}
    if not picked:
        yield Tracker()
        return
    out, sweep = Path(out), sweep_folder()
    previous = read_state(out) if continuing else {}
    parent = read_state(sweep) or dict(link or {})
    tags = {"advcli.command": command, "advcli.run_dir": str(out.resolve()), **(tags or {}),
            **({"advcli.sweep_dir": str(sweep.resolve())} if sweep is not None else {})}
    opened: dict[str, loggers.Logger] = {}
    try:
        for name, options in picked.items():
            opened[name] = open_logger(name, options, out, run=run_name(command, out, sweep), previous=previous,
                                       parent=parent, tags=tags)
    except BaseException:
        Tracker(opened).close("FAILED")
        raise
    write_state(out, {name: logger.state() for name, logger in opened.items()})
    tracker = Tracker(opened)
    tracker.start(config.plain(cfg), tags)
    status = "FINISHED"
    try:
        with _terminated_as_interrupted():
            yield tracker
    except BaseException as error:
        status = "KILLED" if isinstance(error, (Interrupted, KeyboardInterrupt)) else "FAILED"
        raise
    finally:
        tracker.close(status)


@contextlib.contextmanager
def _terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM (e.g. SLURM's time limit during the final evaluation) as an `Interrupted` error, so that the tracker
    run ends as KILLED instead of staying RUNNING; training installs its own graceful handler inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        raise Interrupted("SIGTERM stopped the run; the checkpoint of its last finished epoch is kept.", signum)

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def record_evaluation(cfg: Any, out: Path, metrics: Mapping[str, Any]) -> None:
    """``advcli eval``'s run: config, results, verdicts and files, nested under the training run when the
    checkpoint's folder holds that run's ``tracking.json`` (and the store is the same)."""
    if not chosen(cfg):
        return
    ckpt = cfg.get("ckpt")  # None for weights= or robustbench=: no training run to link to
    training = Path(str(ckpt)).resolve().parent if ckpt else None
    link = read_state(training)
    tags = {"advcli.runs.checkpoint": str(metrics.get("checkpoint", ckpt)),
            **({"advcli.training_run_dir": str(training)} if link else {})}
    try:
        with tracked(cfg, out, command="eval", link=link, tags=tags) as tracker:
            tracker.log_results(metrics, out)
    except TrackingError as error:  # the evaluation is done and on disk: a tracker out of reach must not undo it
        log.warning("the evaluation was not logged (%s); its results are in %s", one_paragraph(error), out)


# --- a sweep's parent run --------------------------------------------------------------------------------

def start_sweep(sweep_cfg: Any, sweep_dir: Path, overrides: Sequence[str]) -> None:
    """With MLflow among the loggers: the sweep's parent run (the one an earlier start of this sweep directory
    opened, if any), its state written to the sweep directory's ``tracking.json`` for the jobs to nest under."""
    options = chosen(sweep_cfg).get("mlflow")
    if options is None:
        return
    loggers.require("mlflow")
    tags = {"advcli.command": "sweep", "advcli.sweep_dir": str(Path(sweep_dir).resolve()),
            "advcli.overrides": " ".join(overrides)}
    parent = open_logger("mlflow", options, Path(sweep_dir), run=f"sweep {Path(sweep_dir).parent.name}/"
                         f"{Path(sweep_dir).name}", previous=read_state(sweep_dir), parent={}, tags=tags)
    parent.set_tags(tags)
    write_state(sweep_dir, {"mlflow": parent.state()})


def end_sweep(sweep_dir: Path, files: Sequence[Path], status: str = "FINISHED") -> None:
    """The sweep's summary files as the parent run's artifacts; the parent run ends with ``status``."""
    state = read_state(sweep_dir).get("mlflow")
    if not state:
        return
    parent = loggers.MlflowLogger({"tracking_uri": state["tracking_uri"]}, run_name="", previous=state)
    parent.log_files([(Path(path), "") for path in files if Path(path).is_file()])
    parent.close(status)
