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
