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


@pytest.mark.parametrize("name, modality", [
    ("Brats18_2013_11_1_t2", "T2"), ("sub-01_T1w", "T1"), ("demo_t1", "T1"), ("AX T2 FLAIR", "FLAIR"),
    ("3D_MPRAGE", "T1"), ("t1ce", "T1"), ("Brats18_TCIA10_639_1_flair", "FLAIR"), ("T2-weighted TSE", "T2"),
    ("head", None), ("patient t12", None), ("sub-t1x", None)])
def test_the_contrast_a_volume_name_states(name, modality):
    from NormativeAnomalyLib.models import modality_from_name

    assert modality_from_name(name) == modality


def test_the_model_preselected_for_a_volume_is_its_contrasts_default():
    from NormativeAnomalyLib.models import model_summaries, preselected_model

    summaries = model_summaries()
    defaults = [s for s in summaries if s.get("default_for_modality")]
    assert sorted(s["modality"] for s in defaults) == sorted({s["modality"] for s in defaults})  # one per contrast
    assert preselected_model("case_t2", summaries)[0] == next(s["name"] for s in defaults if s["modality"] == "T2")
    model, why = preselected_model("case_flair", summaries)
    flair = [s for s in summaries if s.get("modality") == "FLAIR"]
    assert (model in [s["name"] for s in flair]) if flair else ("no FLAIR model" in why and model == "dae-t1")
    assert preselected_model("scan", summaries) == ("dae-t1", "its name states no contrast (T1, T2, FLAIR): the "
                                                                "default model, dae-t1")
