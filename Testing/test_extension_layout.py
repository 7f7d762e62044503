"""The Slicer extension's files agree with each other (what a Slicer build would otherwise catch late)."""

from __future__ import annotations

import ast
import re
import xml.dom.minidom
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "NormativeAnomaly"


def _cmake_list(name: str) -> list[str]:
    text = (MODULE / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({name}\n(.*?)\n\s*\)", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_every_python_file_of_the_module_is_listed_in_cmake():
    listed = set(_cmake_list("MODULE_PYTHON_SCRIPTS"))
    on_disk = {"${MODULE_NAME}.py"} | {str(p.relative_to(MODULE)) for p in (MODULE / "NormativeAnomalyLib").rglob("*.py")}
    assert on_disk == listed, f"missing: {sorted(on_disk - listed)}, stale: {sorted(listed - on_disk)}"


def test_listed_resources_exist():
    for resource in _cmake_list("MODULE_PYTHON_RESOURCES"):
        assert (MODULE / resource.replace("${MODULE_NAME}", "NormativeAnomaly")).is_file(), resource


def test_module_file_defines_the_slicer_classes():
    tree = ast.parse((MODULE / "NormativeAnomaly.py").read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"NormativeAnomaly", "NormativeAnomalyWidget", "NormativeAnomalyLogic", "NormativeAnomalyTest"} <= classes


def test_ui_file_is_valid_and_has_the_bound_widgets():
    document = xml.dom.minidom.parse(str(MODULE / "Resources" / "UI" / "NormativeAnomaly.ui"))
    names = {w.getAttribute("name") for w in document.getElementsByTagName("widget")}
    assert {"inputVolumeSelector", "modelSelector", "applyButton"} <= names


def test_core_library_imports_no_slicer_or_qt():
    for path in (MODULE / "NormativeAnomalyLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in {"slicer", "qt", "ctk", "vtk"} for n in names), (path, names)
