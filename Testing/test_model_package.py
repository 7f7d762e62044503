"""Model packages: schema, hashes, safetensors only; nothing in a package can run code."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from NormativeAnomalyLib.errors import ModelPackageError
from NormativeAnomalyLib.models import available_models, default_model_name, load_package, resolve_model
from NormativeAnomalyLib.templates import sha256_of


def copy_package(package, tmp_path: Path) -> Path:
    target = tmp_path / "package"
    shutil.copytree(package.path, target)
    return target


def edit_card(folder: Path, **changes) -> None:
    card = json.loads((folder / "model.json").read_text())
    card.update(changes)
    (folder / "model.json").write_text(json.dumps(card))


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


def test_a_flipped_byte_in_the_weights_is_refused(trained_dae, tmp_path):
    folder = copy_package(trained_dae, tmp_path)
    weights = bytearray((folder / "weights.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (folder / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ModelPackageError, match="SHA-256"):
        load_package(folder)


class _Exploit:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_weights_is_refused_without_running_it(trained_dae, tmp_path):
    folder = copy_package(trained_dae, tmp_path)
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    (folder / "weights.safetensors").write_bytes(pickle.dumps({"state": exploit}))
    card = json.loads((folder / "model.json").read_text())
    card["weights"]["sha256"] = sha256_of(folder / "weights.safetensors")  # a hostile author controls the card too
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="not a safetensors file"):
        load_package(folder)
    assert not marker.exists()


def test_a_pt_file_named_in_the_card_is_refused_by_the_schema(trained_dae, tmp_path):
    folder = copy_package(trained_dae, tmp_path)
    torch.save(trained_dae.state_dict, folder / "weights.pt")
    edit_card(folder, weights={"file": "weights.pt", "sha256": sha256_of(folder / "weights.pt")})
    with pytest.raises(ModelPackageError, match="not a valid model card"):
        load_package(folder)


@pytest.mark.parametrize("weights_file", ["../outside.safetensors", "/etc/passwd.safetensors", "sub/w.safetensors"])
def test_a_card_pointing_outside_its_folder_is_refused(trained_dae, tmp_path, weights_file):
    folder = copy_package(trained_dae, tmp_path)
    edit_card(folder, weights={"file": weights_file, "sha256": "0" * 64})
    with pytest.raises(ModelPackageError, match="weights/file"):
        load_package(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"family": "foo"}, "family"),
        ({"network": {"name": "os.system", "args": {}}}, "network"),
        ({"template": {"name": "../../etc"}}, "template/name"),
        ({"format_version": 2}, "format_version"),
        ({"unexpected": 1}, "Additional properties"),
    ],
)
def test_schema_violations_are_refused_with_the_field_named(trained_dae, tmp_path, changes, message):
    folder = copy_package(trained_dae, tmp_path)
    edit_card(folder, **changes)
    with pytest.raises(ModelPackageError, match=message) as error:
        load_package(folder)
    assert "\n" not in str(error.value)


def test_weights_of_the_wrong_shape_are_refused(trained_dae, tmp_path):
    folder = copy_package(trained_dae, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["network"]["args"]["channels"] = [4, 8, 16]
    (folder / "model.json").write_text(json.dumps(card))
    package = load_package(folder)
    with pytest.raises(ModelPackageError, match="do not fit"):
        package.build_network()


def test_missing_card_and_unknown_name(tmp_path):
    with pytest.raises(ModelPackageError, match="not a model package"):
        load_package(tmp_path)
    with pytest.raises(ModelPackageError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")


def test_inconsistent_calibration_is_refused(trained_dae, tmp_path):
    folder = copy_package(trained_dae, tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["calibration"]["threshold"] = sorted(card["calibration"]["threshold"])  # rising: wrong way round
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="calibration"):
        load_package(folder)
