"""The experiment trackers a run can log to (``logger=csv``, ``tensorboard``, ``mlflow``), each behind one small
interface; `advcli.runs.tracking` decides what is logged and when.

A logger takes the resolved config (`log_config`), metrics at an integer step (`log_metrics`), string tags
(`set_tags`), a Markdown text (`log_text`), the run directory's files (`log_files`) and ends with a status
(`close`: ``FINISHED``, ``FAILED`` or ``KILLED``). `state` is what the run directory's ``tracking.json`` keeps so
that a resumed run continues the same tracker run. Each library is imported when its logger is chosen, so the
trackers stay optional extras (`require`).
"""

from __future__ import annotations

import csv
import importlib
import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from omegaconf import OmegaConf

from advcli.config import flatten
from advcli.errors import MissingExtra, TrackingError

log = logging.getLogger(__name__)

# logger name -> (module its library is imported from, the advcli extra that installs it)
LIBRARIES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def require(name: str) -> None:
    """Import the library of logger ``name``, or stop with a one-paragraph `MissingExtra`."""
    if name not in LIBRARIES:
        return
    module, extra = LIBRARIES[name]
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(
            f"logger={name} needs the {extra} package, which cannot be imported here ({error}). Install it with "
            f"pip install 'advcli[{extra}]' (or pip install 'advcli[track]' for every tracker), or pick another "
            "logger: logger=csv needs nothing, and logger=none (the default) keeps the run directory's files only."
        ) from None


class Logger(Protocol):
    def state(self) -> dict[str, Any]: ...
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_text(self, name: str, text: str) -> None: ...
    def log_files(self, files: Sequence[tuple[Path, str]]) -> None: ...
    def close(self, status: str) -> None: ...


def flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: a config as the flat string parameters trackers compare runs by."""
    return {key: "null" if value is None else str(value) for key, value in flatten(config).items()}


# --- csv ------------------------------------------------------------------------------------------------

class CsvTable:
    """One CSV file of metric rows: ``step``, then one column per metric; a new metric rewrites the file with the
    wider header (as Lightning's CSVLogger does), else a row is appended. ``continuing``: keep the rows there."""

    def __init__(self, path: Path, *, continuing: bool):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if continuing and path.is_file():
            with open(path, newline="") as handle:
                self.rows = list(csv.DictReader(handle))
        self.columns = list(self.rows[0]) if self.rows else ["step"]

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        new = [key for key in row if key not in self.columns]
        self.columns += new
        rewrite = bool(new) or len(self.rows) == 1  # a wider header, or a fresh run's first row
        with open(self.path, "w" if rewrite else "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, restval="", lineterminator="\n")
            if rewrite:
                writer.writeheader()
            writer.writerows(self.rows if rewrite else [row])


class CsvLogger:
    """``logger=csv``: in ``FOLDER`` (the run directory's ``csv/``), ``metrics.csv`` (a row per logged step: the
    epoch, or 0 for the test results), ``batches.csv`` (``log_batches=true``: at the global batch
    number), ``config.yaml``, ``tags.yaml`` and the texts as Markdown files. Other files stay where the run
    directory has them. ``continuing``: a resumed run, whose rows go on after those already there."""

    def __init__(self, folder: Path, *, continuing: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tables = {name: CsvTable(self.folder / f"{name}.csv", continuing=continuing)
                       for name in ("metrics", "batches")}
        self.tags: dict[str, str] = {}

    def state(self) -> dict[str, Any]:
        return {"folder": str(self.folder)}

    def log_config(self, config: Mapping[str, Any]) -> None:
        OmegaConf.save(OmegaConf.create(dict(config)), self.folder / "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        batch_level = all(key.startswith("batch/") for key in metrics)
        self.tables["batches" if batch_level else "metrics"].add({"step": step, **metrics})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)
        OmegaConf.save(OmegaConf.create(self.tags), self.folder / "tags.yaml")

    def log_text(self, name: str, text: str) -> None:
        (self.folder / f"{name}.md").write_text(text)

    def log_files(self, files: Sequence[tuple[Path, str]]) -> None:
        pass  # they are in the run directory already, beside csv/

    def close(self, status: str) -> None:
        self.set_tags({"status": status})


# --- tensorboard -----------------------------------------------------------------------------------------

class TensorBoardLogger:
    """``logger=tensorboard``: a ``SummaryWriter`` (torch.utils.tensorboard) on ``FOLDER`` (the run directory's
    ``tensorboard/``, so ``tensorboard --logdir`` on a sweep directory shows one run per job): metrics as
    scalars, the config and the texts in the Text tab, PNG files as images, and at a finished run's end the
    flat config with every metric's last value in the HParams tab (TensorBoard's comparison of runs)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metric_names: list[str] = []

    def state(self) -> dict[str, Any]:
        return {"log_dir": str(self.folder)}

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.params = flat_params(config)
        yaml = OmegaConf.to_yaml(OmegaConf.create(dict(config)))
        self.writer.add_text("config", "    " + yaml.replace("\n", "\n    "))  # indented: a code block

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
            if key not in self.metric_names:
                self.metric_names.append(key)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_text(self, name: str, text: str) -> None:
        self.writer.add_text(name, "    " + text.replace("\n", "\n    "))

    def log_files(self, files: Sequence[tuple[Path, str]]) -> None:
        from matplotlib.image import imread

        for path, _ in files:
            if path.suffix == ".png":
                self.writer.add_image(f"files/{path.stem}", imread(path)[..., :3], dataformats="HWC")

    def close(self, status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.set_tags({"status": status})
        self.writer.add_text("tags", "\n".join(f"- **{key}**: {value}" for key, value in self.tags.items()))
        if status == "FINISHED":  # once per run: a resumed run's earlier legs end KILLED or FAILED
            writer = self.writer._get_file_writer()
            for summary in hparams({**self.params, **self.tags}, dict.fromkeys(self.metric_names, 0.0)):
                writer.add_summary(summary)
        self.writer.close()


# --- mlflow ----------------------------------------------------------------------------------------------

class MlflowLogger:
    """``logger=mlflow``: one MLflow run through ``MlflowClient`` (no global active run, so several runs in one
    process never mix): the flat config as parameters, metrics with their step, tags, files as artifacts.

    ``previous``: the `state` of the run to continue (a resumed run); ``parent``: the state of a run to nest
    this one under (a sweep's parent run, or for ``advcli eval`` the training run), when it is in the same store.
    """

    def __init__(self, options: Mapping[str, Any], *, run_name: str, previous: Mapping[str, Any] | None = None,
                 parent: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None):
        from mlflow import MlflowClient

        self.uri = store_uri(options.get("tracking_uri"))
        self.client = MlflowClient(tracking_uri=self.uri)
        self.checkpoints = bool(options.get("log_checkpoints"))  # *.pt files are large: uploaded only when asked
        self.run_id = self._continue(previous)
        if self.run_id is None:
            nested = parent is not None and parent.get("tracking_uri") == self.uri
            experiment = parent["experiment_id"] if nested else experiment_id(self.client, self.uri, options)
            extra = {"mlflow.parentRunId": parent["run_id"]} if nested else {}
            run = self.client.create_run(experiment, run_name=options.get("run_name") or run_name,
                                         tags={**(tags or {}), **extra})
            self.run_id = run.info.run_id
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id

    def _continue(self, previous: Mapping[str, Any] | None) -> str | None:
        """The run to go on with: ``previous``'s, if it is in this store and still there."""
        from mlflow.exceptions import MlflowException

        if not previous or previous.get("tracking_uri") != self.uri:
            return None
        try:
            self.client.update_run(previous["run_id"], status="RUNNING")
        except MlflowException as error:  # deleted from the store since: a new run
            log.warning("MLflow run %s cannot be continued (%s); starting a new one", previous["run_id"], error)
            return None
        return previous["run_id"]

    def state(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self.client.get_run(self.run_id).data.params  # a run's parameters are written once
        params = flat_params(config)
        changed = [key for key in params if logged.get(mlflow_key(key), params[key][:MAX_PARAM_VAL_LENGTH])
                   != params[key][:MAX_PARAM_VAL_LENGTH]]
        if changed:
            log.info("MLflow keeps a run's parameters as first logged; changed on resume: %s",
                     ", ".join(f"{key}={params[key]}" for key in changed))
        fresh = [Param(mlflow_key(key), value[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()
                 if mlflow_key(key) not in logged]
        for start in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=fresh[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(key), float(value), now, step)
                                                    for key, value in metrics.items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        self.client.log_batch(self.run_id, tags=[RunTag(mlflow_key(key), str(value)[:MAX_TAG_VAL_LENGTH])
                                                 for key, value in tags.items()])

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{name}.md")

    def log_files(self, files: Sequence[tuple[Path, str]]) -> None:
        for path, folder in files:
            if path.suffix == ".pt" and not self.checkpoints:
                continue
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def mlflow_key(name: str) -> str:
    """A parameter, metric or tag name as MLflow takes it: letters, digits, ``_ - . / :`` and spaces, 250 at most
    (a config key or an attack name with another character would make MLflow refuse the whole batch)."""
    return re.sub(r"[^\w\-./: ]", "_", name)[:250]


def store_uri(tracking_uri: str | None) -> str:
    """``logger.mlflow.tracking_uri``, else MLflow's default (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``),
    with a local SQLite file made absolute: the run's ``tracking.json`` then names the same store from any folder
    (a resumed run, ``advcli eval`` linking to its training run)."""
    import mlflow

    uri = str(tracking_uri or mlflow.get_tracking_uri())
    prefix = "sqlite:///"
    if uri.startswith(prefix) and uri != prefix + ":memory:" and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def experiment_id(client: Any, uri: str, options: Mapping[str, Any]) -> str:
    """The id of experiment ``options.experiment_name``, created if missing (with its artifacts beside a local
    SQLite store, see `artifact_location`); another process creating it at the same moment is fine."""
    from mlflow.exceptions import MlflowException

    name = options.get("experiment_name") or "advcli"
    for _ in range(2):
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, options))
        except MlflowException:  # created meanwhile by another sweep job: look again
            continue
    raise TrackingError(f"The MLflow experiment {name!r} can neither be found nor created in {uri}; "
                        "check logger.mlflow.tracking_uri and logger.mlflow.experiment_name.")


def artifact_location(tracking_uri: str, options: Mapping[str, Any]) -> str | None:
    """``logger.mlflow.artifact_location``, else for a local SQLite store the ``mlruns`` folder beside the
    database file (MLflow's own default is ``./mlruns`` of whichever folder the run started in), else the
    server's default (None)."""
    if options.get("artifact_location"):
        return str(options["artifact_location"])
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and tracking_uri != prefix + ":memory:":
        return (Path(tracking_uri[len(prefix):]).parent / "mlruns").as_uri()
    return None
