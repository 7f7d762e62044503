"""Each run option is defined once (options.RunOptions) and reaches every place that needs it."""

from __future__ import annotations

import dataclasses

import pytest

from NormativeAnomalyLib import cli
from NormativeAnomalyLib.cli import _parser, _run_options
from NormativeAnomalyLib.options import (DEVICES, DIFFUSION_DEFAULTS, PRECISIONS, RESULT_SETTINGS, RunOptions,
                                         _option, checked_diffusion, flag_dest)

# One value other than the default for every option a child run can be given.
ASKED = RunOptions(device="cpu", registered=True, threshold=1.5, fpr=None, min_lesion_mm3=20.0, bias_correction=False,
                   accept_poor_alignment=True, batch_size=4, skull_stripped=True, precision="fp32",
                   diffusion={"noise_level": 100, "steps": 5, "samples": 2, "noise": "simplex"})


def _parsed(options: RunOptions) -> RunOptions:
    return _run_options(_parser().parse_args(["run", "scan.nii.gz", "--out", "out", *options.to_argv()]))


def _command(name: str):
    return _parser()._subparsers._group_actions[0].choices[name]


def _other_value(argument: dict, default):
    """A value other than ``default`` that the argument's flag takes, found from its metadata alone."""
    if isinstance(default, bool):
        return not default
    if argument["choices"]:
        return next(choice for choice in argument["choices"] if choice != default)
    for text in ("2", "0.25"):
        try:
            return argument["parse"](text)
        except Exception:
            continue
    raise AssertionError(f"no test value for {argument['flag']}")


def _every_option_asked(yes: bool = True) -> RunOptions:
    """Every option with a flag set to a value other than its default (``yes``: what yes/no/unset ones are),
    but for the first of options that exclude each other."""
    values, exclusive = {}, set()
    for option in dataclasses.fields(RunOptions):
        meta = option.metadata
        if meta["parts"]:
            values[option.name] = {key: _other_value(part, None) for key, part in meta["parts"].items()}
        elif meta["flag"] and meta["exclusive"] not in exclusive:
            values[option.name] = yes if meta["flag_when_false"] else _other_value(meta, option.default)
            exclusive.add(meta["exclusive"] or option.name)
    return RunOptions(**values)


@pytest.mark.parametrize("options", [ASKED, RunOptions(), RunOptions(fpr=0.02, bias_correction=True,
                                                                     skull_stripped=False, diffusion={"steps": 3}),
                                     _every_option_asked(), _every_option_asked(yes=False)])
def test_what_a_gui_asks_for_is_what_the_child_run_parses(options):
    """Options -> the child's argv -> the CLI's parser -> the same options (what start_run relies on)."""
    parsed = _parsed(options)
    for option in dataclasses.fields(RunOptions):
        if option.name == "diffusion":
            asked = {key: value for key, value in (options.diffusion or {}).items() if value is not None}
            assert {key: value for key, value in parsed.diffusion.items() if value is not None} == asked
        else:
            assert getattr(parsed, option.name) == getattr(options, option.name), option.name


def test_every_option_with_a_flag_is_an_argument_of_the_commands_that_run():
    """Each flag (yes/no pairs' no, dict options' parts) is an argument with argparse's dest ``flag_dest``,
    the metadata's choices and help; demo alone has no --registered (its case is the bundled one)."""
    for command in ("run", "batch", "demo"):
        actions = {flag: action for action in _command(command)._actions for flag in action.option_strings}
        for option in dataclasses.fields(RunOptions):
            meta = option.metadata
            for argument in [meta, *meta["parts"].values()]:
                if argument["flag"] is None:
                    continue
                if command == "demo" and option.name == "registered":
                    assert argument["flag"] not in actions
                    continue
                action = actions[argument["flag"]]
                assert action.dest == flag_dest(argument["flag"]) and action.help == argument["help"], argument
                assert action.choices == argument["choices"], argument
            if meta["flag_when_false"]:
                no = actions[meta["flag_when_false"]]
                assert no.dest == flag_dest(meta["flag"]) and no.help == meta["help_when_false"], option.name


def test_options_that_exclude_each_other_are_refused_together():
    run = _command("run")
    exclusive = [{action.dest for action in group._group_actions} for group in run._mutually_exclusive_groups]
    assert {"threshold", "fpr"} in exclusive and {"n4"} in exclusive and {"skull_stripped"} in exclusive
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "scan.nii.gz", "--out", "out", "--threshold", "1", "--fpr", "0.1"])


def test_an_option_added_to_run_options_reaches_the_command_line_unaided(monkeypatch):
    """A new field with a flag is parsed, and round-trips, with no edit to the CLI."""
    extended = dataclasses.make_dataclass("Extended", [
        ("colour", str, _option("grey", "colour", "--colour", True, "map colour", choices=("grey", "hot")))],
        bases=(RunOptions,))
    monkeypatch.setattr(cli, "RunOptions", extended)
    help_text = _command("run").format_help()
    assert "--colour {grey,hot}" in help_text and "map colour" in help_text
    options = extended(colour="hot", threshold=2.0)
    assert options.to_argv() == ["--threshold", "2.0", "--colour", "hot"]
    parsed = _parsed(options)
    assert type(parsed) is extended and (parsed.colour, parsed.threshold) == ("hot", 2.0)
    assert _parsed(extended()).colour == "grey"
    assert options.settings("scan.nii.gz", "dae-t1")["colour"] == "hot"


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
