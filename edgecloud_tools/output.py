"""What the operator tools print besides their own sentences: aligned tables and progress lines,
through rich. Tables come out as plain text (no colour, no borders, columns two spaces apart, no
trailing spaces) on a terminal and in a pipe alike, so scripts and tests can read them."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

Justify = Literal["left", "right"]
#: wide enough that no table wraps
_WIDTH = 10_000


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, justify: Sequence[Justify] = (),
          indent: str = "") -> str:
    """``rows`` under ``header``, each column as wide as its widest cell; ``justify`` per column
    (default: left); every line starts with ``indent``. Cells are text as given (never markup)."""
    grid = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1), header_style="none")
    for i, name in enumerate(header):
        grid.add_column(Text(name), justify=justify[i] if i < len(justify) else "left", no_wrap=True)
    for row in rows:
        grid.add_row(*map(Text, row))
    out = io.StringIO()
    Console(file=out, width=_WIDTH, color_system=None, highlight=False, emoji=False).print(grid)
    return "\n".join(indent + line.rstrip() for line in out.getvalue().splitlines())


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
