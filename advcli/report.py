"""What a run leaves for people: the results table, metrics.json, and one-line epoch summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from advcli.checkpoint import atomic_write
from advcli.config import format_eps


def percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def results_table(results: Mapping[str, Mapping[str, Any]], *, eps: float, norm: str) -> str:
    """A fixed-width table, one row per attack: the threat model, the attack's strength, accuracy, loss."""
    header = f"{'attack':<12} {'eps':<16} {'norm':<5} {'steps':>5} {'restarts':>8} {'accuracy':>9} {'loss':>8}"
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
        lines.append(f"{name:<12} {label:<16} {'-' if is_clean else norm:<5} {steps:>5} {restarts:>8} "
                     f"{percent(row.get('acc')):>9} {loss_text:>8}")
    if "any_attack" in results:
        lines.append(f"{'any attack':<12} {format_eps(eps):<16} {norm:<5} {'':>5} {'':>8} "
                     f"{percent(results['any_attack'].get('acc')):>9} {'':>8}")
    return "\n".join(lines)


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


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
