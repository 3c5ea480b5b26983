"""Seeds as statistics: the summary rows of jobs that differ only in ``seed`` become one row, with per column the
mean, the sample standard deviation and n (the seeds that finished).

`group(rows)` takes `advcli.runs.sweep.summarize`'s rows (one per job) and returns one row per group, or None when no
two jobs differ only in their seed (the summary then stays one row per job). A job's settings are its whole config
(the sweep job's ``.hydra/config.yaml``, or the ``settings_id`` a run writes into metrics.json), less ``seed`` and
the settings that change no result (`advcli.config.NOT_IN_FINGERPRINT`: device, logger, output_dir, ...). A job
whose seed or settings are unknown (``advcli eval``, an older metrics.json) is never grouped.

The standard deviation is the sample one (n - 1 in the denominator; none for n = 1). Every seed is evaluated on
the same test examples, so it measures how much training varies, not the test sample's noise (each job's 95%
Wilson interval stays in the per-job summary, ``advcli summarize --per-job``).
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from omegaconf import OmegaConf

from advcli.config import fingerprint_id, flatten, NOT_IN_FINGERPRINT
from advcli.runs import tables
from advcli.runs.stats import is_number

TIMES = ("train_time_s", "eval_time_s")  # averaged besides every accuracy column
SHARED = ("dataset", "model", "attack", "eps", "eps_value", "evaluation")  # the same in every job of a group


def ignored(key: str) -> bool:
    """Whether an override leaves a job in the same group: the seed, or a setting that changes no result."""
    return key == "seed" or any(key == left or key.startswith(left + ".") for left in NOT_IN_FINGERPRINT)


def settings_id(run_config: Any) -> str:
    """A hash of a job's whole config, resolved, less its seed and the settings that change no result: jobs with the
    same id differ only in their seed.

    The one id of a run: ``advcli train`` passes the config it runs with (metrics.json), a sweep's summary the job's
    ``.hydra/config.yaml`` (unresolved, as Hydra saves it); both resolve it here, so ``optimizer.lr: ${lr}`` counts
    as its value either way. The left-out settings are blanked before resolving: they may name the environment or
    Hydra's runtime (``${oc.env:...}``), which a later ``advcli summarize`` does not share."""
    tree = OmegaConf.to_container(run_config, resolve=False) if OmegaConf.is_config(run_config) else dict(run_config)
    node = OmegaConf.create(tree)
    for key in flatten(tree):
        if ignored(key):
            OmegaConf.update(node, key, None, merge=False)
    return fingerprint_id({k: v for k, v in flatten(OmegaConf.to_container(node, resolve=True)).items()
                           if not ignored(k)})


def settings_key(row: dict[str, Any]) -> tuple | None:
    """What a job ran, less its seed (its ``settings_id``); None when its seed or its settings are unknown."""
    if row.get("seed") is None or row.get("settings_id") is None:
        return None
    return ("settings", row["settings_id"])


def group(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """One row per group of jobs that differ only in ``seed``, in the order of each group's first job; None when
    every group would hold one job. Finished jobs also group by the precision they ran in (``amp=auto`` is bf16 on
    one machine, fp32 on another); a failed job joins the group of its settings."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    unfinished = []
    for index, row in enumerate(rows):
        key = settings_key(row)
        if key is None:
            groups[("job", index)] = [row]
        elif row["status"] == "ok":
            groups.setdefault(key + (row.get("precision"),), []).append(row)
        else:
            unfinished.append((key, row))
    for key, row in unfinished:
        groups.setdefault(next((k for k in groups if k[:2] == key), key), []).append(row)
    if all(len(members) == 1 for members in groups.values()):
        return None
    return [aggregate(members) for members in groups.values()]


def _number(value: Any) -> bool:
    """A value a mean over seeds can take: NaN (a diverged seed's accuracy) is left out, not averaged in."""
    return is_number(value, nan_is_number=False)


def statistic_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The columns averaged over seeds: every ``{name}_acc``, then the times, in the rows' order."""
    accuracies = list(dict.fromkeys(key for row in rows for key in row if key.endswith("_acc")))
    return accuracies + [key for key in TIMES if any(key in row for row in rows)]


def status(members: Sequence[dict[str, Any]], done: Sequence[dict[str, Any]]) -> str:
    """``ok`` (every seed finished), ``2 of 3 ok``, or the jobs' own status when none finished."""
    if len(done) == len(members):
        return "ok"
    if done:
        return f"{len(done)} of {len(members)} ok"
    return "failed" if any(row["status"] == "failed" for row in members) else "missing"


def aggregate(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One group's row: what its jobs share, ``seeds`` (of the finished ones), ``n_seeds``, and per statistic
    column ``{column}_mean`` and ``{column}_std`` over the finished jobs (None where there is no value); ``job``
    lists the jobs (space-separated), ``dir`` their directories (separated by ``;``)."""
    done = [row for row in members if row["status"] == "ok"]
    first = (done or members)[0]
    counts = sorted({row["n"] for row in done if _number(row.get("n"))})
    row: dict[str, Any] = {
        "job": " ".join(str(member["job"]) for member in members), "status": status(members, done),
        **{key: first.get(key) for key in SHARED},
        "overrides": {key: value for key, value in first["overrides"].items()  # those every job shares
                      if key != "seed" and all(member["overrides"].get(key) == value for member in members)},
        "n": counts[0] if len(counts) == 1 else "/".join(map(str, counts)) or None,
        "seeds": " ".join(str(member["seed"]) for member in done), "n_seeds": len(done),
        "dir": ";".join(str(member["dir"]) for member in members)}
    for column in statistic_columns(done):
        values = [member[column] for member in done if _number(member.get(column))]
        row[f"{column}_mean"] = statistics.fmean(values) if values else None
        row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row[f"{column}_n"] = len(values)
    return row


def is_grouped(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether summary rows are `group`'s (one per group of seeds) rather than one per job."""
    return any("n_seeds" in row for row in rows)


def mean_text(row: dict[str, Any], column: str) -> str:
    """``87.1 ± 0.4 (n=3)`` in percent points for a fraction column; ``87.1 (n=1)`` for one seed; ``-`` for none."""
    return tables.mean_spread(row.get(f"{column}_mean"), row.get(f"{column}_std"),
                              row.get(f"{column}_n", row.get("n_seeds")))
