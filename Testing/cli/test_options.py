"""Each run option is defined once (options.RunOptions) and reaches every place that needs it."""

from __future__ import annotations

import dataclasses

import pytest

from NormativeAnomalyLib.cli import _parser, _run_options
from NormativeAnomalyLib.options import (DEVICES, DIFFUSION_DEFAULTS, PRECISIONS, RESULT_SETTINGS, RunOptions,
                                         checked_diffusion)

# One value other than the default for every option a child run can be given.
ASKED = RunOptions(device="cpu", registered=True, threshold=1.5, fpr=None, min_lesion_mm3=20.0, bias_correction=False,
                   accept_poor_alignment=True, batch_size=4, skull_stripped=True, precision="fp32",
                   diffusion={"noise_level": 100, "steps": 5, "samples": 2, "noise": "simplex"})


def _parsed(options: RunOptions) -> RunOptions:
    return _run_options(_parser().parse_args(["run", "scan.nii.gz", "--out", "out", *options.to_argv()]))


@pytest.mark.parametrize("options", [ASKED, RunOptions(), RunOptions(fpr=0.02, bias_correction=True,
                                                                     skull_stripped=False, diffusion={"steps": 3})])
def test_what_a_gui_asks_for_is_what_the_child_run_parses(options):
    """Options -> the child's argv -> the CLI's parser -> the same options (what start_run relies on)."""
    parsed = _parsed(options)
    for option in dataclasses.fields(RunOptions):
        if option.name == "diffusion":
            asked = {key: value for key, value in (options.diffusion or {}).items() if value is not None}
            assert {key: value for key, value in parsed.diffusion.items() if value is not None} == asked
        else:
            assert getattr(parsed, option.name) == getattr(options, option.name), option.name


def test_every_option_with_a_flag_is_written_by_to_argv():
    """An option added with a flag but without its CLI argument fails here, not in a user's run."""
    argv = ASKED.to_argv()
    for option in dataclasses.fields(RunOptions):
        flag = option.metadata["flag"]
        if flag is not None and option.name not in ("bias_correction", "skull_stripped") and \
                getattr(ASKED, option.name) != option.default:
            assert flag in argv, option.name


def test_run_json_settings_keep_their_keys_and_order():
    settings = ASKED.settings("scan.nii.gz", "dae-t1", "mask.nrrd")
    assert list(settings) == ["input", "model", "device", "registered", "mask", "threshold", "fpr", "min_lesion_mm3",
                              "n4", "accept_poor_alignment", "batch_size", "skull_stripped", "precision",
                              "noise_level", "diffusion_steps", "samples", "diffusion_noise"]
    assert settings["n4"] is False and settings["diffusion_steps"] == 5 and settings["mask"] == "mask.nrrd"
    assert set(RESULT_SETTINGS) <= set(settings)
    assert {"skull_stripped", "threshold", "model"} <= set(RESULT_SETTINGS)
    assert not {"device", "precision", "batch_size"} & set(RESULT_SETTINGS)


def test_the_choice_lists_are_the_parsers():
    parser = _parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    choices = {action.dest: tuple(action.choices) for action in run._actions if action.choices}
    assert choices["device"] == DEVICES and choices["precision"] == PRECISIONS


@pytest.mark.parametrize("overrides, card, message", [
    ({"steps": 0}, None, "at least 1"),
    ({"noise": "pink"}, None, "must be one of"),
    ({"noise_level": 2000}, {"train_timesteps": 1000}, "between 1 and the model's 1000"),
    ({"noise_level": 10, "steps": 20}, None, "between 1 and the noise level"),
    ({"colour": 1}, None, "unknown diffusion setting"),
])
def test_diffusion_overrides_are_checked_in_one_place(overrides, card, message):
    with pytest.raises(ValueError, match=message):
        checked_diffusion(overrides, card)
    assert checked_diffusion({"steps": 5, "noise": None}, card) == {"steps": 5}
    assert DIFFUSION_DEFAULTS["steps"] <= DIFFUSION_DEFAULTS["noise_level"] <= DIFFUSION_DEFAULTS["train_timesteps"]
