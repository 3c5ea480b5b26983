"""What a run leaves for people: the results table, metrics.json, one-line epoch summaries, the plots (the tables'
layout and cell formats, `percent` among them, are `advcli.runs.tables`').

Every test accuracy shown or written here carries its number of examples and a 95% Wilson score interval
(`advcli.runs.stats`): read from the evaluation's ``n`` and ``ci95``, or, for a metrics.json written before
those keys, computed from the accuracy and the run's example count (`accuracy_interval`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from advcli.config import format_eps, renamed_choice
from advcli.runs import tables
from advcli.runs.checkpoint import atomic_write
from advcli.runs.stats import format_interval, wilson_interval
from advcli.runs.tables import percent  # noqa: F401  (report.percent: where other wings have always found it)


def examples_in(row: Mapping[str, Any], n: int | None = None) -> int | None:
    """How many examples a summary row's accuracy is over: its ``n``, else ``n`` (the run's count, for a
    metrics.json written before rows carried one); None when neither is a count."""
    count = row.get("n", n)
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def accuracy_interval(row: Mapping[str, Any], n: int | None = None, *,
                      key: str = "acc") -> tuple[float, float] | None:
    """The 95% Wilson interval of ``row[key]``, as fractions; None where there is no accuracy or no count.

    For ``acc`` the evaluation's own ``ci95`` is used when present; otherwise (another key, or an older
    metrics.json) it is computed from the fraction and `examples_in`: the fraction is k/n exactly, so
    rounding recovers k."""
    stored = row.get("ci95") if key == "acc" else None
    if isinstance(stored, (list, tuple)) and len(stored) == 2 and all(isinstance(v, (int, float)) for v in stored):
        return float(stored[0]), float(stored[1])
    value, count = row.get(key), examples_in(row, n)
    if not isinstance(value, (int, float)) or math.isnan(value) or not count:
        return None
    return wilson_interval(min(count, max(0, round(value * count))), count)


def interval_text(interval: tuple[float, float] | None) -> str:
    """``[86.2, 89.1]`` (percent points), ``-`` for no interval."""
    return "-" if interval is None else format_interval(*interval)


def accuracy_text(row: Mapping[str, Any], n: int | None = None) -> str:
    """``87.34% [86.2, 89.1]``: the accuracy and its 95% interval; the accuracy alone where there is no interval."""
    interval = accuracy_interval(row, n)
    return percent(row.get("acc")) + ("" if interval is None else f" {format_interval(*interval)}")


def interval_footnote(counts: set[int]) -> str:
    """The line under a table with intervals: which interval, over how many examples."""
    n = (f"{min(counts)}" if len(counts) == 1 else f"{min(counts)} to {max(counts)}") if counts else "?"
    return f"95% confidence intervals: Wilson score, n = {n} examples"


def results_table(results: Mapping[str, Mapping[str, Any]], *, eps: float, norm: str, n: int | None = None,
                  cascade: bool | None = None) -> str:
    """A fixed-width table, one row per attack: the threat model, the attack's strength, accuracy with its
    95% interval, loss; a footnote names the interval and the number of examples.

    ``n``: the number of examples, for rows without their own ``n`` (an older metrics.json); without
    either the interval column shows ``-`` and the footnote is left out. ``cascade``: the attacks ran as a
    cascade; an ``attacked`` column gives the examples each one ran on. A cascade's rows share the loss at the
    worst point kept so far: the column is then titled ``loss*`` and a line under the table says so.

    For a model with an "adversarial input" output (rows carry ``flagged``) two more columns: the
    fraction flagged (on clean inputs: false flags) and the accuracy with rejection (correct or
    flagged), then a line naming the worst case.
    """
    rejection = any("flagged" in row for row in results.values())
    shared_loss = any(row.get("in_cascade") for row in results.values())
    lines = tables.text_table(_result_columns(rejection=rejection, cascade=bool(cascade), shared_loss=shared_loss),
                              _result_rows(results, eps=eps, norm=norm, n=n, rejection=rejection, cascade=cascade))
    worst = results.get("any_attack", {})
    if rejection and "worst_attack" in worst:
        name = worst["worst_attack"]
        quoted = interval_text(accuracy_interval(worst, n, key="acc_with_rejection"))
        lines.append(f"robust accuracy with rejection to quote: {percent(worst['acc_with_rejection'])} {quoted} (any "
                     f"attack; the weakest single row is {name}, {percent(results[name]['acc_with_rejection'])}). Only "
                     "adaptive attacks aim past the flag; the non-adaptive rows overstate the defence.")
    escalated = {name: row for name, row in results.items() if row.get("escalated")}
    if escalated:
        lines.append("gradients misled (the attacks after the first broke more than evaluation.escalate.when of what it "
                     "left): " + "; ".join(f"{name} ran with {_settings_text(row.get('escalated_settings', {}))} on "
                                           f"{row['escalated']} examples" for name, row in escalated.items()))
    if shared_loss:
        lines.append(SHARED_LOSS_NOTE)
    shown = [row for row in results.values() if accuracy_interval(row, n) is not None]
    if shown:
        lines.append(interval_footnote({examples_in(row, n) for row in shown} - {None}))
    return "\n".join(lines)


SHARED_LOSS_NOTE = ("loss*: the mean cross-entropy at each attack's output; in the cascade, at the worst point kept so "
                    "far (the attacks above it included), so it repeats where an attack found no worse point")
CASCADE_NOTE = (f"{'':<12} then a cascade on what those left standing, each attack on what the ones above it left "
                "(accuracy after it):")


def _result_columns(*, rejection: bool, cascade: bool, shared_loss: bool) -> list[tables.Column]:
    Column = tables.Column
    return [Column("attack", width=12), Column("eps", width=16), Column("norm", width=5),
            Column("steps", right=True, width=5), Column("restarts", right=True, width=8),
            Column("accuracy", right=True, width=9), Column("95% CI", right=True, width=14),
            Column("loss*" if shared_loss else "loss", right=True, width=8),
            *([Column("flagged", right=True, width=8), Column("w/ reject", right=True, width=9)] if rejection else []),
            *([Column("attacked", right=True, width=8)] if cascade else [])]


def _result_rows(results: Mapping[str, Mapping[str, Any]], *, eps: float, norm: str, n: int | None,
                 rejection: bool, cascade: bool | None) -> list[tables.Row]:
    """The results table's rows: one per attack (the cascade's note above its first row), then ``any attack``."""
    rows: list[tables.Row] = []
    alone_above = False
    for name, row in results.items():
        if name == "any_attack":
            continue
        is_clean = row.get("attack") == "none"
        if alone_above and row.get("in_cascade"):
            rows.append(CASCADE_NOTE)
        alone_above = not is_clean and not row.get("in_cascade")
        steps = "-" if is_clean else str(row.get("steps", row.get("queries", "-")))  # Square: one query a step
        # on the clean row "flagged" is the false-flag rate
        rows.append([name, "0" if is_clean else format_eps(eps), "-" if is_clean else norm, steps,
                     "-" if is_clean else str(row.get("restarts", "-")), percent(row.get("acc")),
                     interval_text(accuracy_interval(row, n)), tables.fixed(row.get("loss"), 4),
                     *([percent(row.get("flagged")), percent(row.get("acc_with_rejection"))] if rejection else []),
                     *(["-" if is_clean else str(row.get("attacked", "-"))] if cascade else [])])
    if "any_attack" in results:
        worst = results["any_attack"]
        rows.append(["any attack", format_eps(eps), norm, "", "", percent(worst.get("acc")),
                     interval_text(accuracy_interval(worst, n)), "",
                     *(["", percent(worst.get("acc_with_rejection"))] if rejection else [])])
    return rows


EVALUATION_NOTES = {
    "fast": "fast evaluation (evaluation=fast): gradient attacks only, each row that attack's own accuracy; it can "
            "overstate robustness where gradients mislead: quote evaluation=default",
    "default": "default evaluation: FGSM and PGD alone (each row that attack's own accuracy), then standard "
               "AutoAttack's attacks at its budgets as a cascade after a cheap margin PGD (each row the accuracy after "
               "that attack and those above it); the last row is the number to quote",
    "autoattack": "standard AutoAttack (evaluation=autoattack), run by the reference code",
}


def evaluation_note(metrics: Mapping[str, Any]) -> str:
    """The line above a results table that says which evaluation made it ("" for a metrics.json without one)."""
    preset = metrics.get("evaluation")
    return "" if not preset else EVALUATION_NOTES.get(preset, f"evaluation={preset}") + "\n"


def _settings_text(settings: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in settings.items()) or "stronger settings"


def training_results(metrics: Mapping[str, Any]) -> str:
    """What ``advcli train`` prints at its end: how the model was trained, the results table, the sanity report."""
    trainer = renamed_choice("trainer", metrics["trainer"])  # runs recorded before min-max was named minmax
    how = metrics["attack"] if trainer == "minmax" else f"{trainer} ({metrics['attack']})"
    how += f" for {metrics['epochs_trained']} epoch(s)"
    if metrics.get("ema_decay") is not None:
        how += f", evaluated as the EMA of its weights (decay {metrics['ema_decay']})"
    if metrics.get("awp_gamma"):
        how += f", with adversarial weight perturbation (gamma {metrics['awp_gamma']:g}"
        how += f" after {metrics['awp_warmup']:g} epoch(s))" if metrics.get("awp_warmup") else ")"
    sanity = f"{sanity_table(metrics['sanity'])}\n" if metrics.get("sanity") else ""
    table = results_table(metrics["test"], eps=metrics["eps"], norm=metrics["norm"], n=metrics.get("num_test"),
                          cascade=metrics.get("cascade"))
    return (f"\n{metrics['dataset']} / {metrics['model']}, trained with {how}; "
            f"test set ({metrics['num_test']} examples):\n{evaluation_note(metrics)}{table}\n{sanity}"
            f"train {metrics['train_time_s']:.1f}s, eval {metrics['eval_time_s']:.1f}s")


def epoch_line(entry: Mapping[str, Any], epochs: int) -> str:
    """``epoch 3/10  train loss 0.4120 acc 87.10%  val clean 95.20% robust 80.30%  lr(mean) 1.0e-03  41.2s``."""
    parts = [f"epoch {entry['epoch']}/{epochs}",
             f"train loss {entry['train_loss']:.4f} acc {percent(entry['train_acc'])}"]
    val = [f"{key[4:-4]} {percent(value)}" for key, value in entry.items() if key.startswith("val_") and key.endswith("_acc")]
    if val:
        parts.append("val " + " ".join(val))
    # the epoch's mean: its first rate alone reads as "trained at lr 0" on a one-cycle schedule's first epoch
    parts.append(f"lr(mean) {entry['lr_mean']:.1e}" if "lr_mean" in entry else f"lr {entry['lr']:.1e}")
    parts.append(f"{entry['time_s']:.1f}s")
    return "  ".join(parts)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


# --- robustness curve and sanity report (advcli eval eps=a,b,c) ---------------------------------

def curve_columns(curve: list[Mapping[str, Any]]) -> list[str]:
    """The attack names of a robustness curve, in evaluation order, ``any_attack`` last."""
    names = [name for name in curve[0]["test"] if name != "any_attack"]
    return names + ["any_attack"]


def curve_table(curve: list[Mapping[str, Any]], *, norm: str, n: int | None = None) -> str:
    """Accuracy and its 95% interval per eps (rows) per attack (columns), and the interval's footnote.

    ``n``: the number of examples, for points whose rows carry no ``n`` (an older metrics.json)."""
    names = curve_columns(curve)
    cells = [[accuracy_text(point["test"][name], n) for name in names] for point in curve]
    width = max(10, *(len(name) for name in names), *(len(cell) for row in cells for cell in row))
    columns = [tables.Column(f"eps ({norm})", width=16),
               *(tables.Column(name.replace("_", " "), right=True, width=width) for name in names)]
    lines = tables.text_table(columns, [[format_eps(point["eps"]) if point["eps"] else "0", *row]
                                        for point, row in zip(curve, cells)])
    counts = {examples_in(p["test"][name], n) for p in curve for name in names} - {None}
    if counts:
        lines.append(interval_footnote(counts))
    return "\n".join(lines)


def curve_point_cells(point: Mapping[str, Any], names: list[str], n: int | None) -> list[str]:
    """One eps of the curve CSV: the count, then each attack's accuracy and interval (fractions; blank: unknown)."""
    counts = {examples_in(point["test"][name], n) for name in names} - {None}
    cells = [str(max(counts)) if counts else ""]
    for name in names:
        interval = accuracy_interval(point["test"][name], n)
        cells += [f"{point['test'][name]['acc']:.6f}", *([""] * 2 if interval is None else
                                                          (f"{bound:.6f}" for bound in interval))]
    return cells


def write_curve_csv(path: str | Path, curve: list[Mapping[str, Any]], n: int | None = None) -> None:
    """``eps,eps_text,eps_255,n,<attack>,<attack>_ci_low,<attack>_ci_high,...,any_attack,...``: accuracies and
    their 95% Wilson intervals as fractions, one row per eps; ``n`` as in `curve_table`."""
    import csv
    import io

    names = curve_columns(curve)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["eps", "eps_text", "eps_255", "n",
                     *(column for name in names for column in (name, f"{name}_ci_low", f"{name}_ci_high"))])
    for point in curve:
        writer.writerow([f"{point['eps']:.6g}", point["eps_text"], f"{point['eps_255']:.4g}",
                         *curve_point_cells(point, names, n)])
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def plot_curve(path: str | Path, curve: list[Mapping[str, Any]], *, norm: str, title: str = "",
               n: int | None = None) -> None:
    """Accuracy against eps, one line per attack with its 95% interval as a shaded band, as a PNG (a bare
    `Figure`: no pyplot, no display needed); ``n`` as in `curve_table`."""
    from matplotlib.figure import Figure

    on_255 = all(abs(p["eps_255"] - round(p["eps_255"])) < 1e-6 for p in curve)  # image-style eps: k/255
    xs = [round(p["eps_255"]) if on_255 else p["eps"] for p in curve]
    figure = Figure(figsize=(6, 4), dpi=120)
    ax = figure.add_subplot()
    for name in curve_columns(curve):
        (line,) = ax.plot(xs, [100 * p["test"][name]["acc"] for p in curve], marker="o",
                          linestyle="--" if name == "any_attack" else "-", label=name.replace("_", " "))
        intervals = [accuracy_interval(p["test"][name], n) or (math.nan, math.nan) for p in curve]
        ax.fill_between(xs, [100 * lo for lo, _ in intervals], [100 * hi for _, hi in intervals],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel(f"eps x 255 ({norm})" if on_255 else f"eps ({norm}, pixel units)")
    ax.set_ylabel("accuracy (%); band: 95% Wilson CI")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png"))


def plot_training_curves(path: str | Path, history: list[Mapping[str, Any]], *, title: str = "") -> None:
    """Per-epoch accuracy (training on attacked batches, held-out clean and PGD) and training loss, as a PNG.

    Held-out PGD accuracy is the curve to watch: a collapse while training accuracy rises is catastrophic
    overfitting."""
    from matplotlib.figure import Figure

    epochs = [entry["epoch"] for entry in history]
    figure = Figure(figsize=(9, 3.6), dpi=100)
    accuracy, loss = figure.subplots(1, 2)
    for key, label, style in (("train_acc", "training (attacked batches)", ":"), ("val_clean_acc", "held-out clean", "--"),
                              ("val_robust_acc", "held-out robust", "-")):
        points = [(entry["epoch"], 100 * entry[key]) for entry in history if key in entry]
        if points:
            accuracy.plot(*zip(*points), marker="o", linestyle=style, label=label)
    accuracy.set_ylabel("accuracy (%)")
    accuracy.set_ylim(-2, 102)
    accuracy.legend(fontsize=8)
    loss.plot(epochs, [entry["train_loss"] for entry in history], marker="o", label="training loss")
    loss.set_ylabel("cross-entropy on attacked batches")
    for ax in (accuracy, loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png"))


def sanity_table(sanity: Mapping[str, Any]) -> str:
    """The sanity report: one line per check (verdict, what it asks, the numbers), the likely cause under a warning."""
    lines = [f"sanity checks (Athalye et al. 2018; Carlini et al. 2019) on the first {sanity['num_examples']} "
             f"examples: {sanity['verdict'].upper()}"]
    for item in sanity["checks"]:
        lines.append(f"  {item['verdict'].upper():<5} {item['check']}: {item['detail']}")
        if item.get("likely_cause"):
            lines.append(f"        likely cause: {item['likely_cause']}")
    return "\n".join(lines)


def write_eval_report(out: Path, metrics: Mapping[str, Any], curve: list[Mapping[str, Any]], *, title: str) -> None:
    """metrics.json, and for an eps list the robustness curve as CSV and PNG; prints the tables."""
    norm, n = metrics["norm"], metrics.get("num_examples")
    lines = [f"\n{metrics['checkpoint']}: {metrics['dataset']} {metrics['split']} split ({metrics['num_examples']} "
             "examples)", *filter(None, [evaluation_note(metrics).rstrip()])]
    if len(curve) > 1:
        write_curve_csv(out / "robustness_curve.csv", curve, n=n)
        plot_curve(out / "robustness_curve.png", curve, norm=norm, title=title, n=n)
        lines += [curve_table(curve, norm=norm, n=n),
                  f"wrote {out / 'robustness_curve.csv'} and {out / 'robustness_curve.png'}"]
    else:
        lines.append(results_table(metrics["test"], eps=metrics["eps"], norm=norm, n=n,
                                   cascade=metrics.get("cascade")))
    if metrics["sanity"] is not None:
        lines.append(sanity_table(metrics["sanity"]))
    write_json(out / "metrics.json", metrics)
    print("\n".join([*lines, f"wrote {out / 'metrics.json'}"]))
