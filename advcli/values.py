"""A value as the user types it -> a checked plain value, or a one-paragraph `ConfigError` naming the key.

Numbers go through `fractions.Fraction` (``eps=8/255``), never `eval`. Shared by every wing through `advcli.config`,
which re-exports these names; imports nothing of advcli but `advcli.errors`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from advcli.errors import ConfigError


def parse_eps(value: Any, *, norm: str = "linf", dim: int | None = None) -> float:
    """Parse an epsilon as typed (``8/255``, ``0.03137``, ``0``) into a float in pixel units.

    Pixels are in [0, 1], so an L-inf radius above 1 means nothing; an L2 radius is bounded by the
    diagonal of the image cube, sqrt(dim), where ``dim`` = C*H*W is known.
    """
    text = str(value).strip()
    hint = "Write eps as a number or a fraction in pixel units, e.g. eps=8/255, eps=0.03137 or eps=0."
    if isinstance(value, bool):
        raise ConfigError(f"eps={text} is not a number. {hint}")
    try:
        eps = Fraction(text)
    except ZeroDivisionError:
        raise ConfigError(f"eps={text} divides by zero. {hint}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"eps={text} is not a number. {hint}") from None
    if eps < 0:
        raise ConfigError(f"eps={text} is negative; a perturbation budget is a radius, 0 or more. {hint}")
    if norm == "linf" and eps > 1:
        raise ConfigError(
            f"eps={text} is larger than 1, but pixels lie in [0, 1], so an L-inf radius above 1 allows "
            f"any image. Did you mean eps={text}/255? {hint}"
        )
    if norm == "l2" and dim is not None and eps > math.sqrt(dim):
        raise ConfigError(
            f"eps={text} is larger than the L2 diameter of the pixel cube (sqrt({dim}) = {math.sqrt(dim):.1f}), "
            f"so it allows any image. {hint}"
        )
    return float(eps)


def format_eps(eps: float) -> str:
    """A human label: ``0.0314 (8/255)`` for image data, where eps*255 is (nearly) whole."""
    scaled = eps * 255
    if eps > 0 and abs(scaled - round(scaled)) < 1e-6:
        return f"{eps:.4g} ({round(scaled)}/255)"
    return f"{eps:.4g}"


def require_int(name: str, value: Any, *, minimum: int, hint: str = "") -> int:
    """`value` as an int >= `minimum`, or a ConfigError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            as_float = math.nan
        if not as_float.is_integer():
            raise ConfigError(f"{name}={value} is not a whole number; set {name} to an integer >= {minimum}. {hint}".strip())
        value = int(as_float)
    if value < minimum:
        raise ConfigError(f"{name}={value} is too small; it must be an integer >= {minimum}. {hint}".strip())
    return value


def require_positive(name: str, value: Any, hint: str = "") -> float:
    """`value` as a float > 0, or a ConfigError naming the key."""
    try:
        number = float(Fraction(str(value)))
    except (ValueError, ZeroDivisionError, TypeError):
        raise ConfigError(f"{name}={value} is not a number; set {name} to a positive number. {hint}".strip()) from None
    if not number > 0 or not math.isfinite(number):
        raise ConfigError(f"{name}={value} must be a positive number. {hint}".strip())
    return number


def require_between(name: str, value: Any, low: float, high: float | None, hint: str = "") -> float:
    """`value` as a float in [low, high] (no upper bound when ``high`` is None), or a ConfigError naming the key."""
    try:
        number = float(Fraction(str(value)))
    except (ValueError, ZeroDivisionError, TypeError):
        raise ConfigError(f"{name}={value} is not a number. {hint}".strip()) from None
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        span = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise ConfigError(f"{name}={value} must be {span}. {hint}".strip())
    return number


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a ConfigError listing them. (The one place where an unquoted
    ``off``, which YAML 1.1 reads as false, becomes ``"off"`` again.)"""
    if value is False and "off" in choices:  # YAML 1.1 reads an unquoted `off` as false
        return "off"
    if value not in choices:
        raise ConfigError(f"{name}={value} is not one of the valid choices: {', '.join(choices)}. Set {name}=CHOICE.")
    return value
