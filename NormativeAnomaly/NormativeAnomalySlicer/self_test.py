"""The bodies of the module's self-tests, as a mixin of NormativeAnomalyTest (NormativeAnomaly.py).

Slicer discovers the test class in the module file (``slicer_add_python_unittest``, the Reload and
Test button); unittest also finds the test_* methods this class gives it. ``self`` is the
ScriptedLoadableModuleTest, which provides the assertions, ``delayDisplay`` and ``newLogic`` (a
fresh NormativeAnomalyLogic).

``test_PrecomputedRun`` needs neither PyTorch nor MONAI: it loads a finished run shipped with the
module (Testing/Data/demo_run, copied to Resources/TestData) through the path a run's results take,
and drives the panel. The others run a model, so they are skipped, with the reason, where PyTorch
or MONAI is missing: Slicer's test harness and the extensions factory never install them.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import vtk

import slicer


TEST_RUN = "demo_run"


def precomputedRunFolder() -> Path:
    """The shipped finished run: beside the module (build or install tree), else the source tree's."""
    from NormativeAnomalyLib.resources import resources_dir
    from NormativeAnomalyLib.run_folder import RUN_JSON

    for folder in (resources_dir() / "TestData" / TEST_RUN,
                   Path(__file__).resolve().parent.parent.parent / "Testing" / "Data" / TEST_RUN):
        if (folder / RUN_JSON).is_file():
            return folder
    raise FileNotFoundError(f"the self-test's finished run ({TEST_RUN}) is not installed with the module")


def torchMissingReason() -> Optional[str]:
    """Why a model cannot run here (PyTorch or MONAI does not import in the child Python), or None."""
    from NormativeAnomalyLib.mrml.run_controller import python_executable

    try:
        result = subprocess.run([python_executable(), "-c", "import torch, monai"], capture_output=True, text=True,
                                timeout=300, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot ask {python_executable()} for PyTorch and MONAI: {error}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"PyTorch or MONAI is not installed ({lines[-1] if lines else 'import failed'})"
    return None


class NormativeAnomalySelfTests:
    def _requireTorch(self) -> None:
        reason = torchMissingReason()
        if reason:
            self.skipTest(reason)

    def test_PrecomputedRun(self):
        """Without PyTorch: a finished run loaded as a run's results are (read_run_folder, load_run), made
        the panel's active result, then the sliders, table, Reject and Export as a user drives them."""
        from NormativeAnomalyLib.mrml import load_run
        from NormativeAnomalyLib.run_folder import read_run_folder

        folder = precomputedRunFolder()
        self.delayDisplay(f"Loading the finished run in {folder}")
        inputVolume = slicer.util.loadVolume(str(folder / "input.nii.gz"))
        slicer.util.selectModule("NormativeAnomaly")
        widget = slicer.util.getModuleWidget("NormativeAnomaly")
        nodes, live = load_run(slicer.mrmlScene, inputVolume, read_run_folder(folder),
                               color_logic=slicer.modules.colors.logic())
        for volume in (nodes.pseudo_healthy, nodes.anomaly_map):
            self._assertOnInputGrid(volume, inputVolume)
        self.assertEqual(nodes.lesion_table.GetNumberOfRows(), len(live.current.lesions))
        widget.logic.getParameterNode().activeResult = nodes.segmentation
        self._drivePanel(widget, nodes, inputVolume)
        self.delayDisplay("Test passed")

    def _loadDemo(self):
        from NormativeAnomalySlicer.sample_data import demoPath

        self.assertTrue(demoPath().is_file(), f"demo case not found: {demoPath()}")
        return slicer.util.loadVolume(str(demoPath()))

    def _assertOnInputGrid(self, volume, inputVolume) -> None:
        """A result volume in the scene, with the input's dimensions and IJK-to-RAS matrix."""
        import numpy

        self.assertTrue(slicer.mrmlScene.IsNodePresent(volume))
        self.assertEqual(volume.GetImageData().GetDimensions(), inputVolume.GetImageData().GetDimensions())
        inputMatrix, matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputMatrix)
        volume.GetIJKToRASMatrix(matrix)
        numpy.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix),
                                      slicer.util.arrayFromVTKMatrix(inputMatrix), atol=1e-4)

    def test_RunThresholdRejectExport(self):
        """Default model on the demo case through the logic's background run, then the live controls."""
        self._requireTorch()
        import numpy
        from NormativeAnomalyLib.mrml.export import EXPORT_FILES, export_result
        from NormativeAnomalyLib.mrml.result_nodes import SEGMENT_ID

        self.delayDisplay("Running the default model on the demo case")
        inputVolume = self._loadDemo()
        logic = self.newLogic()
        handle = logic.startRun(inputVolume, logic.defaultModelName())
        state = logic.waitForRun(handle, timeoutSeconds=1800)
        self.assertEqual(state.returncode, 0, f"run failed: {state.message}")
        nodes, live = logic.finishRun(handle)
        self.assertFalse(os.path.exists(handle.work_dir))

        for volume in (nodes.pseudo_healthy, nodes.anomaly_map):
            self._assertOnInputGrid(volume, inputVolume)
        inputMatrix = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputMatrix)
        self.assertTrue(slicer.mrmlScene.IsNodePresent(nodes.segmentation))
        labelmap = slicer.vtkOrientedImageData()
        nodes.segmentation.GetBinaryLabelmapRepresentation(SEGMENT_ID, labelmap)
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        numpy.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix),
                                      slicer.util.arrayFromVTKMatrix(inputMatrix), atol=1e-4)

        def voxels() -> int:
            return int(numpy.count_nonzero(
                slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, SEGMENT_ID, inputVolume)))

        self.delayDisplay("Moving the threshold")
        if not live.current.lesions:  # make sure there is something to reject below
            live.update(threshold=live.threshold_for_fpr(0.05))
        base, baseThreshold = voxels(), nodes.threshold
        live.update(threshold=baseThreshold * 1.5)
        self.assertLessEqual(voxels(), base)
        live.update(threshold=baseThreshold)
        self.assertEqual(voxels(), base)
        self.assertEqual(nodes.lesion_table.GetNumberOfRows(), len(live.current.lesions))
        self.assertGreater(len(live.current.lesions), 0, "no lesion found in the demo case")

        self.delayDisplay("Rejecting the first lesion")
        live.set_rejected(live.current.lesions[0].id, True)
        self.assertLess(voxels(), base)
        self.assertEqual(nodes.lesion_table.GetNumberOfRows(), len(live.current.lesions))

        self.delayDisplay("Exporting")
        folder = tempfile.mkdtemp(prefix="NormativeAnomalyTest-", dir=slicer.app.temporaryPath)
        try:
            paths = export_result(nodes, folder)
            self.assertEqual(sorted(path.name for path in paths), sorted(EXPORT_FILES))
            self.assertTrue(all(path.is_file() for path in paths))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")

    def test_Panel(self):
        """The default model run through the logic, its result made active, then the panel's controls."""
        self._requireTorch()
        inputVolume = self._loadDemo()
        slicer.util.selectModule("NormativeAnomaly")
        widget = slicer.util.getModuleWidget("NormativeAnomaly")
        logic = widget.logic
        handle = logic.startRun(inputVolume, logic.defaultModelName())
        self.assertEqual(logic.waitForRun(handle, timeoutSeconds=1800).returncode, 0)
        nodes, _live = logic.finishRun(handle)
        logic.getParameterNode().activeResult = nodes.segmentation
        self._drivePanel(widget, nodes, inputVolume)
        self.delayDisplay("Test passed")

    def _drivePanel(self, widget, nodes, inputVolume) -> None:
        """The panel's controls drive the active result: threshold slider (after its throttle delay),
        table row selection (centres the views), Reject button, export button."""
        import time
        from NormativeAnomalyLib.mrml.export import EXPORT_FILES
        from NormativeAnomalyLib.mrml.result_nodes import SEGMENT_ID

        logic = widget.logic

        def settle() -> None:  # longer than the sliders' throttle delay
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                slicer.app.processEvents()
                time.sleep(0.02)

        def voxels() -> int:
            import numpy
            return int(numpy.count_nonzero(
                slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, SEGMENT_ID, inputVolume)))

        settle()
        # Controls that only apply to diffusion models and to results with an uncertainty map.
        from NormativeAnomalyLib.models.registry import is_diffusion_model
        self.assertEqual(widget.ui.diffusionGroupBox.isHidden(),
                         not is_diffusion_model(logic.modelCard(widget.ui.modelSelector.currentData)))
        self.assertEqual(widget.ui.showUncertaintyCheckBox.enabled, nodes.uncertainty_map is not None)
        slider = widget.ui.thresholdSliderWidget
        lower = round(0.6 * nodes.threshold, slider.decimals)
        slider.value = lower
        settle()
        self.assertAlmostEqual(nodes.threshold, lower, places=slider.decimals)
        rows = nodes.lesion_table.GetNumberOfRows()
        self.assertGreater(rows, 0, "no lesion at a lowered threshold")
        base = voxels()

        self.delayDisplay("Selecting and rejecting the first lesion")
        table = widget.ui.lesionTableView
        table.selectRow(0)
        settle()
        redOffset = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceOffset()
        superior = nodes.lesion_table.GetTable().GetValueByName(0, "S").ToDouble()
        spacing = max(inputVolume.GetSpacing())
        self.assertAlmostEqual(redOffset, superior, delta=spacing + 0.5)  # the slice snaps to the volume's planes
        widget.ui.rejectLesionButton.click()
        settle()
        self.assertLess(voxels(), base)

        folder = tempfile.mkdtemp(prefix="NormativeAnomalyPanelTest-", dir=slicer.app.temporaryPath)
        try:
            widget.ui.exportDirectoryButton.directory = folder
            widget.ui.exportButton.click()
            self.assertEqual(sorted(os.listdir(folder)), sorted(EXPORT_FILES))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def test_Cancel(self):
        """Cancel right after the start: the child stops, the temporary folder goes, the scene is unchanged."""
        self._requireTorch()
        inputVolume = self._loadDemo()
        logic = self.newLogic()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        handle = logic.startRun(inputVolume, logic.defaultModelName())
        logic.cancelRun(handle)
        self.assertIsNotNone(handle.run.process.poll())
        self.assertFalse(os.path.exists(handle.work_dir))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")

    def test_Diffusion(self):
        """A registered diffusion model: selecting it loads its card's settings into the panel; a short
        run (2 samples of 2 denoising steps) gives an uncertainty map on the input's grid, shown on demand.
        Skipped when no diffusion model is registered."""
        self._requireTorch()
        from NormativeAnomalyLib.mrml.display import show_result
        from NormativeAnomalyLib.models.registry import card_diffusion_settings, is_diffusion_model
        from NormativeAnomalyLib.options import RunOptions

        logic = self.newLogic()
        model = next((model for model in logic.availableModels() if is_diffusion_model(model)), None)
        if model is None:
            self.delayDisplay("No diffusion model is registered: diffusion test skipped")
            return

        self.delayDisplay(f"Selecting the diffusion model {model['name']}")
        inputVolume = self._loadDemo()
        slicer.util.selectModule("NormativeAnomaly")
        widget = slicer.util.getModuleWidget("NormativeAnomaly")
        selector = widget.ui.modelSelector
        other = next((index for index in range(selector.count) if selector.itemData(index) != model["name"]), None)
        if other is not None:
            selector.currentIndex = other
        selector.currentIndex = selector.findData(model["name"])
        slicer.app.processEvents()
        card = card_diffusion_settings(model)
        parameters = widget.logic.getParameterNode()
        self.assertFalse(widget.ui.diffusionGroupBox.isHidden())
        self.assertEqual(parameters.modelName, model["name"])
        self.assertEqual(parameters.diffusionNoise, card["noise"])
        self.assertEqual(parameters.samples, min(max(int(card["samples"]), 1), 32))

        self.delayDisplay(f"Running {model['name']} with 2 samples of 2 steps")
        handle = logic.startRun(inputVolume, model["name"], RunOptions(diffusion={"samples": 2, "steps": 2}))
        state = logic.waitForRun(handle, timeoutSeconds=1800)
        self.assertEqual(state.returncode, 0, f"run failed: {state.message}")
        nodes, _live = logic.finishRun(handle)
        self.assertIsNotNone(nodes.uncertainty_map, "no uncertainty map from a run with 2 samples")
        self._assertOnInputGrid(nodes.uncertainty_map, inputVolume)
        show_result(nodes, 0.5, 0.0, show_uncertainty=True)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), nodes.uncertainty_map.GetID())
        self.delayDisplay("Test passed")
