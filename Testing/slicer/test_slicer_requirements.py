"""What the Slicer panel counts as missing before a run (NormativeAnomalySlicer.requirements: no Qt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from NormativeAnomalySlicer.requirements import missing_packages, requirement_lines, satisfies, torch_requirement

EVERYTHING = {"torch": "2.13.0+cpu", "monai": "1.6.1", "cuda": None, "mps": False}


def installed(**versions):
    """Installed versions by name; the others as their lower bound would have them (all satisfied)."""
    return lambda name: versions.get(name, "99.0")


def test_nothing_is_missing_when_the_child_has_everything():
    assert missing_packages(EVERYTHING, installed()) == []


@pytest.mark.parametrize("probe", [None, {"error": "no answer within 180 s"}], ids=["not yet", "failed"])
def test_an_unknown_answer_counts_torch_and_monai_as_missing(probe):
    missing = missing_packages(probe, installed())
    assert torch_requirement() in missing and any(line.startswith("monai") for line in missing)


def test_a_torch_older_than_monai_requires_is_missing():
    assert missing_packages(EVERYTHING | {"torch": "2.2.2"}, installed()) == [torch_requirement()]


def test_a_monai_that_does_not_import_or_another_version_is_missing():
    monai = next(line for line in requirement_lines() if line.startswith("monai"))
    assert missing_packages(EVERYTHING | {"monai": None}, installed()) == [monai]
    assert missing_packages(EVERYTHING | {"monai": "1.4.0"}, installed()) == [monai]


def test_other_packages_are_judged_by_installed_version():
    assert missing_packages(EVERYTHING, installed(matplotlib=None)) == ["matplotlib>=3.7"]
    assert missing_packages(EVERYTHING, installed(nibabel="4.0.2")) == ["nibabel>=5.0"]


@pytest.mark.parametrize("version", ["", "unknown", None])
def test_an_unreadable_version_does_not_satisfy(version):
    assert not satisfies("torch>=2.8.0", version)


@pytest.mark.parametrize("registry", ["missing", "broken"])
def test_a_missing_or_broken_model_registry_gives_a_one_line_reason_not_an_exception(tmp_path, monkeypatch, registry):
    """The panel lists no model and shows why; the rest of the panel still works."""
    from NormativeAnomalySlicer.model_cards import availableModels

    resources = tmp_path / "Resources"
    (resources / "Models").mkdir(parents=True)
    if registry == "broken":
        for path in (Path(__file__).resolve().parents[2] / "Resources" / "Models").glob("*.json"):
            (resources / "Models" / path.name).write_text("{ not json")
    monkeypatch.setenv("NORMATIVE_ANOMALY_RESOURCES", str(resources))
    models, error = availableModels()
    assert models == [] and error and "\n" not in error
