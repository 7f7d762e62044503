"""A run's options, their defaults and their choices, each defined once.

Torch-free: the CLI's flags, run.json's settings, batch's resume check, the child run a GUI
starts and the Slicer and web widgets all read them here. Each ``RunOptions`` field says in
its metadata the key it has in run.json's settings, the CLI flag that sets it (with its help,
value check and choices, from which the CLI builds its argument) and whether it changes the
result (a batch resumed with another value is refused).
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .registration import Registration

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 (or fp16) on a GPU, fp32 on the CPU
# The skull settings a front end offers and what each states (None: detect).
SKULL_CHOICES = {"detect": None, "skull-stripped": True, "with skull": False}

# A diffusion model's settings (the card's inference.diffusion) where a card or a training config
# lacks one, the noises it can start from, and the CLI flag (and run.json key) of each a run may override.
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 2e-2,
    "noise": "gaussian", "noise_level": 250, "steps": 10, "samples": 1,
    # Card-only switches (diffusion.reconstruct_batch): THOR's harmonisation with the input (0: off) and
    # pDDPM's patch-wise noising (1: the whole slice at once).
    "harmonise": 0.0, "patch_grid": 1,
}
DIFFUSION_NOISE_KINDS = ("gaussian", "simplex", "coarse")
# The ranges the panels' spin boxes and sliders offer.
DIFFUSION_RANGES = {"noise_level": (1, 1000), "steps": (1, 100), "samples": (1, 32)}
MIN_LESION_MM3_MAX = 5000.0


# A command-line value's check. argparse shows an ArgumentTypeError's message as it is (a ValueError
# only as "invalid <type> value"), so the user reads what was wrong.
def finite_number(text: str) -> float:
    """A float option's value; NaN and infinities, which no setting means, are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_number(text: str) -> float:
    value = finite_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _fraction(text: str) -> float:
    value = finite_number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (a fraction of healthy voxels, e.g. 0.01), "
                                         f"got {text}")
    return value


def _positive_integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _argument(flag: str | None, help: str | None = None, parse: Callable[[str], Any] | None = None,
              choices: Sequence[str] | None = None, panel: str | None = None) -> dict[str, Any]:
    """A CLI argument: its flag (argparse's dest is ``flag_dest(flag)``), help, ``parse`` (argparse's
    type: the value from its text) and choices; ``panel``: the Slicer parameter node field that holds it."""
    return {"flag": flag, "help": help, "parse": parse, "choices": choices, "panel": panel}


def _option(default: Any, setting: str | None, flag: str | None, changes_result: bool, help: str | None = None,
            parse: Callable[[str], Any] | None = None, choices: Sequence[str] | None = None, *,
            flag_when_false: str | None = None, help_when_false: str | None = None, exclusive: str | None = None,
            parts: dict[str, dict[str, Any]] | None = None, panel: str | None = None,
            from_panel: Callable[[Any], Any] | None = None) -> Any:
    """A RunOptions field. ``setting``: its run.json key (None: not recorded); ``flag``: its CLI flag
    (None: none), with ``help``, ``parse`` and ``choices`` (see ``_argument``); ``changes_result``: a
    batch resumed with another value refuses the finished cases. ``flag_when_false``: a yes/no/unset
    option's flag for no (``flag`` says yes); ``exclusive``: options naming the same group exclude each
    other on the command line; ``parts``: a dict option's keys, each its own ``_argument`` (run.json
    key: ``flag_dest`` of its flag), titled by ``help`` in the CLI's help. ``panel``: the Slicer parameter
    node field that holds the option (``options_from_panel``), ``from_panel`` its value from that field's."""
    return field(default=default, metadata={
        "setting": setting, "changes_result": changes_result, **_argument(flag, help, parse, choices, panel),
        "flag_when_false": flag_when_false, "help_when_false": help_when_false, "exclusive": exclusive,
        "parts": parts or {}, "from_panel": from_panel})


def flag_dest(flag: str) -> str:
    """The name argparse gives a flag's value (--diffusion-steps -> diffusion_steps), which is also its run.json key."""
    return flag[2:].replace("-", "_")


# The diffusion settings a run may override (None: the card's), each with its CLI flag.
DIFFUSION_ARGUMENTS = {
    "noise_level": _argument("--noise-level", "forward steps of noise before denoising", int, panel="noiseLevel"),
    "steps": _argument("--diffusion-steps", "DDIM steps back to the image (1: one-step x0)", int,
                       panel="diffusionSteps"),
    "samples": _argument("--samples", "reconstructions averaged; >1 writes uncertainty_map", int, panel="samples"),
    "noise": _argument("--diffusion-noise", "kind of noise", choices=DIFFUSION_NOISE_KINDS, panel="diffusionNoise"),
}
DIFFUSION_FLAGS = {key: argument["flag"] for key, argument in DIFFUSION_ARGUMENTS.items()}
_CALIBRATION_NOTE = "one beyond the model's calibration is moved to its nearest end, with a note"


def _skull_stripped(choice: str) -> bool | None:
    """A panel's skull choice (SKULL_CHOICES) as RunOptions.skull_stripped."""
    if choice not in SKULL_CHOICES:
        raise ValueError(f"unknown skull setting {choice!r}: one of {', '.join(SKULL_CHOICES)}")
    return SKULL_CHOICES[choice]


@dataclass
class RunOptions:
    """What a run may be told beyond its input and model; None: the model card's choice."""

    device: str = _option("auto", "device", "--device", False, choices=DEVICES, panel="device")
    registered: bool = _option(False, "registered", "--registered", True,  # already in the template's space
                               "input(s) already in the model's template space", panel="alreadyInTemplateSpace")
    # On the input's grid; default: the scan's own brain if skull-stripped, else the template's, mapped
    brain_mask: sitk.Image | None = _option(None, None, None, True)
    threshold: float | None = _option(None, "threshold", "--threshold", True,  # default: calibrated at fpr
                                      f"anomaly-map threshold (default: calibrated, see --fpr); {_CALIBRATION_NOTE}",
                                      non_negative_number, exclusive="threshold")  # two ways to say one thing
    fpr: float | None = _option(None, "fpr", "--fpr", True,  # healthy false-positive rate
                                f"threshold as a healthy voxel false-positive rate, e.g. 0.01; {_CALIBRATION_NOTE}",
                                _fraction, exclusive="threshold")
    min_lesion_mm3: float | None = _option(None, "min_lesion_mm3", "--min-lesion-mm3", True,
                                           "smallest lesion kept (default: the model's)", non_negative_number)
    bias_correction: bool | None = _option(None, "n4", "--n4", True,  # N4 (pipeline.bias_correction)
                                           "N4 bias-field correction first (default: the model card's)",
                                           flag_when_false="--no-n4", help_when_false="no N4 bias-field correction")
    # Run even when the registered input does not look like the model's template (model_space.check_alignment)
    accept_poor_alignment: bool = _option(
        False, "accept_poor_alignment", "--accept-poor-alignment", False,
        "run even when the registered input does not look like the model's template "
        "(correlation under the cut-off: failed registration, non-brain, other contrast)", panel="acceptPoorAlignment")
    batch_size: int | None = _option(None, "batch_size", "--batch-size", False,  # slices per batch
                                     "slices per inference batch (default: the model's; on CUDA sized from free memory)",
                                     _positive_integer)
    skull_stripped: bool | None = _option(  # None: detect
        None, "skull_stripped", "--skull-stripped", True,
        "the input is skull-stripped: score its own brain (default: detected)", flag_when_false="--with-skull",
        help_when_false="the input has its skull: score the template's brain, mapped (default: detected)",
        panel="skull", from_panel=_skull_stripped)
    precision: str = _option("auto", "precision", "--precision", False,
                             "inference precision (auto: bf16 or fp16 on a GPU, fp32 on the CPU)", choices=PRECISIONS)
    # Diffusion models: overrides of the card's noise_level, steps, samples, noise (None: the card's)
    diffusion: dict[str, Any] | None = _option(None, None, None, True, "diffusion models (defaults: the model card's)",
                                               parts=DIFFUSION_ARGUMENTS)
    # A registration of this input to the model's template computed before (e.g. by a run of another
    # model on the same template): reused instead of registering again
    registration: Registration | None = _option(None, None, None, False)

    def settings(self, input_path: str | None, model: str, mask_path: str | None = None) -> dict[str, Any]:
        """run.json's settings: what was asked (None: the card's choice), in a fixed order."""
        settings: dict[str, Any] = {"input": input_path, "model": model}
        for option in fields(self):
            value = getattr(self, option.name)
            if option.name == "brain_mask":
                settings["mask"] = mask_path
            elif option.metadata["setting"] is not None:
                settings[option.metadata["setting"]] = value
            settings.update({flag_dest(part["flag"]): (value or {}).get(key)
                             for key, part in option.metadata["parts"].items()})
        return settings

    def to_argv(self) -> list[str]:
        """The CLI flags that ask a child run for these options (what differs from the defaults)."""
        argv: list[str] = []
        for option in fields(self):
            value, flag = getattr(self, option.name), option.metadata["flag"]
            if option.metadata["parts"]:
                for key, part_value in (value or {}).items():
                    if part_value is not None:
                        argv += [option.metadata["parts"][key]["flag"], str(part_value)]
            elif flag is None or value == option.default:
                continue
            elif isinstance(value, bool) and option.metadata["flag_when_false"]:
                argv.append(flag if value else option.metadata["flag_when_false"])
            elif isinstance(value, bool):
                argv.append(flag)
            else:
                argv += [flag, str(value)]
        return argv


def options_from_panel(parameters: Any, diffusion: bool) -> RunOptions:
    """The RunOptions a panel asks for: each option whose metadata names a ``panel`` field is read from
    that attribute of ``parameters`` (the Slicer parameter node); the diffusion overrides only when
    ``diffusion`` (a diffusion model is chosen). The brain mask is a node, passed to the run apart."""
    values: dict[str, Any] = {}
    for option in fields(RunOptions):
        metadata = option.metadata
        if metadata["panel"]:
            value = getattr(parameters, metadata["panel"])
            values[option.name] = metadata["from_panel"](value) if metadata["from_panel"] else value
        if metadata["parts"] and diffusion:
            values[option.name] = {key: getattr(parameters, part["panel"]) for key, part in metadata["parts"].items()}
    return RunOptions(**values)


# run.json settings that change a result: a batch resumed with another value refuses the finished case.
RESULT_SETTINGS = ("model", *(key for option in fields(RunOptions) if option.metadata["changes_result"]
                              for key in ([option.metadata["setting"]] if option.metadata["setting"] else
                                          [flag_dest(part["flag"]) for part in option.metadata["parts"].values()])))


def checked_diffusion(overrides: dict[str, Any] | None, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's diffusion overrides (None values dropped) checked on their own and against the card's
    settings (``card``: its inference.diffusion; DIFFUSION_DEFAULTS for what it lacks); ValueError
    with a one-line message. The overrides, as whole numbers where they are counts."""
    settings = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(settings) - set(DIFFUSION_FLAGS))
    if unknown:
        raise ValueError(f"unknown diffusion setting(s): {', '.join(unknown)}")
    for key in ("noise_level", "steps", "samples"):
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"the diffusion setting {key} must be a whole number of at least 1, not {value!r}")
            settings[key] = int(value)
    if "noise" in settings and settings["noise"] not in DIFFUSION_NOISE_KINDS:
        raise ValueError(f"the diffusion noise must be one of {', '.join(DIFFUSION_NOISE_KINDS)}, "
                         f"not {settings['noise']!r}")
    effective = {**DIFFUSION_DEFAULTS, **(card or {}), **settings}
    total, level, steps = (int(effective[key]) for key in ("train_timesteps", "noise_level", "steps"))
    if not 1 <= level <= total:
        raise ValueError(f"the noise level must be between 1 and the model's {total} diffusion training steps, "
                         f"got {level}")
    if not 1 <= steps <= level:
        raise ValueError(f"the diffusion steps must be between 1 and the noise level ({level}), got {steps}")
    return settings
