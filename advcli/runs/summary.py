"""A sweep's summary: ``summary.csv``, ``summary.md`` and ``summary.png`` from the rows of `advcli.runs.sweep.summarize`.

- ``summary.csv``: one row per job with its overrides, the number of test examples ``n``, clean and robust
  accuracy per evaluation attack (fractions, exactly as in the job's metrics.json) each with its 95% Wilson
  interval (``{name}_ci_low``, ``{name}_ci_high``), training time, status and error line;
- ``summary.md``: the same as a readable table (also what the terminal shows), with ``n`` and the 95% interval
  of the headline (any-attack) accuracy;
- ``summary.png``: clean and robust accuracy against eps with 95% error bars, one line per training attack.

When jobs differ only in ``seed`` (`advcli.runs.seeds`), each file has one row (or point) per group of seeds instead:
``{column}_mean``, ``{column}_std`` and ``n_seeds`` in the CSV, ``87.1 ± 0.4 (n=3)`` in the table, the mean with
one standard deviation as error bars in the plot; ``per_job=True`` (``advcli summarize --per-job``) keeps one row
per job.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

from advcli.errors import SweepError
from advcli.runs import seeds, tables
from advcli.runs.stats import format_interval

SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
IDENTITY = ("dataset", "model", "attack", "eps")  # always known per job; never repeated as override columns

def _pct(value: Any) -> str:
    return tables.percent(value if isinstance(value, (int, float)) else None, sign=False)


def attack_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Evaluation attacks in the order the runs report them (clean first, ``any_attack`` last)."""
    names: list[str] = []
    for row in rows:
        for key in row:
            name = key[:-4] if key.endswith("_acc") else key[:-9] if key.endswith("_acc_mean") else None
            if name is not None and name not in names:
                names.append(name)
    names.sort(key=lambda name: (name != "clean", name.startswith("any_attack")))
    return names


def headline(names: Sequence[str]) -> str:
    """The accuracy a row is judged by: ``any_attack`` (robust to every attack), else the last attack, else clean."""
    return "any_attack" if "any_attack" in names else ([n for n in names if n != "clean"] or ["clean"])[-1]


def _interval(row: dict[str, Any], name: str) -> tuple[float, float] | None:
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return (low, high) if isinstance(low, (int, float)) and isinstance(high, (int, float)) else None


def override_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Override keys across rows, in command-line order, except those shown as their own columns."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row["overrides"] if key not in keys and key not in (*IDENTITY, "evaluation")]
    return keys


def csv_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    if seeds.is_grouped(rows):
        return group_csv_columns(rows)
    accuracies = [column for name in attack_names(rows) for column in (f"{name}_acc", f"{name}_ci_low", f"{name}_ci_high")]
    return (["job", "status", *IDENTITY, "eps_value", *override_keys(rows), "evaluation", "n", *accuracies,
             "train_time_s", "eval_time_s", "error_type", "error", "dir"])


def group_csv_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A group of seeds per row: its jobs, what they share, the seeds, and per column the mean and the std."""
    columns = [*(f"{name}_acc" for name in attack_names(rows)), *seeds.TIMES]
    statistics = [f"{column}_{stat}" for column in columns for stat in ("mean", "std")]
    return ["job", "status", *IDENTITY, "eps_value", *override_keys(rows), "evaluation", "n", "seeds", "n_seeds",
            *statistics, "dir"]


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


def common_and_varying(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Settings that hold the same value in every row (dataset, model, fixed overrides) as ``key=value``, and the
    keys of those that vary (eps and the training attack have columns of their own)."""
    common_text, varying = [], []
    for key in ["dataset", "model", *override_keys(rows), "evaluation"]:
        values = list(dict.fromkeys(str(_cell(row, key)) for row in rows))
        if len(values) == 1 and values[0] != "":  # the same in every row (a blank cell: not overridden there)
            common_text.append(f"{key}={values[0]}")
        elif values != [""]:
            varying.append(key)
    return common_text, varying


def columns_of(titles: Sequence[str], numeric: Sequence[str]) -> list[tables.Column]:
    """The summary's columns: right-aligned those of numbers (``numeric`` titles, and any title ending in ``%``)."""
    return [tables.Column(title, right=title.endswith("%") or title in numeric) for title in titles]


def table(rows: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """The human table and the settings common to all rows (`common_and_varying`): one row per job, with ``n``
    and the 95% interval of the headline accuracy; for groups of seeds, `group_table`."""
    if seeds.is_grouped(rows):
        return group_table(rows)
    common_text, varying = common_and_varying(rows)
    names = attack_names(rows)
    at = names.index(headline(names)) + 1 if names else 0  # the interval goes right after the accuracy it is of
    titles = [n.replace("_", " ") + " %" for n in names]
    titles.insert(at, "95% CI")
    header = ["job", "status", "attack", "eps", *varying, "n", *titles, "train s"]
    body = []
    for row in rows:
        interval = _interval(row, headline(names))
        accuracies = [_pct(row.get(f"{n}_acc")) for n in names]
        accuracies.insert(at, tables.MISSING if interval is None else format_interval(*interval))
        body.append([str(_cell(row, "job")), row["status"], str(_cell(row, "attack")), str(_cell(row, "eps")),
                     *[str(_cell(row, key)) for key in varying], str(row.get("n", tables.MISSING)), *accuracies,
                     tables.fixed(row.get("train_time_s"), 1)])
    return tables.markdown_table(columns_of(header, ("job", "n", "95% CI", "train s")), body), common_text


def group_table(rows: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """One row per group of seeds: its jobs, the seeds that finished, ``n`` (test examples), and per accuracy
    ``87.1 ± 0.4 (n=3)`` (mean ± sample std over n seeds, percent points); the mean training time."""
    common_text, varying = common_and_varying(rows)
    names = attack_names(rows)
    header = ["jobs", "status", "attack", "eps", *varying, "seeds", "n", *[n.replace("_", " ") + " %" for n in names],
              "train s"]
    body = []
    for row in rows:
        body.append([str(_cell(row, "job")), row["status"], str(_cell(row, "attack")), str(_cell(row, "eps")),
                     *[str(_cell(row, key)) for key in varying], row["seeds"] or tables.MISSING, str(row.get("n") or tables.MISSING),
                     *[seeds.mean_text(row, f"{n}_acc") for n in names],
                     tables.fixed(row.get("train_time_s_mean"), 1)])
    return tables.markdown_table(columns_of(header, ("n", "train s")), body), common_text


def format_duration(seconds: float) -> str:
    """``42 s``, ``7.3 min``, ``2.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def describe(rows: Sequence[dict[str, Any]], sweep: dict | None = None,
             groups: Sequence[dict[str, Any]] | None = None) -> str:
    """summary.md's text: the table (of ``groups`` of seeds when given, else of the job ``rows``), what all jobs
    shared, the failed jobs' errors, the sweep's wall time."""
    text, common = table(groups or rows)
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
    lines += ["", text, "", footnote(rows, grouped=groups is not None)]
    if any(row.get("evaluation") == "fast" for row in rows):
        lines += ["", "**fast evaluation**: gradient attacks only, which overstate the robustness of models whose "
                  "gradients mislead; quote numbers from `evaluation=default` (or `evaluation=autoattack`)."]
    if failed:
        lines += ["", "Failed or unfinished jobs:" if tally["missing"] else "Failed jobs:", ""]
        shared = {item.split("=", 1)[0] for item in common}
        for row in failed:
            settings = " ".join(f"{k}={v}" for k, v in row["overrides"].items() if k not in shared)
            kind = f"{row['error_type']}: " if row["error_type"] and not row["user_error"] else ""
            lines.append(f"- job {_cell(row, 'job')} ({settings or row['dir']}): {kind}{row['error']}")
    return "\n".join(lines) + "\n"


def footnote(rows: Sequence[dict[str, Any]], *, grouped: bool) -> str:
    """What the table's numbers are."""
    names = [n for n in attack_names(rows) if n not in ("clean", "any_attack")]
    text = (f"Accuracy in % on the n test examples: clean, and under each evaluation attack ({', '.join(names)}); "
            "`any attack` counts an example as robust only if every attack failed. ")
    if grouped:
        return text + (
            "Each row holds the jobs that differ only in `seed`: per accuracy, the mean over the seeds that finished "
            "± the sample standard deviation (n - 1 in the denominator; none for n = 1), then n. Every seed is "
            "evaluated on the same test examples, so ± is the spread from training, not the test sample's noise; each "
            "job's own numbers and 95% intervals: `advcli summarize --per-job`. `train s`: mean training time.")
    return text + (f"`95% CI`: the Wilson score interval of the `{headline(attack_names(rows)).replace('_', ' ')}` "
                   "accuracy (summary.csv holds one for every accuracy). `train s`: training time.")


def _points(rows: Sequence[dict[str, Any]], name: str) -> tuple[list[float], list[list[float]]]:
    """One line of summary.png: accuracies in % (NaN: none) and their error bars below and above (0: no interval);
    for groups of seeds, the mean and one sample standard deviation either side."""
    if seeds.is_grouped(rows):
        y = [100 * r[f"{name}_acc_mean"] if r.get(f"{name}_acc_mean") is not None else math.nan for r in rows]
        spread = [100 * (r.get(f"{name}_acc_std") or 0.0) for r in rows]
        return y, [spread, spread]
    y, below, above = [], [], []
    for row in rows:
        value, interval = row.get(f"{name}_acc"), _interval(row, name)
        y.append(100 * value if isinstance(value, (int, float)) else math.nan)
        # max(0, ...): a stored interval rounds independently of the accuracy; matplotlib refuses negative bars
        below.append(max(0.0, y[-1] - 100 * interval[0]) if interval else 0.0)
        above.append(max(0.0, 100 * interval[1] - y[-1]) if interval else 0.0)
    return y, [below, above]


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """summary.png: clean (dashed) and robust (solid, worst case over the evaluation attacks) accuracy
    with 95% error bars against eps, one colour per training attack (and per value of any other swept setting);
    for groups of seeds, the mean with one standard deviation as error bars.

    Uses matplotlib's object API with the Agg canvas, so no global backend is switched. Returns False
    (and writes nothing) when no finished job has a numeric eps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finished = [r for r in rows if r["status"] == "ok" or r.get("n_seeds")]
    done = [r for r in finished if isinstance(r.get("eps_value"), (int, float))]
    if not done:
        return False
    names = attack_names(done)
    robust = headline(names)
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
            y, error = _points(group, name)
            ax.errorbar(x, y, yerr=error, fmt=style, color=colour, ms=4, capsize=2, elinewidth=0.8,
                        label=f"trained {label}: {what}")
    ticks = sorted({r["eps_value"]: str(r["eps"]) for r in done}.items())
    ax.set_xticks([t for t, _ in ticks], [text for _, text in ticks])
    ax.set_xlabel("eps (train and test)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    what = f"robust = worst case over {', '.join(attacked)}" if robust == "any_attack" else f"robust = {robust}"
    settings = textwrap.wrap(" ".join(common), width=90, max_lines=2, placeholder=" ...")
    bars = ("points: the mean over the seeds; bars: ± one sample standard deviation" if seeds.is_grouped(done)
            else "bars: 95% Wilson score intervals")
    ax.set_title("\n".join([*settings, what, bars]), fontsize=7)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def write_summary(rows: Sequence[dict[str, Any]], folder: Path, sweep: dict | None = None, *,
                  per_job: bool = False) -> str:
    """Write summary.csv, summary.md and summary.png into ``folder``; returns summary.md's text. Jobs that differ
    only in ``seed`` make one row per group (`advcli.runs.seeds.group`) unless ``per_job``."""
    folder = Path(folder)
    groups = None if per_job else seeds.group(rows)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(groups or rows, folder / "summary.csv")
        text = describe(rows, sweep, groups)
        plotted = plot(groups or rows, folder / "summary.png")
        if not plotted and (folder / "summary.png").exists():
            (folder / "summary.png").unlink()  # an earlier summary's plot would not match this table
        (folder / "summary.md").write_text(text + ("\n![clean and robust accuracy against eps](summary.png)\n"
                                                   if plotted else ""))
    except OSError as error:
        raise SweepError(f"The summary cannot be written to {folder} ({error.strerror or error}). "
                         "Pass another folder with advcli summarize --out DIR PATH ...") from None
    return text



def summary_folder(paths: Sequence[Path]) -> Path:
    """Where the files go by default: the one path given, else the deepest folder holding all of them."""
    if len(paths) == 1:
        return paths[0]
    resolved = [p.resolve() for p in paths]
    common = resolved[0].parent
    while not all(common in p.parents for p in resolved):
        common = common.parent
    return common
