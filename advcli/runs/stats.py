"""How sure an accuracy is: the Wilson score interval of a proportion, and the exact McNemar test for two
accuracies measured on the same examples.

Standard library only (`math`, `statistics.NormalDist`): the package needs no scipy at run time; the tests
check both against scipy.

- `wilson_interval(k, n)`: the Wilson score interval (no continuity correction) of ``k`` successes in ``n``
  trials. Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to a point at 0%
  or 100%, which robust accuracies often come close to.
- `mcnemar_p_value(b, c)`: two accuracies on the *same* examples differ only through the examples one got
  right and the other wrong (``b`` and ``c``); the exact test asks whether ``b`` vs ``c`` could be a fair coin.
  This is far more sensitive than comparing two intervals, which ignores that the examples are shared.
- `is_number(value, nan_is_number=...)`: the one test of what a result file's value counts as a number.
"""

from __future__ import annotations

import math
import numbers
from statistics import NormalDist


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``successes / n``, as fractions ``(low, high)``.

    ``n = 0`` says nothing about the proportion: ``(0.0, 1.0)``. Equals scipy's
    ``binomtest(successes, n).proportion_ci(confidence, method="wilson")``.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    # at k = 0 (k = n) the lower (upper) bound is 0 (1) exactly; the formula leaves a rounding error there
    low = 0.0 if successes == 0 else (centre - spread) / scale
    high = 1.0 if successes == n else (centre + spread) / scale
    return low, high


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value for two classifiers (or attacks) scored on the same examples.

    ``only_a``: examples A got right and B wrong; ``only_b``: the reverse. Under "no difference" each such
    discordant example is a fair coin flip, so p = min(1, 2 P[Bin(b + c, 1/2) <= min(b, c)]); 1.0 when there
    are no discordant examples. Equals scipy's ``binomtest(min(b, c), b + c, 0.5).pvalue``.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0, got {only_a} and {only_b}")
    total = only_a + only_b
    if total == 0:
        return 1.0
    # integer sum, one division: exact for any count (2**total would overflow a float past ~1000)
    tail = sum(math.comb(total, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**total)


def outside_noise(only_a: int, only_b: int, alpha: float = 0.05) -> bool:
    """Whether two accuracies on the same examples differ by more than chance would explain (McNemar p < alpha)."""
    return mcnemar_p_value(only_a, only_b) < alpha


def format_interval(low: float, high: float, digits: int = 1) -> str:
    """An interval of fractions in percent points, ``(0.862, 0.891)`` -> ``[86.2, 89.1]``."""
    return f"[{100 * low:.{digits}f}, {100 * high:.{digits}f}]"


def is_number(value: object, *, nan_is_number: bool) -> bool:
    """Whether ``value`` is a real number (a bool is not). ``nan_is_number`` is the caller's choice, made at every
    call: a mean over seeds must leave NaN out (False), a tracker logs it so a diverged run shows (True)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return nan_is_number or not math.isnan(value)
