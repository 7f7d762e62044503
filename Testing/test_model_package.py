"""Model packages: the bundled registry, round trips, calibration consistency. Hostile packages
(tampered, pickled, malformed, archived) are in test_hostile_packages.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from NormativeAnomalyLib.errors import ModelPackageError
from NormativeAnomalyLib.models import available_models, default_model_name, load_package, resolve_model
from NormativeAnomalyLib.models.package import is_model_name
from NormativeAnomalyLib.models.registry import is_package_path


def copy_package(package, tmp_path: Path) -> Path:
    target = tmp_path / "package"
    shutil.copytree(package.path, target)
    return target


def test_bundled_registry_loads_and_names_a_default():
    names = [entry["name"] for entry in available_models()]
    assert default_model_name() in names
    for name in names:
        package = resolve_model(name)
        assert package.name == name
        assert package.calibration.threshold_for_fpr(0.01) >= package.calibration.threshold_for_fpr(0.05)


def test_trained_package_round_trips(trained_dae):
    package = load_package(trained_dae.path)
    network = package.build_network()
    for key, value in network.state_dict().items():
        assert torch.equal(value, trained_dae.state_dict[key])
    assert resolve_model(str(trained_dae.path)).name == "dae-test"


def test_inconsistent_calibration_is_refused(trained_dae, tmp_path):
    folder = copy_package(trained_dae, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["calibration"]["threshold"] = sorted(card["calibration"]["threshold"])  # rising: wrong way round
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="calibration"):
        load_package(folder)


@pytest.mark.parametrize("text, path", [("dae-t1", False), ("my.model_2", False), ("./dae-t1", True), ("../x", True),
                                        ("~/x", True), ("~", True), ("/x", True), ("a/b", True), (".", True),
                                        ("DAE-T1", False), ("dae-t1\n", False)])
def test_only_what_looks_like_a_path_names_a_package_folder(text, path):
    assert is_package_path(text) == path


@pytest.mark.parametrize("text, valid", [("dae-t1", True), ("ddpm-simplex-t1", True), ("a", True), ("x" * 64, True),
                                         ("x" * 65, False), ("dae-t1\n", False), ("DAE-T1", False),
                                         ("dae\u2010t1", False), ("dae-t1.", False), ("-a", False), ("", False),
                                         ("nul", False), ("lpt1.x", False), ("null", True), (None, False)])
def test_model_names(text, valid):
    assert is_model_name(text) == valid
