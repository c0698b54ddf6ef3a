"""The import layers: core ← services ← tools. The core imports neither service nor the tools, the two
services never import each other, and neither service imports the tools; read from the source's own
import statements, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("edgecloud", "edge_agent", "cloud_gateway", "edgecloud_tools")
#: package → the packages it must never import
FORBIDDEN = {
    "edgecloud": {"edge_agent", "cloud_gateway", "edgecloud_tools"},
    "edge_agent": {"cloud_gateway", "edgecloud_tools"},
    "cloud_gateway": {"edge_agent", "edgecloud_tools"},
    "edgecloud_tools": set(),
}


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level package → first line importing it, for every import in ``path`` (also strings given
    to ``importlib.import_module`` and ``python -m``-style module names in string constants)."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.split(":")[0]
            if text.count(".") >= 1 and text.split(".")[0] in PACKAGES and text.replace(".", "").replace(
                    "_", "").isalnum():
                names = [text]
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_generated" not in p.parts)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_layers_below(package: str) -> None:
    files = sources(package)
    assert files, f"no sources found for {package}"
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {other}"
             for path in files for other, line in imported_packages(path).items()
             if other in FORBIDDEN[package]]
    assert not wrong, "imports across the layers:\n" + "\n".join(wrong)


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from cloud_gateway.server import Gateway\n    return 'edge_agent.cli'\n")
    assert set(imported_packages(probe)) == {"cloud_gateway", "edge_agent"}
