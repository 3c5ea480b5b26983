"""Argument checks shared by the architectures."""

from __future__ import annotations


def require_positive(model: str, **sizes: int) -> None:
    """Raise ValueError naming ``model`` and every size unless all ``sizes`` are >= 1.

    For the shape arguments that ``build_model`` derives from the dataset (a bad one is a bug, not
    a user's choice; options a user sets are checked with a ``ModelError`` by the model itself).
    """
    if any(value < 1 for value in sizes.values()):
        got = ", ".join(f"{name}={value}" for name, value in sizes.items())
        raise ValueError(f"{model} needs positive sizes; got {got}.")
