"""advcli.runs.report: every accuracy in the results table and the robustness curve (table, CSV, PNG) carries its
number of examples and its 95% Wilson interval, checked against scipy on planted metrics."""

from __future__ import annotations

import csv
import json

import pytest
from scipy.stats import binomtest

from advcli.runs import report


def scipy_wilson(successes: int, n: int) -> tuple[float, float]:
    reference = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return reference.low, reference.high


def shown(successes: int, n: int) -> str:
    """The interval as the tables print it: percent points, one decimal."""
    low, high = scipy_wilson(successes, n)
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


CORRECT = {"clean": 987, "fgsm": 951, "pgd": 920, "any_attack": 918}  # of 1000 examples


def planted_rows(n: int = 1000, *, stored: bool = True) -> dict:
    """metrics["test"] as the evaluation writes it (``stored``: with ``n`` and ``ci95``, else as an older run)."""
    rows = {"clean": {"attack": "none", "loss": 0.04}, "fgsm": {"attack": "fgsm", "steps": 1, "restarts": 1, "loss": 0.15},
            "pgd": {"attack": "pgd", "steps": 20, "restarts": 1, "loss": 0.22}, "any_attack": {}}
    for name, row in rows.items():
        row["acc"] = CORRECT[name] / n
        if stored:
            row.update(n=n, ci95=list(scipy_wilson(CORRECT[name], n)))
    return rows


def training_metrics(**rows_options) -> dict:
    return {"dataset": "mnist", "model": "cnn", "trainer": "standard", "attack": "pgd", "epochs_trained": 5,
            "num_test": 1000, "test": planted_rows(**rows_options), "eps": 0.3, "norm": "linf", "sanity": None,
            "train_time_s": 1.0, "eval_time_s": 2.0}


@pytest.mark.parametrize("stored", [True, False], ids=["rows with n and ci95", "older metrics.json"])
def test_results_table_shows_each_accuracys_wilson_interval_and_its_n(stored):
    text = report.training_results(training_metrics(stored=stored))
    lines = text.splitlines()
    assert "95% CI" in next(line for line in lines if line.startswith("attack"))
    for name, label in (("clean", "clean"), ("fgsm", "fgsm"), ("pgd", "pgd"), ("any_attack", "any attack")):
        row = next(line for line in lines if line.startswith(label + " "))
        assert f"{CORRECT[name] / 10:.2f}%" in row and shown(CORRECT[name], 1000) in row, row
    assert "95% confidence intervals: Wilson score, n = 1000 examples" in lines


def test_results_table_without_a_count_shows_no_interval():
    rows = planted_rows(stored=False)
    text = report.results_table(rows, eps=0.3, norm="linf")
    assert "Wilson" not in text and "[" not in text
    assert report.accuracy_interval(rows["pgd"]) is None


def test_the_accuracy_with_rejection_to_quote_carries_its_interval():
    rows = planted_rows(stored=True)
    for name in ("clean", "fgsm", "pgd"):
        rows[name].update(flagged=0.01, acc_with_rejection=rows[name]["acc"])
    rows["any_attack"].update(acc_with_rejection=0.931, worst_attack="pgd")
    quote = next(line for line in report.results_table(rows, eps=0.3, norm="linf").splitlines()
                 if line.startswith("robust accuracy with rejection to quote"))
    assert f"93.10% {shown(931, 1000)}" in quote


def curve_metrics(*, stored: bool) -> tuple[dict, list[dict]]:
    """An `advcli eval eps=0,0.1,0.3` result on 200 examples, as evaluate_checkpoint hands it to the report."""
    n, correct = 200, [{"clean": 190, "pgd": 190, "any_attack": 190}, {"clean": 190, "pgd": 120, "any_attack": 111},
                       {"clean": 190, "pgd": 0, "any_attack": 0}]
    curve = []
    for eps, counts in zip((0.0, 0.1, 0.3), correct):
        test = {name: {"acc": k / n, **({"n": n, "ci95": list(scipy_wilson(k, n))} if stored else {})}
                for name, k in counts.items()}
        curve.append({"eps": eps, "eps_text": str(eps), "eps_255": eps * 255, "test": test})
    metrics = {"checkpoint": "ckpt.pt", "dataset": "mnist", "split": "test", "num_examples": n, "norm": "linf",
               "eps": 0.3, "test": curve[-1]["test"], "curve": curve, "sanity": None}
    return metrics, correct


@pytest.mark.parametrize("stored", [True, False], ids=["rows with n and ci95", "older metrics.json"])
def test_the_robustness_curve_carries_n_and_intervals_in_table_csv_and_plot(tmp_path, capsys, stored):
    metrics, correct = curve_metrics(stored=stored)
    report.write_eval_report(tmp_path, metrics, metrics["curve"], title="planted")
    rows = list(csv.DictReader((tmp_path / "robustness_curve.csv").open()))
    assert list(rows[0])[:4] == ["eps", "eps_text", "eps_255", "n"]
    for row, counts in zip(rows, correct):
        assert row["n"] == "200"
        for name, k in counts.items():
            low, high = scipy_wilson(k, 200)
            assert float(row[name]) == pytest.approx(k / 200, abs=1e-6)
            assert float(row[f"{name}_ci_low"]) == pytest.approx(low, abs=1e-6)
            assert float(row[f"{name}_ci_high"]) == pytest.approx(high, abs=1e-6)
    printed = capsys.readouterr().out
    assert f"55.50% {shown(111, 200)}" in printed and f"0.00% {shown(0, 200)}" in printed
    assert "95% confidence intervals: Wilson score, n = 200 examples" in printed
    assert (tmp_path / "robustness_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "metrics.json").read_text())["curve"] == metrics["curve"]


@pytest.mark.parametrize("preset,said", [("fast", "fast evaluation"), ("default", "default evaluation: FGSM and PGD alone"),
                                         ("autoattack", "standard AutoAttack")])
def test_the_results_say_which_evaluation_made_them(preset, said):
    metrics = {**training_metrics(), "evaluation": preset, "cascade": preset == "default"}
    for name, row in metrics["test"].items():
        row["attacked"] = {"clean": 0, "fgsm": 987, "pgd": 951}.get(name)
    lines = report.training_results(metrics).splitlines()
    assert said in next(line for line in lines if line.startswith(said.split(":")[0].split(" (")[0]))
    header = next(line for line in lines if line.startswith("attack"))
    # a cascade says how many examples each attack ran on: fgsm on the 987 clean-correct, pgd on fgsm's survivors
    assert ("attacked" in header) == (preset == "default")
    if preset == "default":
        assert next(line for line in lines if line.startswith("pgd ")).split()[-1] == "951"
        assert next(line for line in lines if line.startswith("clean ")).split()[-1] == "-"
    assert "fast evaluation" not in report.training_results(training_metrics())  # an older metrics.json: no label


def test_a_cascades_shared_loss_is_labelled_and_explained():
    rows = planted_rows()
    plain = report.results_table(rows, eps=0.3, norm="linf").splitlines()
    assert plain[0].split()[-1] == "loss" and not any(line.startswith("loss*") for line in plain)
    rows["pgd"]["in_cascade"] = True  # pgd ran on what fgsm left: its loss is at the worst point kept so far
    lines = report.results_table(rows, eps=0.3, norm="linf", cascade=True).splitlines()
    assert lines[0].split()[-2:] == ["loss*", "attacked"] and len(lines[0]) == len(lines[1])
    assert report.SHARED_LOSS_NOTE in lines and report.SHARED_LOSS_NOTE.startswith("loss*: ")
    assert any(line.startswith(" " * 12 + " then a cascade") for line in lines)


def test_one_table_builder_aligns_columns_and_shows_missing_values_as_a_dash():
    from advcli.runs import tables

    columns = [tables.Column("name"), tables.Column("acc %", right=True)]
    text = tables.markdown_table(columns, [["pgd", tables.percent(0.5, sign=False)],
                                           ["a longer name", tables.percent(None)]])
    assert text.splitlines() == ["| name          | acc % |", "|---------------|------:|",
                                 "| pgd           | 50.00 |", "| a longer name |     - |"]
    fixed = [tables.Column("a", width=4), tables.Column("b", right=True, width=6)]
    assert tables.text_table(fixed, [["x", "1.0"], "a note", ["toolong", "2"]]) == [
        "a         b", "-----------", "x       1.0", "a note", "toolong      2"]  # a long cell overflows, never cut
    assert tables.mean_spread(0.871, 0.004, 3) == "87.1 ± 0.4 (n=3)" and tables.mean_spread(float("nan"), 0, 1) == "-"
    assert tables.fixed(None, 1) == "-" and tables.fixed(2.25, 1) == "2.2"
