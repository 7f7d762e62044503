"""Skull-stripped inputs: recognised, and scored on their own brain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies, input_brain_mask
from NormativeAnomalyLib.skull_stripping import brain_mask_of_stripped, looks_skull_stripped

BRATS = Path(__file__).resolve().parents[3] / "shared" / "data" / "brats-dev"


def _stripped(template) -> sitk.Image:
    """The template T1 with everything outside its brain mask set to 0, on a 1 mm grid as scans come."""
    stripped = sitk.Mask(template.image, template.brain_mask)
    return sitk.Resample(stripped, [2 * n for n in stripped.GetSize()], sitk.Transform(), sitk.sitkLinear,
                         stripped.GetOrigin(), [s / 2 for s in stripped.GetSpacing()], stripped.GetDirection(), 0.0,
                         sitk.sitkFloat32)


def test_heads_with_skull_and_cut_fields_of_view_are_not_taken_for_stripped(real_t1_head_path, tiny_t1_path,
                                                                          demo_paths, template):
    assert not looks_skull_stripped(sitk.ReadImage(str(real_t1_head_path)))  # background zeroed, but a whole head
    assert not looks_skull_stripped(sitk.ReadImage(str(tiny_t1_path)))
    assert not looks_skull_stripped(sitk.ReadImage(str(demo_paths[0])))
    assert not looks_skull_stripped(template.image)
    assert looks_skull_stripped(_stripped(template))


@pytest.mark.skipif(not BRATS.is_dir(), reason="the BraTS development cases (../shared/data/brats-dev) are not here")
@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
def test_real_skull_stripped_scans_are_recognised(contrast):
    for path in sorted(BRATS.glob(f"*_{contrast}.nii.gz"))[:3]:
        assert looks_skull_stripped(sitk.ReadImage(str(path))), path.name


def test_the_scans_own_brain_keeps_dark_holes_and_drops_stray_specks(template):
    image = _stripped(template)
    values = sitk.GetArrayFromImage(image)
    brain = values > 0
    centre = tuple(int(np.mean(axis)) for axis in np.nonzero(brain))
    values[centre[0] - 3:centre[0] + 3, centre[1] - 3:centre[1] + 3, centre[2] - 3:centre[2] + 3] = 0  # dark necrosis
    values[1, 1, 1] = 500  # a speck far from the brain
    speckled = sitk.GetImageFromArray(values)
    speckled.CopyInformation(image)
    mask = sitk.GetArrayFromImage(brain_mask_of_stripped(speckled)).astype(bool)
    assert mask[centre] and not mask[1, 1, 1]
    assert abs(int(mask.sum()) - int(brain.sum())) < 0.01 * brain.sum()


def test_a_stripped_scan_is_scored_on_its_own_brain_unless_told_it_has_a_skull(template, trained_dae):
    image = _stripped(template)
    own = sitk.GetArrayFromImage(brain_mask_of_stripped(image)).astype(bool)
    detected = detect_anomalies(image, trained_dae, RunOptions(device="cpu", registered=True))
    assert detected.skull_stripped
    scored = sitk.GetArrayFromImage(detected.brain_mask).astype(bool)
    assert (scored == own).mean() > 0.99
    mask, name, stripped = input_brain_mask(image, RunOptions(skull_stripped=False))
    assert mask is None and not stripped
    with_skull = detect_anomalies(image, trained_dae, RunOptions(device="cpu", registered=True, skull_stripped=False))
    assert not with_skull.skull_stripped
    head = sitk.ReadImage(str(Path(__file__).resolve().parents[1] / "Data" / "itk_kmeans_t1.nii.gz"))
    assert input_brain_mask(head, RunOptions())[0] is None
    forced, name, stripped = input_brain_mask(head, RunOptions(skull_stripped=True))
    assert stripped and forced is not None and "stated skull-stripped" in name


@pytest.mark.slow
def test_a_head_stated_stripped_is_refused_naming_the_statement(real_t1_head_path, trained_dae):
    """A head with its skull, stated skull-stripped, is registered to the template's brain: the
    alignment check refuses it and says the statement may be why."""
    from NormativeAnomalyLib.errors import RegistrationError
    from NormativeAnomalyLib.models import resolve_model

    head = sitk.ReadImage(str(real_t1_head_path), sitk.sitkFloat32)
    with pytest.raises(RegistrationError, match=r"(correlates|overlaps) .*; the scan was stated skull-stripped"):
        detect_anomalies(head, resolve_model("dae-t1"), RunOptions(device="cpu", skull_stripped=True))


@pytest.mark.slow
def test_the_command_line_states_the_skull_and_run_json_records_it(template, trained_dae, tmp_path):
    from cli_runs import assert_ok, read_json, run_cli

    path = tmp_path / "stripped.nii.gz"
    sitk.WriteImage(_stripped(template), str(path))
    for flags, expected in (([], True), (["--with-skull"], False), (["--skull-stripped"], True)):
        out = tmp_path / f"out{len(flags)}{expected}"
        result = run_cli("run", path, "--registered", "--model", trained_dae.path, "--device", "cpu", "--out", out,
                         "--quiet", *flags)
        assert_ok(result)
        run = read_json(out / "run.json")
        assert run["registration"]["skull_stripped"] is expected
        assert run["settings"]["skull_stripped"] == ({"--with-skull": False, "--skull-stripped": True}.get(
            flags[0]) if flags else None)
    both = run_cli("run", path, "--skull-stripped", "--with-skull", "--out", tmp_path / "both")
    assert both.returncode == 1 and "not allowed with argument" in both.stderr
    assert not (tmp_path / "both").exists()


def test_every_skull_setting_of_the_front_ends_is_an_option_the_command_line_takes():
    """What the panels offer reaches the child run as the flag that states it (options.to_argv)."""
    from NormativeAnomalyLib.cli import _parser
    from NormativeAnomalyLib.options import SKULL_CHOICES, RunOptions

    stated = {}
    for setting, skull_stripped in SKULL_CHOICES.items():
        flags = RunOptions(skull_stripped=skull_stripped).to_argv()
        stated[setting] = _parser().parse_args(["run", "scan.nii.gz", "--out", "out", *flags]).skull_stripped
    assert stated == {"detect": None, "skull-stripped": True, "with skull": False}
