"""A run's options, their defaults and their choices, each defined once.

Torch-free: the CLI's flags, run.json's settings, batch's resume check, the child run a GUI
starts and the Slicer and web widgets all read them here. Each ``RunOptions`` field says in
its metadata the key it has in run.json's settings, the CLI flag that sets it and whether it
changes the result (a batch resumed with another value is refused).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

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
}
DIFFUSION_NOISE_KINDS = ("gaussian", "simplex", "coarse")
DIFFUSION_FLAGS = {"noise_level": "--noise-level", "steps": "--diffusion-steps", "samples": "--samples",
                   "noise": "--diffusion-noise"}
# The ranges the panels' spin boxes and sliders offer.
DIFFUSION_RANGES = {"noise_level": (1, 1000), "steps": (1, 100), "samples": (1, 32)}
MIN_LESION_MM3_MAX = 5000.0


def _option(default: Any, setting: str | None, flag: str | None, changes_result: bool,
            flag_when_false: str | None = None) -> Any:
    """``flag_when_false``: a yes/no/unset option's flag for no (``flag`` says yes)."""
    return field(default=default, metadata={"setting": setting, "flag": flag, "changes_result": changes_result,
                                            "flag_when_false": flag_when_false})


def flag_dest(flag: str) -> str:
    """The name argparse gives a flag's value (--diffusion-steps -> diffusion_steps), which is also its run.json key."""
    return flag[2:].replace("-", "_")


@dataclass
class RunOptions:
    """What a run may be told beyond its input and model; None: the model card's choice."""

    device: str = _option("auto", "device", "--device", False)
    registered: bool = _option(False, "registered", "--registered", True)  # already in the template's space
    # On the input's grid; default: the scan's own brain if skull-stripped, else the template's, mapped
    brain_mask: sitk.Image | None = _option(None, None, None, True)
    threshold: float | None = _option(None, "threshold", "--threshold", True)  # default: calibrated at fpr
    fpr: float | None = _option(None, "fpr", "--fpr", True)  # healthy false-positive rate
    min_lesion_mm3: float | None = _option(None, "min_lesion_mm3", "--min-lesion-mm3", True)
    bias_correction: bool | None = _option(None, "n4", "--n4", True, "--no-n4")  # N4 (pipeline.bias_correction)
    # Run even when the registered input does not look like the model's template (model_space.check_alignment)
    accept_poor_alignment: bool = _option(False, "accept_poor_alignment", "--accept-poor-alignment", False)
    batch_size: int | None = _option(None, "batch_size", "--batch-size", False)  # slices per batch
    skull_stripped: bool | None = _option(None, "skull_stripped", "--skull-stripped", True,  # None: detect
                                          "--with-skull")
    precision: str = _option("auto", "precision", "--precision", False)
    # Diffusion models: overrides of the card's noise_level, steps, samples, noise (None: the card's)
    diffusion: dict[str, Any] | None = _option(None, None, None, True)
    # A registration of this input to the model's template computed before (e.g. by a run of another
    # model on the same template): reused instead of registering again
    registration: Registration | None = _option(None, None, None, False)

    def settings(self, input_path: str | None, model: str, mask_path: str | None = None) -> dict[str, Any]:
        """run.json's settings: what was asked (None: the card's choice), in a fixed order."""
        settings: dict[str, Any] = {"input": input_path, "model": model}
        for option in fields(self):
            if option.name == "brain_mask":
                settings["mask"] = mask_path
            elif option.metadata["setting"] is not None:
                settings[option.metadata["setting"]] = getattr(self, option.name)
        diffusion = self.diffusion or {}
        settings.update({flag_dest(flag): diffusion.get(key) for key, flag in DIFFUSION_FLAGS.items()})
        return settings

    def to_argv(self) -> list[str]:
        """The CLI flags that ask a child run for these options (what differs from the defaults)."""
        argv: list[str] = []
        for option in fields(self):
            value, flag = getattr(self, option.name), option.metadata["flag"]
            if flag is None or value == option.default:
                continue
            if isinstance(value, bool) and option.metadata["flag_when_false"]:
                argv.append(flag if value else option.metadata["flag_when_false"])
            elif isinstance(value, bool):
                argv.append(flag)
            else:
                argv += [flag, str(value)]
        for key, value in (self.diffusion or {}).items():
            if value is not None:
                argv += [DIFFUSION_FLAGS[key], str(value)]
        return argv


# run.json settings that change a result: a batch resumed with another value refuses the finished case.
RESULT_SETTINGS = ("model", *(option.metadata["setting"] for option in fields(RunOptions)
                              if option.metadata["changes_result"] and option.metadata["setting"]),
                   *(flag_dest(flag) for flag in DIFFUSION_FLAGS.values()))


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
