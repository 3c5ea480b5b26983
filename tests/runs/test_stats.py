"""advcli.runs.stats: the Wilson interval and the exact McNemar test, checked against scipy's reference computations."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from advcli.runs.stats import format_interval, mcnemar_p_value, outside_noise, wilson_interval

CASES = [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (1, 2), (0, 1000), (1000, 1000), (1, 1000), (873, 1000),
         (9865, 10000), (250, 500)]


@pytest.mark.parametrize("successes, n", CASES)
def test_wilson_interval_matches_scipy(successes, n):
    reference = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(reference.low, abs=1e-9) and high == pytest.approx(reference.high, abs=1e-9)
    assert 0.0 <= low <= successes / n <= high <= 1.0


@pytest.mark.parametrize("confidence", [0.9, 0.99])
def test_wilson_interval_at_another_confidence_matches_scipy(confidence):
    reference = binomtest(37, 120).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(37, 120, confidence) == pytest.approx((reference.low, reference.high), abs=1e-9)


def test_wilson_interval_without_examples_says_nothing_and_refuses_impossible_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for successes, n in ((5, 4), (-1, 4), (0, -1)):
        with pytest.raises(ValueError):
            wilson_interval(successes, n)


@pytest.mark.parametrize("only_a, only_b", [(0, 1), (1, 0), (3, 3), (0, 5), (2, 9), (10, 25), (40, 60),
                                            (120, 80), (0, 6), (500, 560)])
def test_mcnemar_matches_scipys_binomial_test_on_the_discordant_pairs(only_a, only_b):
    reference = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
    assert mcnemar_p_value(only_a, only_b) == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert mcnemar_p_value(only_b, only_a) == mcnemar_p_value(only_a, only_b)  # two-sided: symmetric


def test_mcnemar_without_discordant_pairs_and_what_counts_as_outside_noise():
    assert mcnemar_p_value(0, 0) == 1.0
    assert not outside_noise(0, 5)   # p = 0.0625: five flips all one way is still chance at 5%
    assert outside_noise(0, 6)       # p = 0.03125
    assert outside_noise(0, 6, alpha=0.05) and not outside_noise(0, 6, alpha=0.01)
    # large counts: exact integers, no overflow (a float 2**n would overflow past n = 1023)
    assert mcnemar_p_value(0, 1000) == 2.0**-999 and mcnemar_p_value(0, 3000) == 0.0
    assert mcnemar_p_value(4950, 5050) == pytest.approx(binomtest(4950, 10000, 0.5).pvalue, rel=1e-9)


def test_format_interval_in_percent_points():
    assert format_interval(0.862, 0.891) == "[86.2, 89.1]"
    assert format_interval(0.0, 1.0, digits=2) == "[0.00, 100.00]"


def test_what_counts_as_a_number_and_nan_is_each_callers_named_choice():
    import math

    import numpy as np

    from advcli.runs.stats import is_number

    nan = float("nan")
    assert is_number(nan, nan_is_number=True) and not is_number(nan, nan_is_number=False)
    assert is_number(3, nan_is_number=False) and is_number(np.float32(0.5), nan_is_number=False)
    assert not any(is_number(value, nan_is_number=True) for value in (True, None, "0.5", [1.0]))
    with pytest.raises(TypeError):
        is_number(0.5)  # the choice must be made where it is used

    # a mean over seeds leaves a diverged seed's NaN out; a tracker logs it, so the diverged run shows
    from advcli.runs import seeds, tracking

    members = [{"job": i, "status": "ok", "seed": i, "n": 100, "dir": str(i), "overrides": {}, "pgd_acc": acc}
               for i, acc in enumerate((0.4, nan, 0.6))]
    row = seeds.aggregate(members)
    assert row["pgd_acc_mean"] == pytest.approx(0.5) and row["pgd_acc_n"] == 2
    logged = tracking.result_metrics({"test": {"pgd": {"acc": nan, "loss": 1.0}}})
    assert math.isnan(logged["test/acc/pgd"]) and logged["test/loss/pgd"] == 1.0
    assert math.isnan(tracking.epoch_metrics({"epoch": 1, "train_loss": nan})["train/loss"])
