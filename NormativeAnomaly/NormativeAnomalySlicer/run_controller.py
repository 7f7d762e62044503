"""One analysis in a child process: temporary folder, ``normative-anomaly run``, loading the result.

No GUI here: the module's Logic (and its test) call these functions, the widget polls the handle
with a QTimer. The scene, the temporary root and the colour logic are parameters, so this also
runs on a plain MRML scene.
"""

from __future__ import annotations

import logging
import numbers
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from NormativeAnomalyLib.background import BackgroundRun, RunState, run_command

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4, or MRML without the application
    _ = str

EXIT_CANCELLED = 130  # the CLI's exit status after SIGTERM / Ctrl-C (0 ok, 1 user error, 3 internal)
CLI_PREFIXES = ("normative-anomaly: error: ", "normative-anomaly: ")
INPUT_FILE = "input.nrrd"  # the temporary copy of the input volume
# A diffusion model's settings (the card's inference.diffusion keys) and the CLI options overriding them.
DIFFUSION_OPTIONS = {"noise_level": "--noise-level", "steps": "--diffusion-steps", "samples": "--samples",
                     "noise": "--diffusion-noise"}
DIFFUSION_NOISE_KINDS = ("gaussian", "simplex", "coarse")  # the card schema's inference.diffusion.noise


def stageText(stage: str) -> str:
    """The status line for a stage of the CLI's progress lines."""
    texts = {
        "starting": _("Starting (loading PyTorch)..."),
        "registration": _("Registering to the model's template..."),
        "model_space": _("Preparing the image for the model..."),
        "inference": _("Computing the pseudo-healthy reconstruction..."),
        "scoring": _("Scoring anomalies..."),
        "to_input_grid": _("Resampling to the input volume..."),
        "segmentation": _("Segmenting lesions..."),
        "done": _("Writing the results..."),
        "writing": _("Writing the results..."),
    }
    return texts.get(stage, stage)


def pythonExecutable() -> str:
    """PythonSlicer (what Slicer's own pip_install runs: it is on Slicer's PATH); this interpreter elsewhere."""
    return shutil.which("PythonSlicer") or sys.executable


class RunFailedError(RuntimeError):
    """The child process failed or was cancelled; ``str()`` is its one-line message."""

    def __init__(self, message: str, returncode: Optional[int]) -> None:
        super().__init__(message)
        self.returncode = returncode

    @property
    def cancelled(self) -> bool:
        return self.returncode == EXIT_CANCELLED


@dataclass
class RunHandle:
    run: BackgroundRun
    workDir: str  # removed when the run is finished or cancelled
    outDir: str
    inputVolume: Any  # vtkMRMLScalarVolumeNode
    modelName: str

    def poll(self) -> RunState:
        return self.run.poll()


def diffusionArguments(diffusion: Optional[dict[str, Any]], card: Optional[dict[str, Any]] = None) -> list[str]:
    """The CLI options for a diffusion model's settings (keys as in the card's ``inference.diffusion``:
    noise_level, steps, samples, noise; a missing or None value keeps the card's). Checked here, against
    the card's settings when given, so that a bad value is reported before anything is written or run."""
    if not diffusion:
        return []
    unknown = sorted(set(diffusion) - set(DIFFUSION_OPTIONS))
    if unknown:
        raise ValueError(_("Unknown diffusion setting(s): {names}").format(names=", ".join(unknown)))
    settings = {key: value for key, value in diffusion.items() if value is not None}
    for key in ("noise_level", "steps", "samples"):
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(_("The diffusion setting {name} must be a whole number of at least 1, not {value!r}.")
                                 .format(name=key, value=value))
            settings[key] = int(value)
    if "noise" in settings and settings["noise"] not in DIFFUSION_NOISE_KINDS:
        raise ValueError(_("The diffusion noise must be one of {kinds}, not {value!r}.").format(
            kinds=", ".join(DIFFUSION_NOISE_KINDS), value=settings["noise"]))
    effective = {**(card or {}), **settings}
    total, level, steps = (effective.get(key) for key in ("train_timesteps", "noise_level", "steps"))
    if isinstance(total, int) and isinstance(level, int) and level > total:
        raise ValueError(_("The noise level ({level}) exceeds the model's {total} diffusion training steps.").format(
            level=level, total=total))
    if isinstance(level, int) and isinstance(steps, int) and steps > level:
        raise ValueError(_("The denoising steps ({steps}) exceed the noise level ({level}).").format(
            steps=steps, level=level))
    arguments = []
    for key, value in settings.items():
        arguments += [DIFFUSION_OPTIONS[key], str(value)]
    return arguments


def startRun(inputVolume, modelName: str, device: str, registered: bool, brainMask, tempRoot: str,
             python: Optional[str] = None, diffusion: Optional[dict[str, Any]] = None,
             diffusionCard: Optional[dict[str, Any]] = None, acceptPoorAlignment: bool = False) -> RunHandle:
    """Write the input (and mask) to a new temporary folder and start the CLI on it; returns at once.

    ``diffusion`` (diffusion models only: the CLI refuses these options for other families) overrides
    the card's noise_level, steps, samples and noise; ``diffusionCard``, the card's own settings, is
    what they are checked against (see diffusionArguments)."""
    if inputVolume is None or inputVolume.GetImageData() is None:
        raise ValueError(_("Select an input volume that has image data."))
    if not modelName:
        raise ValueError(_("Select a model."))
    extraArgs = diffusionArguments(diffusion, diffusionCard)
    if acceptPoorAlignment:
        extraArgs.append("--accept-poor-alignment")
    os.makedirs(tempRoot, exist_ok=True)
    workDir = tempfile.mkdtemp(prefix="NormativeAnomaly-", dir=tempRoot)
    try:
        inputPath = os.path.join(workDir, INPUT_FILE)
        _writeVolume(inputVolume, inputPath)
        maskPath = None
        if brainMask is not None:
            maskPath = os.path.join(workDir, "mask.nrrd")
            _writeVolume(brainMask, maskPath)
        outDir = os.path.join(workDir, "out")  # must not exist yet: the CLI refuses a non-empty folder
        command = run_command(inputPath, outDir, model=modelName, device=device, registered=registered,
                              mask_path=maskPath, extra_args=extraArgs, python=python or pythonExecutable())
        logging.info("NormativeAnomaly: running " + " ".join(command))
        run = BackgroundRun(command)
    except BaseException:
        shutil.rmtree(workDir, ignore_errors=True)
        raise
    return RunHandle(run, workDir, outDir, inputVolume, modelName)


def _writeVolume(node, path: str) -> None:
    # A standalone storage node writes the file without redirecting the node's own storage node to
    # this temporary file (which slicer.util.saveNode would do). NRRD keeps the geometry exactly.
    import slicer

    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(path)
    storageNode.SetUseCompression(False)  # a temporary file: speed over size
    if not storageNode.WriteData(node) or not os.path.exists(path):
        raise RuntimeError(_("Could not write {name} to {path}").format(name=node.GetName(), path=path))


def waitForRun(handle: RunHandle, timeoutSeconds: float,
               processEvents: Optional[Callable[[], None]] = None) -> RunState:
    """Block until the child ends (tests and scripts; the widget polls instead)."""
    deadline = time.monotonic() + timeoutSeconds
    while True:
        state = handle.poll()
        if not state.running:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run did not finish within {timeoutSeconds} s (last stage: {state.stage})")
        if processEvents is not None:
            processEvents()
        time.sleep(0.1)


def cancelRun(handle: RunHandle, graceSeconds: float = 10.0) -> RunState:
    """Stop the child (and the interpreter that the PythonSlicer launcher started: BackgroundRun
    signals the whole process group) and remove the temporary folder; nothing was added to the scene."""
    try:
        state = handle.run.cancel(graceSeconds)
    finally:
        shutil.rmtree(handle.workDir, ignore_errors=True)
    return state


def finishRun(handle: RunHandle, scene, colorLogic=None):
    """Load a finished run into the scene (all or nothing) and remove the temporary folder.

    Returns (ResultNodes, LiveSegmentation); raises RunFailedError with the child's one-line message."""
    from NormativeAnomalyLib.mrml import load_run
    from NormativeAnomalyLib.run_outputs import read_run_folder

    try:
        state = handle.poll()
        if state.running:
            raise RuntimeError("the run has not finished")
        if state.returncode != 0:
            logging.error(f"NormativeAnomaly: the run failed (exit status {state.returncode}):\n{handle.run.log()}")
            # The message names the temporary copy of the input: name the volume instead.
            message = failureMessage(state).replace(os.path.join(handle.workDir, INPUT_FILE),
                                                    f"\"{handle.inputVolume.GetName()}\"")
            raise RunFailedError(message, state.returncode)
        logging.info(f"NormativeAnomaly: run finished:\n{handle.run.log()}")
        outputs = read_run_folder(handle.outDir)
        return load_run(scene, handle.inputVolume, outputs, color_logic=colorLogic)
    finally:
        shutil.rmtree(handle.workDir, ignore_errors=True)


def failureMessage(state: RunState) -> str:
    if state.returncode == EXIT_CANCELLED:
        return _("Cancelled")
    message = state.message.strip()
    for prefix in CLI_PREFIXES:
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    return message or _("The analysis failed (exit status {status}); see the Python console.").format(
        status=state.returncode)
