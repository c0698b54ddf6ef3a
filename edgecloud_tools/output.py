"""What the operator tools print besides their own sentences: aligned tables, and progress lines
through rich. Tables come out as plain text (no colour, no borders, columns two spaces apart, no
trailing spaces) on a terminal and in a pipe alike, so scripts and tests can read them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from rich.cells import cell_len
from rich.console import Console

Justify = Literal["left", "right"]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, justify: Sequence[Justify] = (),
          indent: str = "") -> str:
    """``rows`` under ``header``, each column as wide as its widest cell (in terminal cells, so wide
    characters line up) and two spaces apart; ``justify`` per column (default: left); every line
    starts with ``indent``. Cells are text as given (never markup). Padded here rather than laid out
    by rich's Table, which takes 0.4 s for the 1,000 lines of a fleet's status."""
    grid = [list(header), *(list(row) for row in rows)]
    widths = [max(cell_len(line[i]) for line in grid if i < len(line)) for i in range(len(header))]

    def pad(i: int, cell: str) -> str:
        gap = " " * (widths[i] - cell_len(cell))
        return gap + cell if i < len(justify) and justify[i] == "right" else cell + gap

    return "\n".join((indent + "  ".join(pad(i, cell) for i, cell in enumerate(line))).rstrip()
                     for line in grid)


def stderr_line(text: str) -> None:
    """One progress line on stderr as it is (no markup, no wrapping, no colour in a pipe)."""
    Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True).print(text)


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def columns(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned."""
    justify = ["left"] + ["right"] * (len(header) - 1)
    return table(header, list(rows), justify=justify, indent="  ").splitlines()
