"""The Slicer extension's files agree with each other (what a Slicer build would otherwise catch late)."""

from __future__ import annotations

import ast
import os
import re
import xml.dom.minidom
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "NormativeAnomaly"


def _cmake_list(name: str) -> list[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(rf"set\({name}\n(.*?)\n\s*\)", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


# The web app is a second front end installed with pip (``normative-anomaly serve``, needing trame);
# it is not part of the Slicer extension, so its files are not in the module's CMakeLists.
NOT_IN_EXTENSION = ("NormativeAnomalyWeb",)


def _module_python_files() -> list[Path]:
    return [p for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts
            and p.relative_to(MODULE).parts[0] not in NOT_IN_EXTENSION]


def test_every_python_file_of_the_module_is_listed_in_cmake():
    listed = set(_cmake_list("MODULE_PYTHON_SCRIPTS"))
    on_disk = {str(p.relative_to(MODULE)).replace("NormativeAnomaly.py", "${MODULE_NAME}.py", 1)
               if p.parent == MODULE else str(p.relative_to(MODULE)) for p in _module_python_files()}
    assert on_disk == listed, f"missing: {sorted(on_disk - listed)}, stale: {sorted(listed - on_disk)}"


def test_listed_resources_exist():
    for resource in _cmake_list("MODULE_PYTHON_RESOURCES"):
        assert (MODULE / resource.replace("${MODULE_NAME}", "NormativeAnomaly")).is_file(), resource


def test_module_file_defines_the_slicer_classes():
    tree = ast.parse((MODULE / "NormativeAnomaly.py").read_text(encoding="utf-8"))
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"NormativeAnomaly", "NormativeAnomalyWidget", "NormativeAnomalyLogic", "NormativeAnomalyTest"} <= classes


def _ui_widgets() -> dict[str, dict[str, str]]:
    """objectName -> {"class": ..., "SlicerParameterName": ...} of every widget in the .ui."""
    document = xml.dom.minidom.parse(str(MODULE / "Resources" / "UI" / "NormativeAnomaly.ui"))
    widgets = {}
    for widget in document.getElementsByTagName("widget"):
        entry = {"class": widget.getAttribute("class")}
        for prop in widget.getElementsByTagName("property"):
            if prop.parentNode is widget and prop.getAttribute("name") == "SlicerParameterName":
                entry["SlicerParameterName"] = prop.getElementsByTagName("string")[0].firstChild.data
        widgets[widget.getAttribute("name")] = entry
    return widgets


def test_every_widget_the_module_code_uses_is_in_the_ui():
    names = set(_ui_widgets())
    used = set()
    for path in _module_python_files():
        if "NormativeAnomalyLib" not in path.parts:
            used |= set(re.findall(r"\bself\.ui\.(\w+)", path.read_text(encoding="utf-8")))
    assert {"inputVolumeSelector", "modelSelector", "applyButton", "cancelButton", "thresholdSliderWidget"} <= names
    assert used, "the widget code uses no .ui widget"
    assert used <= names, f"used by the code but not in the .ui: {sorted(used - names)}"


def test_a_bound_widget_takes_its_range_from_the_parameter_node_not_the_ui():
    """A parameter with a WithinRange (from options) sets its widget's range when the GUI is connected:
    a range written in the .ui too would be a second copy of the numbers."""
    ranged = set(re.findall(r"^    (\w+): Annotated\[\w+, WithinRange", (MODULE / "NormativeAnomaly.py").read_text(
        encoding="utf-8"), flags=re.MULTILINE))
    assert {"noiseLevel", "diffusionSteps", "samples", "minLesionMm3"} <= ranged
    document = xml.dom.minidom.parse(str(MODULE / "Resources" / "UI" / "NormativeAnomaly.ui"))
    for widget in document.getElementsByTagName("widget"):
        own = {prop.getAttribute("name"): prop for prop in widget.getElementsByTagName("property")
               if prop.parentNode is widget}
        if "SlicerParameterName" in own and own["SlicerParameterName"].getElementsByTagName("string")[0].firstChild.data in ranged:
            assert not {"minimum", "maximum"} & set(own), f"{widget.getAttribute('name')} sets its range in the .ui"


def _parameter_node_fields() -> dict[str, ast.AnnAssign]:
    """The module's parameter node wrapper's fields, by name."""
    tree = ast.parse((MODULE / "NormativeAnomaly.py").read_text(encoding="utf-8"))
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                   and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list))
    return {node.target.id: node for node in wrapper.body if isinstance(node, ast.AnnAssign)}


def test_every_bound_widget_has_a_parameter_node_field():
    fields = set(_parameter_node_fields())
    bound = {entry["SlicerParameterName"] for entry in _ui_widgets().values() if "SlicerParameterName" in entry}
    assert {"inputVolume", "threshold", "minLesionMm3"} <= bound
    assert bound <= fields, f"bound in the .ui but not in the parameter node: {sorted(bound - fields)}"


def test_the_panel_asks_for_each_run_option_through_the_parameter_node_field_its_metadata_names():
    """options_from_panel reads the fields RunOptions' metadata names; the parameter node's defaults ask
    for the default run, and a diffusion model's for the shared diffusion defaults."""
    import dataclasses
    from types import SimpleNamespace

    from NormativeAnomalyLib import options

    named = set()
    for option in dataclasses.fields(options.RunOptions):
        named |= {option.metadata["panel"]} - {None}
        named |= {part["panel"] for part in option.metadata["parts"].values()}
    fields = _parameter_node_fields()
    assert {"device", "skull", "noiseLevel"} <= named
    assert named <= set(fields), f"named by RunOptions but not in the parameter node: {sorted(named - set(fields))}"
    # The defaults as the module writes them (e.g. RunOptions.device, DIFFUSION_DEFAULTS["steps"]).
    defaults = SimpleNamespace(**{name: eval(compile(ast.Expression(fields[name].value), "<default>", "eval"),
                                             vars(options)) for name in named})
    assert options.options_from_panel(defaults, diffusion=False) == options.RunOptions()
    asked = options.options_from_panel(defaults, diffusion=True).diffusion
    assert asked == {key: options.DIFFUSION_DEFAULTS[key] for key in options.DIFFUSION_ARGUMENTS}
    defaults.skull, defaults.acceptPoorAlignment = "with skull", True
    assert options.options_from_panel(defaults, diffusion=False).to_argv() == ["--accept-poor-alignment",
                                                                                "--with-skull"]
    defaults.skull = "no idea"
    with pytest.raises(ValueError, match="unknown skull setting"):
        options.options_from_panel(defaults, diffusion=False)


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return [name.split(".")[0] for name in names]


def test_core_imports_no_slicer_and_the_mrml_layer_no_qt():
    for path in (MODULE / "NormativeAnomalyLib").rglob("*.py"):
        imported = set(_imported_modules(path))
        forbidden = {"qt", "ctk", "slicer", "vtk", "vtkmodules"} if "mrml" not in path.parts else {"qt", "ctk"}
        assert not imported & forbidden, (path, sorted(imported & forbidden))


def test_core_imports_no_front_end():
    """The web app (and any front end) adds its CLI command through an entry point: the core never
    imports a front end, at module level or inside a function."""
    front_ends = {"NormativeAnomalyWeb", "NormativeAnomalySlicer", "trame", "trame_slicer"}
    for path in (MODULE / "NormativeAnomalyLib").rglob("*.py"):
        imported = set(_imported_modules(path))
        assert not imported & front_ends, (path, sorted(imported & front_ends))


def _library_import_graph() -> dict[str, set[str]]:
    """Each NormativeAnomalyLib module and the library modules it imports, at module level or
    inside a function (a function-level import hides a circle; it does not remove it)."""
    root = MODULE / "NormativeAnomalyLib"

    def name_of(path: Path) -> str:
        parts = path.relative_to(MODULE).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    paths = {name_of(path): path for path in root.rglob("*.py") if "__pycache__" not in path.parts}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                imported |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names}
        graph[name] = {other for other in imported if other in paths and other != name}
    return graph


def test_the_library_import_graph_has_no_circle():
    graph = _library_import_graph()
    assert len(graph) > 40 and graph["NormativeAnomalyLib.outputs"] >= {"NormativeAnomalyLib.run_folder"}
    finished: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in finished:
            return
        for other in sorted(graph[name]):
            visit(other, path + [name])
        finished.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_scripts_and_tests_reach_the_library_as_installed():
    """Scripts are thin wrappers of the installed package and tests import the library, not scripts:
    the only path edit is conftest's (tests run from a checkout without installing)."""
    edits = [path.relative_to(REPO).as_posix() for folder in ("scripts", "Testing") for path in (REPO / folder).rglob("*.py")
             if re.search(r"sys\.path\.(insert|append)", path.read_text(encoding="utf-8"))]
    assert edits == ["Testing/conftest.py"]


def test_the_slicer_panel_imports_neither_torch_nor_monai():
    """Slicer's own process: the module file and its panel code never import torch or MONAI, at any level."""
    for path in [MODULE / "NormativeAnomaly.py", *(MODULE / "NormativeAnomalySlicer").glob("*.py")]:
        imported = set(_imported_modules(path))
        assert not imported & {"torch", "monai", "safetensors"}, (path, sorted(imported))


def test_what_slicer_imports_pulls_in_neither_torch_nor_monai():
    """Slicer's process lists models and loads results; torch and MONAI live in the CLI's process."""
    import subprocess
    import sys

    code = ("import sys, NormativeAnomalyLib.mrml, NormativeAnomalyLib.mrml.display, NormativeAnomalyLib.mrml.export, "
            "NormativeAnomalyLib.mrml.run_controller, NormativeAnomalyLib.mrml.live_segmentation, "
            "NormativeAnomalyLib.background, NormativeAnomalyLib.run_folder, NormativeAnomalyLib.options, NormativeAnomalyLib.resources, "
            "NormativeAnomalyLib.models; "
            "from NormativeAnomalyLib.models import available_models, read_card; "
            "[read_card(m['path']) for m in available_models()]; "
            "print(sorted(m for m in ('torch', 'monai', 'safetensors') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=MODULE,
                            env={**__import__("os").environ, "PYTHONPATH": str(MODULE)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# Shipped with every Slicer release (Slicer's own Python packages), so never installed by the module.
SHIPPED_WITH_SLICER = {"numpy", "simpleitk"}


def _unguarded_imports(path: Path) -> set[str]:
    """Top-level names imported by ``path``, except those inside ``try: ... except ImportError``
    (optional: the code goes on without them)."""
    optional: set[int] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                "ImportError" in ast.unparse(handler.type or ast.Name("BaseException")) for handler in node.handlers):
            optional |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_slicer_requirements_cover_what_the_child_process_imports():
    """The run started from Slicer imports the core (all but its MRML layer) in a PythonSlicer child:
    every third-party package it needs is torch (installed first, on its own), shipped with Slicer,
    or listed in the requirements the panel checks and installs."""
    import sys
    from importlib.metadata import packages_distributions

    from NormativeAnomalySlicer.requirements import requirement_lines

    distributions = packages_distributions()
    imported = set()
    for path in (MODULE / "NormativeAnomalyLib").rglob("*.py"):
        if "mrml" not in path.relative_to(MODULE).parts:
            imported |= _unguarded_imports(path)
    third_party = {name for name in imported if name not in sys.stdlib_module_names
                   and not name.startswith("NormativeAnomaly")}
    needed = {distributions[name][0].lower() for name in third_party}
    listed = {re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in requirement_lines()}
    assert "matplotlib" in needed and "torch" in needed  # the scan sees the report and the networks
    assert needed - SHIPPED_WITH_SLICER <= listed, f"not in slicer-requirements.txt: {sorted(needed - listed)}"


def test_slicer_requirements_ask_for_the_torch_that_monai_requires():
    """An older torch would be replaced by pip's default build when MONAI is installed."""
    from importlib.metadata import requires

    from NormativeAnomalySlicer.requirements import requirement_lines, torch_requirement

    monai_torch = next(line for line in requires("monai") if line.replace(" ", "").startswith("torch>"))
    assert torch_requirement().replace(" ", "") == monai_torch.replace(" ", "")
    pinned_monai = next(line for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines() if line.startswith("monai=="))
    assert pinned_monai in requirement_lines()


def test_contributors_are_named_alike_in_cmake_and_the_module():
    """Slicer's convention: "Firstname Lastname (Organization)"."""
    cmake = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text(encoding="utf-8")).group(1)
    module = re.search(r'^CONTRIBUTORS = "([^"]+)"', (MODULE / "NormativeAnomaly.py").read_text(encoding="utf-8"), re.M).group(1)
    assert cmake == module
    assert re.fullmatch(r"[^(),]+ \([^()]+\)", module), module


def test_module_category_is_translatable():
    text = (MODULE / "NormativeAnomaly.py").read_text(encoding="utf-8")
    assert re.search(r'categories = \[translate\("qSlicerAbstractCoreModule", "[^"]+"\)\]', text)


def test_reload_picks_up_edits_in_the_packages_deepest_first(tmp_path, monkeypatch):
    import importlib
    import sys

    from NormativeAnomalySlicer.developer import reloadPackages

    package = tmp_path / "reloadme"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("from .inner.leaf import VALUE\n")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "leaf.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    try:
        assert importlib.import_module("reloadme").VALUE == 1
        (package / "inner" / "leaf.py").write_text("VALUE = 2  # edited\n")
        order = reloadPackages(["reloadme"])
        assert order == ["reloadme.inner.leaf", "reloadme.inner", "reloadme"]
        assert sys.modules["reloadme"].VALUE == 2  # the package re-imported the reloaded leaf
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "reloadme"]:
            del sys.modules[name]


def test_cmake_copies_every_resource_folder_the_code_looks_up_into_the_build_tree(tmp_path):
    """Slicer's ctest and a developer build run the module from the build tree: the model packages,
    templates and demo case must be there, not only in the install tree. Runs the module's own copy
    function with CMake, into a stand-in for <build>/<qt-scripted-modules>/Resources."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        import pytest

        pytest.skip("cmake is not installed")
    looked_up = set(re.findall(r'resources_dir\(\) / "(\w+)"',
                               (MODULE / "NormativeAnomalyLib" / "resources.py").read_text(encoding="utf-8")))
    assert {"Models", "Templates", "SampleData"} <= looked_up
    looked_up.add("Licenses")  # the notices that must travel with the derived files
    destination = tmp_path / "qt-scripted-modules" / "Resources"
    script = tmp_path / "copy.cmake"
    script.write_text(f'include("{MODULE / "SharedResources.cmake"}")\n'
                      f'normative_anomaly_copy_folders("{REPO / "Resources"}" "{destination}" files '
                      '${NORMATIVE_ANOMALY_SHARED_RESOURCE_DIRS})\n'
                      'list(LENGTH files count)\nmessage(STATUS "copied ${count}")\n')
    result = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for folder in looked_up:
        source = sorted(p.relative_to(REPO / "Resources") for p in (REPO / "Resources" / folder).rglob("*") if p.is_file())
        copied = sorted(p.relative_to(destination) for p in (destination / folder).rglob("*") if p.is_file())
        assert source and copied == source, folder
    assert f"copied {sum(1 for folder in looked_up for p in (REPO / 'Resources' / folder).rglob('*') if p.is_file())}" \
        in result.stdout + result.stderr
    # The module's CMakeLists copies them to the build tree's module folder, which Slicer's macro installs.
    module_cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert 'set(_module_resources "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources")' in module_cmake
    assert re.search(r'normative_anomaly_copy_folders\("\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./Resources" "\$\{_module_resources\}"'
                     r'\s+\w+ \$\{NORMATIVE_ANOMALY_SHARED_RESOURCE_DIRS\}\)', module_cmake)
    assert re.search(r'normative_anomaly_copy_folders\("\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./Testing/Data" '
                     r'"\$\{_module_resources\}/TestData"', module_cmake)
    assert "install(" not in module_cmake  # the macro installs the build tree's module folder


# The oldest Slicer the module is checked against (README, docs/architecture.md) and its Python.
MINIMUM_SLICER, MINIMUM_PYTHON = "5.10", (3, 12)
PYTHON_CHECK = r"""
import ast, json, sys
from pathlib import Path
errors, imported = [], set()
for path in sys.argv[1:]:
    source = Path(path).read_text(encoding="utf-8")
    try:
        tree = compile(source, path, "exec", ast.PyCF_ONLY_AST)
        compile(tree, path, "exec")
    except SyntaxError as error:
        errors.append(f"{path}:{error.lineno}: {error.msg}")
        continue
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
print(json.dumps({"version": list(sys.version_info[:2]), "errors": errors,
                  "not_stdlib": sorted(imported - set(sys.stdlib_module_names))}))
"""


def test_the_extension_compiles_under_the_oldest_python_slicer_ships():
    """Slicer 5.10 ships Python 3.12 (5.6 and 5.8 ship 3.9, which the module does not support):
    every file Slicer loads (the module, its panel and the whole core, which the PythonSlicer child
    runs) must compile there, and no standard-library module it imports may be missing there."""
    import json
    import subprocess
    import sys
    from glob import glob

    candidates = sorted(glob(os.path.expanduser(f"~/.pyenv/versions/{MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]}.*/bin/python")))
    if not candidates:
        pytest.skip(f"no Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} (pyenv install {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]})")
    files = [str(path) for path in _module_python_files()]
    result = subprocess.run([candidates[-1], "-c", PYTHON_CHECK, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert tuple(report["version"]) == MINIMUM_PYTHON
    assert report["errors"] == []
    third_party = set(report["not_stdlib"])
    ours = {"NormativeAnomalyLib", "NormativeAnomalySlicer", "NormativeAnomalyWeb"}
    from_slicer = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "SampleData", "packaging"}
    # A name that is standard library here but not there was removed (distutils, imp, ...).
    removed = {name for name in third_party if name in sys.stdlib_module_names}
    assert not removed, f"not in Python {MINIMUM_PYTHON}'s standard library: {sorted(removed)}"
    assert third_party - ours - from_slicer, "the scan found no third-party import"


def test_readme_and_module_state_the_checked_minimum_slicer():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"Slicer ≥ {MINIMUM_SLICER}" in readme and "Slicer ≥ 5.6" not in readme
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text(encoding="utf-8")).group(1)
    assert f"Slicer {MINIMUM_SLICER} or later" in description
