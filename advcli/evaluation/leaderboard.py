"""RobustBench out: an evaluation's result as a ``model_info`` JSON file, the format of RobustBench's
leaderboard entries (``model_info/DATASET/THREAT/NAME.json`` in the robustbench repository).

A leaderboard number must come from the leaderboard's protocol: standard AutoAttack (the reference code, all of
its attacks) on the whole test set, at one eps. `check_protocol` refuses anything else before any work.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Mapping

from advcli import config
from advcli.errors import ConfigError

# the field names of RobustBench's model_info files, in their order
FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
          "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable")


def check_protocol(attack_cfgs: Mapping[str, Any], *, num_examples: int | None, split: str, eps_values,
                   amp: str, cascaded: set[str] = frozenset()) -> None:
    """Refuse (one paragraph) to write a leaderboard entry from anything but standard AutoAttack, once, in full
    precision, on the whole test set at one eps, on every example (``cascaded``: the attacks that run only on
    what others left standing)."""
    problems = []
    kinds = {name: config.attack_kind(cfg) for name, cfg in attack_cfgs.items()}
    aa = [name for name, kind in kinds.items() if kind == "autoattack"]
    if len(aa) != 1:
        problems.append("the evaluation does not run AutoAttack (use evaluation=autoattack)" if not aa else
                        f"it runs AutoAttack {len(aa)} times ({', '.join(aa)}); the entry needs exactly one")
    else:
        settings = attack_cfgs[aa[0]]
        if settings.get("version", "standard") != "standard" or settings.get("attacks") is not None:
            problems.append(f"AutoAttack runs version={settings.get('version')} attacks={settings.get('attacks')}, not "
                            "the standard version with all of its attacks")
        if aa[0] in cascaded:
            problems.append(f"{aa[0]} runs in a cascade, only on what the attacks before it left standing, so its "
                            "row is not AutoAttack's own number")
    if num_examples is not None:
        problems.append(f"evaluation.num_examples={num_examples} takes a subset of the test set (set it to null)")
    if split != "test":
        problems.append(f"split={split} is not the test set")
    if len(eps_values) != 1:
        problems.append("a leaderboard entry is for one eps, not a curve")
    if amp != "off":
        problems.append(f"evaluation.amp={amp} attacks in reduced precision (the protocol is full precision: off)")
    if problems:
        raise ConfigError(
            "model_info.path is set, but this evaluation is not RobustBench's protocol: " + "; ".join(problems) +
            ". A leaderboard number must not come from a weaker or partial evaluation: run advcli eval "
            "evaluation=autoattack (standard AutoAttack, the whole test set) to write model_info.")


def eps_text(eps: float, norm: str = "linf") -> str:
    """An L-inf radius that is a whole number of 255ths as ``8/255``, as RobustBench writes them; else the number
    (L2 radii such as 0.5)."""
    in_255 = Fraction(eps).limit_denominator(10_000) * 255
    return f"{int(in_255)}/255" if norm == "linf" and in_255.denominator == 1 and eps > 0 else f"{eps:g}"


def model_info(metrics: Mapping[str, Any], about: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model_info`` entry of an evaluation (``metrics``: advcli eval's metrics.json) and what only the user
    knows (``about``: name, authors, link, venue, reported, additional_data, footnote)."""
    results = metrics["test"]
    robust = next(row for name, row in results.items() if row.get("attack") == "autoattack")
    entry = {
        "link": about.get("link") or "", "name": about.get("name") or metrics["model"],
        "authors": about.get("authors") or "", "additional_data": bool(about.get("additional_data", False)),
        "number_forward_passes": 1, "dataset": metrics["dataset"], "venue": about.get("venue") or "",
        "architecture": about.get("architecture") or metrics["model"], "eps": eps_text(metrics["eps"], metrics["norm"]),
        "clean_acc": f"{100 * results['clean']['acc']:.2f}",
        "reported": str(about.get("reported") or ""),  # the paper's own figure: only the user knows it
        "autoattack_acc": f"{100 * robust['acc']:.2f}", "footnote": about.get("footnote") or "",
        "unreliable": False,
    }
    return {field: entry[field] for field in FIELDS}
