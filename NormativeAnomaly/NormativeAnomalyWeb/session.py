"""The web app's work on the server: one input volume, its results, one run at a time.

No trame and no views here, only the MRML layer that the Slicer module uses too: the run is
``mrml.run_controller``'s (the CLI in a child process, loaded all-or-nothing), thresholds go
through ``LiveSegmentation``, layers through ``display.show_result``, downloads through
``export`` (the files Export writes). So both front ends give the same segmentation from the same input.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
from vtkmodules.util.numpy_support import vtk_to_numpy

from NormativeAnomalyLib.errors import InputVolumeError, NormativeAnomalyError
from NormativeAnomalyLib.lesions import Segmentation
from NormativeAnomalyLib.models import model_summaries
from NormativeAnomalyLib.mrml import LiveSegmentation, ResultNodes, run_controller
from NormativeAnomalyLib.mrml.display import centre_on, show_result
from NormativeAnomalyLib.mrml.export import write_export_file
from NormativeAnomalyLib.mrml.lesion_table import read_lesion_table
from NormativeAnomalyLib.mrml.live_segmentation import ThresholdRange, threshold_range
from NormativeAnomalyLib.mrml.result_nodes import SEGMENT_ID, remove_node
from NormativeAnomalyLib.mrml.volumes import load_volume_file
from NormativeAnomalyLib.options import RunOptions
from NormativeAnomalyLib.volume_io import read_volume

from .files import FileAccess


class SessionError(NormativeAnomalyError):
    """Something the user asked cannot be done now (one line, shown in the page)."""


@dataclass
class Result:
    nodes: ResultNodes
    live: LiveSegmentation

    @property
    def label(self) -> str:
        return str(self.nodes.model.get("name", "model"))


@dataclass(frozen=True)
class Display:
    overlay_opacity: float = 0.5
    fade: float = 0.0  # > 0: the pseudo-healthy reconstruction over the input at this opacity
    uncertainty: bool = False


class AnalysisSession:
    def __init__(self, scene, files: FileAccess, color_logic=None, device: str = "auto",
                 python: str | None = None) -> None:
        self.scene = scene
        self.files = files
        self.color_logic = color_logic
        self.device = device
        self.python = python  # the interpreter running the CLI (this one by default)
        self.input_volume = None
        self.results: list[Result] = []
        self.active: Result | None = None
        self.display = Display()
        self.handle: run_controller.RunHandle | None = None

    # Models and input ---------------------------------------------------------------------------

    @staticmethod
    def models() -> list[dict[str, Any]]:
        """The model selector's list (the default model first): the Slicer selector's too."""
        return model_summaries()

    def load(self, path: str | os.PathLike) -> Any:
        """Make a shared or uploaded volume the input; the previous input and its results go."""
        if self.running:
            raise SessionError("wait for the run to finish (or cancel it) before loading another volume")
        resolved = self.files.resolve(path)
        try:  # one-line errors for bad volumes, before MRML sees them
            read_volume(resolved, name="volume", data_root=self.files.data_root(resolved))
        except InputVolumeError as error:  # named by its file name: server paths stay on the server
            raise InputVolumeError(str(error).replace(str(resolved), resolved.name)) from None
        self.clear()
        name = resolved.name.split(".")[0] or "input"
        self.input_volume = load_volume_file(self.scene, resolved, name)
        return self.input_volume

    def clear(self) -> None:
        for result in self.results:
            result.nodes.remove()
        self.results, self.active = [], None
        if self.input_volume is not None and self.input_volume.GetScene() is self.scene:
            remove_node(self.scene, self.input_volume)
        self.input_volume = None

    # The run ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.handle is not None

    def start(self, model_name: str) -> None:
        """Run a model with its card's settings (the page has no per-run diffusion overrides)."""
        if self.running:
            raise SessionError("a run is already going")
        if self.input_volume is None:
            raise SessionError("load a volume first")
        if not any(model["name"] == model_name for model in self.models()):
            raise SessionError(f"unknown model {model_name!r}")
        self.handle = run_controller.start_run(self.input_volume, model_name, RunOptions(device=self.device), None,
                                               str(self.files.work_dir / "runs"), python=self.python)

    def poll(self):
        """The run's state (stage, fraction, running, returncode, message), or None without a run."""
        return self.handle.poll() if self.handle is not None else None

    def cancel(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            run_controller.cancel_run(handle)

    def finish(self) -> Result:
        """Load the finished run (all or nothing) and make it the active result; raises
        ``run_controller.RunFailedError`` with the run's one-line message."""
        handle, self.handle = self.handle, None
        if handle is None:
            raise SessionError("no run to finish")
        nodes, live = run_controller.finish_run(handle, self.scene, self.color_logic)
        result = Result(nodes, live)
        self.results.append(result)
        self.select(len(self.results) - 1)
        return result

    # The active result ---------------------------------------------------------------------------

    def select(self, index: int) -> Result:
        if not 0 <= index < len(self.results):
            raise SessionError(f"there is no result {index}")
        self.active = self.results[index]
        if self.active.live.current is None:
            self.active.live.update()
        self.show(self.display)
        return self.active

    def _result(self) -> Result:
        if self.active is None:
            raise SessionError("run a model first")
        return self.active

    def threshold_range(self) -> ThresholdRange:
        return threshold_range(self._result().nodes)

    def update(self, threshold: float | None = None, min_lesion_mm3: float | None = None) -> Segmentation:
        return self._result().live.update(threshold=threshold, min_lesion_mm3=min_lesion_mm3)

    def threshold_for_fpr(self, fpr: float) -> float:
        return self._result().live.threshold_for_fpr(fpr)

    def fpr(self) -> float:
        return self._result().live.fpr

    def set_rejected(self, lesion_id: int, rejected: bool) -> Segmentation:
        return self._result().live.set_rejected(int(lesion_id), rejected)

    def lesions(self) -> list[dict]:
        return read_lesion_table(self._result().nodes.lesion_table) if self.active else []

    def centre_on_lesion(self, lesion_id: int) -> tuple[float, float, float]:
        row = next((row for row in self.lesions() if row["ID"] == int(lesion_id)), None)
        if row is None:
            raise SessionError(f"there is no lesion {lesion_id} at this threshold")
        ras = (row["R"], row["A"], row["S"])
        centre_on(self._result().nodes.input_volume, ras)
        return ras

    def show(self, display: Display) -> None:
        self.display = display
        if self.active is not None:
            nodes = self.active.nodes
            show_result(nodes, display.overlay_opacity, display.fade,
                        show_uncertainty=display.uncertainty and nodes.uncertainty_map is not None)

    def segment_voxels(self) -> int:
        """Voxels in the active result's segment, read back from the segmentation node."""
        nodes = self._result().nodes
        labelmap = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            nodes.segmentation, SEGMENT_ID, labelmap)
        scalars = labelmap.GetPointData().GetScalars()
        return 0 if scalars is None else int(np.count_nonzero(vtk_to_numpy(scalars)))

    def download(self, name: str) -> bytes:
        """One of the active result's hand-over files (``export`` names), as bytes; b"" when the
        result has no such file. Written to a new folder of the work folder, removed after reading."""
        folder = self.files.download_dir()
        try:
            path = write_export_file(self._result().nodes, name, folder)
            return path.read_bytes() if path is not None else b""
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        self.cancel()
        self.clear()
