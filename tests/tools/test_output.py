"""Tables and progress lines of the operator tools (rich, rendered as plain text)."""

from __future__ import annotations

from edgecloud_tools.bench.plan import progress
from edgecloud_tools.output import stderr_line, table


def test_columns_are_as_wide_as_their_widest_cell_and_two_spaces_apart() -> None:
    text = table(("DEVICE", "ONLINE", "ESCALATION"), [("cam-1", "yes", "12.5%"), ("camera-22", "no", "-")],
                 justify=("left", "left", "right"))
    assert text.splitlines() == ["DEVICE     ONLINE  ESCALATION",
                                 "cam-1      yes          12.5%",
                                 "camera-22  no               -"]


def test_cells_are_text_never_markup_and_lines_end_without_spaces() -> None:
    text = table(("[b]", "x"), [("[bold red]alert[/]", ":smile:"), ("a", "")], indent="  ")
    assert text.splitlines() == ["  [b]                 x", "  [bold red]alert[/]  :smile:", "  a"]
    assert "\x1b" not in text


def test_progress_lines_go_to_stderr_as_written(capsys) -> None:
    stderr_line("  cascade: 100/500 [done]")
    progress("stage " + "x" * 200)  # never wrapped at a terminal's width
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert lines[0] == "  cascade: 100/500 [done]"
    assert lines[1].startswith("  bench ") and lines[1].endswith("stage " + "x" * 200)
