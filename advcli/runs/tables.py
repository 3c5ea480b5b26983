"""The one builder of advcli's tables: columns (title, alignment, width), rendered as fixed-width text (the results
table, the robustness curve) or as a Markdown table padded to read in a terminal too (a sweep's summary), and the
cell formats every table shares (percent, mean ± spread, seconds; ``-`` where there is no value).

The modules that print tables (`advcli.runs.report`, `advcli.runs.summary`, `advcli.runs.seeds`) only say which
columns and which cells; how a table is laid out is decided here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

from advcli.runs.stats import is_number

MISSING = "-"  # a cell without a value


@dataclass(frozen=True)
class Column:
    """A column: its title, ``right`` alignment (numbers), and for text tables its ``width`` (a longer cell
    overflows and shifts the rest of its line, so no value is ever cut)."""

    title: str
    right: bool = False
    width: int = 0


Row = Union[Sequence[str], str]  # the cells of a row, or a line of its own (a note between rows)


def text_line(columns: Sequence[Column], cells: Sequence[str]) -> str:
    """One line of a text table; a row with fewer cells than columns ends early."""
    return " ".join(f"{cell:{'>' if column.right else '<'}{column.width}}" for column, cell in zip(columns, cells))


def text_table(columns: Sequence[Column], rows: Sequence[Row]) -> list[str]:
    """A fixed-width table's lines: the titles, a rule as long as them, the rows (a str row as it is)."""
    header = text_line(columns, [column.title for column in columns])
    return [header, "-" * len(header), *(row if isinstance(row, str) else text_line(columns, row) for row in rows)]


def markdown_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, each column as wide as its widest cell so it reads in a terminal too; a right-aligned
    column gets ``:`` in its rule, as Markdown renders it."""
    lines = [[column.title for column in columns], *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.rjust(width) if column.right else cell.ljust(width)
                                 for column, cell, width in zip(columns, cells, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" if column.right else "-" * (width + 2)
                          for column, width in zip(columns, widths)) + "|"
    return "\n".join([line(lines[0]), rule, *map(line, rows)])


def percent(value: Any, *, digits: int = 2, sign: bool = True) -> str:
    """A fraction as a percentage, ``0.8734`` -> ``87.34%``; ``-`` where there is no number (None or NaN).

    ``digits`` after the point; ``sign=False`` leaves out the ``%`` (for a column whose title says it)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{100 * value:.{digits}f}" + ("%" if sign else "")


def fixed(value: Any, digits: int) -> str:
    """A number with ``digits`` after the point (a loss, seconds); ``-`` for none."""
    return f"{value:.{digits}f}" if is_number(value, nan_is_number=True) else MISSING


def mean_spread(mean: Any, spread: Any, count: Any) -> str:
    """``87.1 ± 0.4 (n=3)`` in percent points from fractions; ``87.1 (n=1)`` without a spread; ``-`` without a
    mean."""
    if not is_number(mean, nan_is_number=False):
        return MISSING
    shown = f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f}" if is_number(spread, nan_is_number=False) else "")
    return f"{shown} (n={count})"


def text(value: Any) -> str:
    """A cell from any value: its text, ``-`` for None."""
    return MISSING if value is None else str(value)
