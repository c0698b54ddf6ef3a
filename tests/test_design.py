"""The code's citations of the design: every ``docs/design.md §n`` names a section the document has."""

from __future__ import annotations

import re

from tests.conftest import ROOT

DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"docs/design\.md((?:,? §\d+)+)")


def test_every_cited_section_exists() -> None:
    sections = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.MULTILINE))
    assert sections, "docs/design.md has no numbered sections"
    cited = {}
    for package in ("edgecloud", "edge_agent", "cloud_gateway", "edgecloud_tools", "tests"):
        for path in (ROOT / package).rglob("*.py"):
            for match in CITATION.finditer(path.read_text()):
                for number in re.findall(r"\d+", match[1]):
                    cited.setdefault(number, f"{path.relative_to(ROOT)}")
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert cited and not missing, f"cited sections missing from docs/design.md: {missing}"
