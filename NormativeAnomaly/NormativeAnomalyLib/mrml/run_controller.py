"""One analysis in a child process: temporary folder, ``normative-anomaly run``, loading the result
into a scene (``load_run``, also for a run folder made elsewhere).

No GUI here: the Slicer module's Logic and the web app call these same functions (the Slicer
widget polls the handle with a QTimer, the web app with an asyncio task). The scene, the
temporary root and the colour logic are parameters, so this runs on any MRML scene.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from NormativeAnomalyLib.background import BackgroundRun, RunState, run_command
from NormativeAnomalyLib.options import RunOptions, checked_diffusion
from NormativeAnomalyLib.progress import Monitor
from NormativeAnomalyLib.run_folder import EXIT_CANCELLED, RunOutputs, read_run_folder, without_prefix

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4, or MRML without the application
    _ = str

INPUT_FILE = "input.nrrd"  # the temporary copy of the input volume


def stage_text(stage: str) -> str:
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


def python_executable() -> str:
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
    work_dir: str  # removed when the run is finished or cancelled
    out_dir: str
    input_volume: Any  # vtkMRMLScalarVolumeNode
    model_name: str

    def poll(self) -> RunState:
        return self.run.poll()


def start_run(input_volume, model_name: str, options: RunOptions, brain_mask, temp_root: str,
              python: Optional[str] = None, diffusion_card: Optional[dict[str, Any]] = None) -> RunHandle:
    """Write the input (and mask) to a new temporary folder and start the CLI on it; returns at once.

    ``options.diffusion`` (diffusion models only: the CLI refuses these options for other families)
    overrides the card's noise_level, steps, samples and noise; they are checked here against
    ``diffusion_card``, the card's own settings, so a bad value is reported before anything runs."""
    if input_volume is None or input_volume.GetImageData() is None:
        raise ValueError(_("Select an input volume that has image data."))
    if not model_name:
        raise ValueError(_("Select a model."))
    if options.diffusion:
        checked_diffusion(options.diffusion, diffusion_card)
    os.makedirs(temp_root, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="NormativeAnomaly-", dir=temp_root)
    try:
        input_path = os.path.join(work_dir, INPUT_FILE)
        _write_volume(input_volume, input_path)
        mask_path = None
        if brain_mask is not None:
            mask_path = os.path.join(work_dir, "mask.nrrd")
            _write_volume(brain_mask, mask_path)
        out_dir = os.path.join(work_dir, "out")  # must not exist yet: the CLI refuses a non-empty folder
        command = run_command(input_path, out_dir, model_name, options, mask_path=mask_path,
                              python=python or python_executable())
        logging.info("NormativeAnomaly: running " + " ".join(command))
        run = BackgroundRun(command)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return RunHandle(run, work_dir, out_dir, input_volume, model_name)


def _write_volume(node, path: str) -> None:
    # A standalone storage node writes the file without redirecting the node's own storage node to
    # this temporary file (which slicer.util.saveNode would do). NRRD keeps the geometry exactly.
    import slicer

    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage_node.SetFileName(path)
    storage_node.SetUseCompression(False)  # a temporary file: speed over size
    if not storage_node.WriteData(node) or not os.path.exists(path):
        raise RuntimeError(_("Could not write {name} to {path}").format(name=node.GetName(), path=path))


def wait_for_run(handle: RunHandle, timeout_seconds: float,
               process_events: Optional[Callable[[], None]] = None) -> RunState:
    """Block until the child ends (tests and scripts; the widget polls instead)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        state = handle.poll()
        if not state.running:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run did not finish within {timeout_seconds} s (last stage: {state.stage})")
        if process_events is not None:
            process_events()
        time.sleep(0.1)


def cancel_run(handle: RunHandle, grace_seconds: float = 10.0) -> RunState:
    """Stop the child (and the interpreter that the PythonSlicer launcher started: BackgroundRun
    signals the whole process group), waiting for it, and remove the temporary folder; nothing was
    added to the scene. A GUI thread uses ``request_cancel`` and ``cancel_finished`` instead."""
    try:
        state = handle.run.cancel(grace_seconds)
    finally:
        shutil.rmtree(handle.work_dir, ignore_errors=True)
    return state


def request_cancel(handle: RunHandle, grace_seconds: float = 10.0) -> None:
    """Start stopping the run; returns at once. Poll ``cancel_finished`` (a timer) until it is done."""
    handle.run.request_cancel(grace_seconds)


def cancel_finished(handle: RunHandle) -> bool:
    """Whether a requested cancel is complete (the child is gone, its temporary folder removed); never blocks."""
    if not handle.run.cancel_done():
        return False
    shutil.rmtree(handle.work_dir, ignore_errors=True)
    return True


def load_run(scene, input_volume, outputs: RunOutputs, monitor: Monitor | None = None, color_logic=None):
    """Add a finished run to the scene, styled and segmented at its threshold: (nodes, live segmentation).

    All-or-nothing: if anything fails or the monitor cancels, the scene is left as it was.
    """
    from .display import style_result
    from .live_segmentation import LiveSegmentation
    from .result_nodes import add_result_nodes

    nodes = add_result_nodes(scene, input_volume, outputs, monitor)
    try:
        style_result(nodes, color_logic)
        live = LiveSegmentation(nodes, new_result=True)
        live.update()
        (monitor or Monitor()).check()
    except BaseException:
        nodes.remove()
        raise
    return nodes, live


def finish_run(handle: RunHandle, scene, color_logic=None):
    """Load a finished run into the scene (all or nothing) and remove the temporary folder.

    Returns (ResultNodes, LiveSegmentation); raises RunFailedError with the child's one-line message."""
    try:
        state = handle.poll()
        if state.running:
            raise RuntimeError("the run has not finished")
        if state.returncode != 0:
            logging.error(f"NormativeAnomaly: the run failed (exit status {state.returncode}):\n{handle.run.log()}")
            # The message names the temporary copy of the input: name the volume instead.
            message = failure_message(state).replace(os.path.join(handle.work_dir, INPUT_FILE),
                                                    f"\"{handle.input_volume.GetName()}\"")
            raise RunFailedError(message, state.returncode)
        logging.info(f"NormativeAnomaly: run finished:\n{handle.run.log()}")
        outputs = read_run_folder(handle.out_dir)
        return load_run(scene, handle.input_volume, outputs, color_logic=color_logic)
    finally:
        shutil.rmtree(handle.work_dir, ignore_errors=True)


def failure_message(state: RunState) -> str:
    if state.returncode == EXIT_CANCELLED:
        return _("Cancelled")
    message = without_prefix(state.message)
    return message or _("The analysis failed (exit status {status}); see the Python console.").format(
        status=state.returncode)
