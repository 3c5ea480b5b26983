"""What a run leaves for people: the results table, metrics.json, one-line epoch summaries, the plots, and
`percent`, the one percent formatter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from advcli.checkpoint import atomic_write
from advcli.config import format_eps


def percent(value: float | None, *, digits: int = 2, sign: bool = True) -> str:
    """A fraction as a percentage, ``0.8734`` -> ``87.34%``; ``-`` where there is no number (None or NaN).

    ``digits`` after the point; ``sign=False`` leaves out the ``%`` (for a column whose title says it)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}" + ("%" if sign else "")


def results_table(results: Mapping[str, Mapping[str, Any]], *, eps: float, norm: str) -> str:
    """A fixed-width table, one row per attack: the threat model, the attack's strength, accuracy, loss.

    For a model with an "adversarial input" output (rows carry ``flagged``) two more columns: the
    fraction flagged (on clean inputs: false flags) and the accuracy with rejection (correct or
    flagged), then a line naming the worst case.
    """
    rejection = any("flagged" in row for row in results.values())
    extra = f" {'flagged':>8} {'w/ reject':>9}" if rejection else ""
    header = f"{'attack':<12} {'eps':<16} {'norm':<5} {'steps':>5} {'restarts':>8} {'accuracy':>9} {'loss':>8}{extra}"
    lines = [header, "-" * len(header)]
    for name, row in results.items():
        if name == "any_attack":
            continue
        is_clean = row.get("attack") == "none"
        steps = "-" if is_clean else str(row.get("steps", "-"))
        restarts = "-" if is_clean else str(row.get("restarts", "-"))
        label = "0" if is_clean else format_eps(eps)
        loss = row.get("loss")
        loss_text = "-" if loss is None else f"{loss:.4f}"
        more = f" {percent(row.get('flagged')):>8} {percent(row.get('acc_with_rejection')):>9}" if rejection else ""
        # on the clean row "flagged" is the false-flag rate
        lines.append(f"{name:<12} {label:<16} {'-' if is_clean else norm:<5} {steps:>5} {restarts:>8} "
                     f"{percent(row.get('acc')):>9} {loss_text:>8}{more}")
    worst = results.get("any_attack", {})
    if "any_attack" in results:
        more = f" {'':>8} {percent(worst.get('acc_with_rejection')):>9}" if rejection else ""
        lines.append(f"{'any attack':<12} {format_eps(eps):<16} {norm:<5} {'':>5} {'':>8} "
                     f"{percent(worst.get('acc')):>9} {'':>8}{more}")
    if rejection and "worst_attack" in worst:
        name = worst["worst_attack"]
        lines.append(f"robust accuracy with rejection to quote: {percent(worst['acc_with_rejection'])} (any attack; the "
                     f"weakest single row is {name}, {percent(results[name]['acc_with_rejection'])}). Only adaptive "
                     "attacks aim past the flag; the non-adaptive rows overstate the defence.")
    return "\n".join(lines)


def training_results(metrics: Mapping[str, Any]) -> str:
    """What ``advcli train`` prints at its end: how the model was trained, the results table, the sanity report."""
    how = metrics["attack"] if metrics["trainer"] == "standard" else f"{metrics['trainer']} ({metrics['attack']})"
    sanity = f"{sanity_table(metrics['sanity'])}\n" if metrics.get("sanity") else ""
    table = results_table(metrics["test"], eps=metrics["eps"], norm=metrics["norm"])
    return (f"\n{metrics['dataset']} / {metrics['model']}, trained with {how} for {metrics['epochs_trained']} epoch(s); "
            f"test set ({metrics['num_test']} examples):\n{table}\n{sanity}"
            f"train {metrics['train_time_s']:.1f}s, eval {metrics['eval_time_s']:.1f}s")


def epoch_line(entry: Mapping[str, Any], epochs: int) -> str:
    """``epoch 3/10  train loss 0.4120 acc 87.10%  val clean 95.20% pgd 80.30%  lr 1.0e-03  41.2s``."""
    parts = [f"epoch {entry['epoch']}/{epochs}",
             f"train loss {entry['train_loss']:.4f} acc {percent(entry['train_acc'])}"]
    val = [f"{key[4:-4]} {percent(value)}" for key, value in entry.items() if key.startswith("val_") and key.endswith("_acc")]
    if val:
        parts.append("val " + " ".join(val))
    parts.append(f"lr {entry['lr']:.1e}")
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


def curve_table(curve: list[Mapping[str, Any]], *, norm: str) -> str:
    """Accuracy per eps (rows) per attack (columns)."""
    names = curve_columns(curve)
    width = max(10, *(len(name) for name in names))
    header = f"{'eps (' + norm + ')':<16} " + " ".join(f"{name.replace('_', ' '):>{width}}" for name in names)
    lines = [header, "-" * len(header)]
    for point in curve:
        cells = " ".join(f"{percent(point['test'][name]['acc']):>{width}}" for name in names)
        lines.append(f"{format_eps(point['eps']) if point['eps'] else '0':<16} {cells}")
    return "\n".join(lines)


def write_curve_csv(path: str | Path, curve: list[Mapping[str, Any]]) -> None:
    """``eps,eps_text,eps_255,<attack>...,any_attack``: accuracies as fractions, one row per eps."""
    import csv
    import io

    names = curve_columns(curve)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["eps", "eps_text", "eps_255", *names])
    for point in curve:
        writer.writerow([f"{point['eps']:.6g}", point["eps_text"], f"{point['eps_255']:.4g}",
                         *(f"{point['test'][name]['acc']:.6f}" for name in names)])
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def plot_curve(path: str | Path, curve: list[Mapping[str, Any]], *, norm: str, title: str = "") -> None:
    """Accuracy against eps, one line per attack, as a PNG (a bare `Figure`: no pyplot, no display needed)."""
    from matplotlib.figure import Figure

    on_255 = all(abs(p["eps_255"] - round(p["eps_255"])) < 1e-6 for p in curve)  # image-style eps: k/255
    xs = [round(p["eps_255"]) if on_255 else p["eps"] for p in curve]
    figure = Figure(figsize=(6, 4), dpi=120)
    ax = figure.add_subplot()
    for name in curve_columns(curve):
        ax.plot(xs, [100 * p["test"][name]["acc"] for p in curve], marker="o",
                linestyle="--" if name == "any_attack" else "-", label=name.replace("_", " "))
    ax.set_xlabel(f"eps x 255 ({norm})" if on_255 else f"eps ({norm}, pixel units)")
    ax.set_ylabel("accuracy (%)")
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
                              ("val_pgd_acc", "held-out PGD", "-")):
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
    norm = metrics["norm"]
    lines = [f"\n{metrics['checkpoint']}: {metrics['dataset']} {metrics['split']} split ({metrics['num_examples']} "
             "examples)"]
    if len(curve) > 1:
        write_curve_csv(out / "robustness_curve.csv", curve)
        plot_curve(out / "robustness_curve.png", curve, norm=norm, title=title)
        lines += [curve_table(curve, norm=norm),
                  f"wrote {out / 'robustness_curve.csv'} and {out / 'robustness_curve.png'}"]
    else:
        lines.append(results_table(metrics["test"], eps=metrics["eps"], norm=norm))
    if metrics["sanity"] is not None:
        lines.append(sanity_table(metrics["sanity"]))
    write_json(out / "metrics.json", metrics)
    print("\n".join([*lines, f"wrote {out / 'metrics.json'}"]))
