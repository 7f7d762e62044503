import logging
import os
import shutil
import tempfile
from typing import Annotated, Any, Optional

import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from NormativeAnomalySlicer.sample_data import registerSampleData

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4 has no translation support
    _ = str

# Torch and MONAI are never imported in Slicer's process: the analysis runs in a PythonSlicer child
# process (NormativeAnomalyLib.cli), and every torch check asks such a child (NormativeAnomalySlicer).
# The heavier helpers (SimpleITK, scipy) are imported when the panel is first shown, not at startup.


class NormativeAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Normative Anomaly")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["NormativeAnomaly developers"]
        self.parent.helpText = _("""
Unsupervised anomaly detection in brain MRI. A normative generative model trained on healthy brains
reconstructs a pseudo-healthy version of the input; the difference gives an anomaly map and a lesion
segmentation. See the <a href="https://github.com/normative-anomaly/SlicerNormativeAnomaly">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Inputs are registered to the MNI ICBM152 2009c template (Fonov et al., NeuroImage 2009 and 2011).
MNI ICBM152 template: Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University; notice in Resources/Licenses/MNI-ICBM152.txt. Uses PyTorch and MONAI.
""")
        # The demo case goes into the Sample Data module once the application has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


@parameterNodeWrapper
class NormativeAnomalyParameterNode:
    """Inputs of a run (inputVolume, brainMask, modelName, device, alreadyInTemplateSpace; for diffusion
    models noiseLevel, diffusionSteps, samples, diffusionNoise, loaded from the card when such a model
    is selected) and the active result with its display settings. threshold and minLesionMm3 mirror the
    active result's saved settings (a ctkSliderWidget binding needs bounds; the threshold slider range
    is set per result). The int fields carry their spin box's range: without one, the binding would
    widen the spin box to the whole int range."""

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Optional[vtkMRMLLabelMapVolumeNode]
    modelName: str = ""
    # Choice is required by the parameter node wrapper to bind a str to a QComboBox.
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    alreadyInTemplateSpace: bool = False
    noiseLevel: Annotated[int, WithinRange(1, 1000)] = 250
    diffusionSteps: Annotated[int, WithinRange(1, 100)] = 10
    samples: Annotated[int, WithinRange(1, 32)] = 1
    diffusionNoise: Annotated[str, Choice(["gaussian", "coarse"])] = "coarse"
    activeResult: Optional[vtkMRMLSegmentationNode]
    threshold: Annotated[float, WithinRange(0.0, 1.0e6)] = 0.0
    minLesionMm3: Annotated[float, WithinRange(0.0, 5000.0)] = 0.0
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    fade: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    showUncertainty: bool = False  # the uncertainty map as the overlay, when the active result has one


class NormativeAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Lifecycle, parameter node and model selector; the Run section is a RunPanel, the results,
    lesions and export sections a ResultsPanel (NormativeAnomalySlicer)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: Optional[NormativeAnomalyLogic] = None
        self._parameterNode: Optional[NormativeAnomalyParameterNode] = None
        self._parameterNodeGuiTag = None
        self._handlingModified = False

    def setup(self) -> None:
        from NormativeAnomalySlicer.results_panel import ResultsPanel
        from NormativeAnomalySlicer.run_panel import RunPanel

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NormativeAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = NormativeAnomalyLogic()
        # The panels ask for the parameter node each time: it changes when the scene is closed.
        self._results = ResultsPanel(self.ui, self._currentParameterNode, self._showStatus)
        self._run = RunPanel(self.ui, self.logic, self._currentParameterNode, self._showStatus, self._onResultLoaded)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # The model list is dynamic, so modelSelector is synchronised by hand (no SlicerParameterName).
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)

        self._populateModelSelector()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._run.cleanup()  # cancels a running analysis
        self._results.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._run.detectDevices()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._run.cancel(_("Cancelled: the scene was closed."))
        self._results.setResult(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[NormativeAnomalyParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are connected here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._results.reapplyThresholdRange()  # connectGui set the slider to the declared range
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _currentParameterNode(self) -> Optional[NormativeAnomalyParameterNode]:
        return self._parameterNode

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Route parameter changes to the panel sections. Changes made while handling one (a result's
        saved settings loaded into the sliders) are dealt with in the same pass: nested events are ignored."""
        if self._handlingModified or not self._parameterNode:
            return
        self._handlingModified = True
        try:
            parameters = self._parameterNode
            if self.ui.modelSelector.currentData != parameters.modelName:
                self._syncModelSelector()
            if parameters.activeResult is not self._results.source:
                self._results.setResult(parameters.activeResult)
            self._results.onSettingsChanged()  # threshold / minimum size: throttled re-segmentation
            self._results.showResult()  # overlay opacity / fade
            self._run.checkCanApply()
        finally:
            self._handlingModified = False

    def _onResultLoaded(self, nodes, live) -> None:
        """A run finished: its result becomes the active one."""
        self._results.adopt(nodes, live)
        if self._parameterNode:
            self._parameterNode.activeResult = nodes.segmentation
        if self._results.source is not nodes.segmentation:  # module not shown: the parameter node is not observed
            self._results.setResult(nodes.segmentation)

    def _populateModelSelector(self) -> None:
        """The registered models, the default one first (it is selected when the parameter node has none)."""
        try:
            for model in self.logic.availableModels():
                label = f"{model['name']} ({model.get('family') or '?'}, {model.get('modality') or '?'})"
                self.ui.modelSelector.addItem(label, model["name"])
        except (OSError, ValueError, KeyError) as error:
            logging.error(f"NormativeAnomaly: cannot list the models: {error}")
            self._showStatus(_("Could not list the models: {error}").format(error=error))

    def _syncModelSelector(self) -> None:
        """Show the parameter node's model; use the default model if it is unset or unknown."""
        index = max(self.ui.modelSelector.findData(self._parameterNode.modelName), 0)
        if index < self.ui.modelSelector.count:
            self.ui.modelSelector.currentIndex = index
            self._setModel(self.ui.modelSelector.itemData(index))
        self._showModelCard()

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._setModel(self.ui.modelSelector.itemData(index))
        self._showModelCard()

    def _setModel(self, modelName: str) -> None:
        """Store the model in the parameter node. When it changes to a diffusion model, its card's
        settings become the diffusion settings shown (the user may then change them); when it is
        the same model (the selector following the parameter node), the stored settings are kept."""
        from NormativeAnomalySlicer.model_cards import diffusionSettings

        parameters = self._parameterNode
        if parameters.modelName == modelName:
            return
        settings = diffusionSettings(self.logic.modelCard(modelName))
        with slicer.util.NodeModify(parameters):  # one Modified event for the whole change
            parameters.modelName = modelName
            if settings is not None:
                self._loadDiffusionSettings(settings)

    def _loadDiffusionSettings(self, settings: dict[str, Any]) -> None:
        """A card's settings into the parameter node, within the ranges of the spin boxes."""
        parameters = self._parameterNode
        for field, key, spinBox in (("noiseLevel", "noise_level", self.ui.noiseLevelSpinBox),
                                    ("diffusionSteps", "steps", self.ui.diffusionStepsSpinBox),
                                    ("samples", "samples", self.ui.samplesSpinBox)):
            try:
                value = int(settings[key])
            except (KeyError, TypeError, ValueError):
                continue
            setattr(parameters, field, min(max(value, spinBox.minimum), spinBox.maximum))
        if settings.get("noise") in ("gaussian", "coarse"):
            parameters.diffusionNoise = settings["noise"]

    def _showModelCard(self) -> None:
        from NormativeAnomalySlicer.model_cards import cardHtml

        self.ui.modelCardLabel.text = cardHtml(self.logic.modelCard(self.ui.modelSelector.currentData))

    def _showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text


class NormativeAnomalyLogic(ScriptedLoadableModuleLogic):
    """Runs NormativeAnomalyLib's command-line tool in a child PythonSlicer process and loads its results
    with the library's MRML layer. Usable without the widget (see the test)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._models: Optional[list[dict[str, Any]]] = None

    def getParameterNode(self) -> NormativeAnomalyParameterNode:
        return NormativeAnomalyParameterNode(super().getParameterNode())

    def availableModels(self) -> list[dict[str, Any]]:
        """Registered models (card fields and ``default``), the default first."""
        from NormativeAnomalySlicer.model_cards import availableModels

        if self._models is None:
            self._models = availableModels()
        return self._models

    def modelCard(self, modelName: Optional[str]) -> Optional[dict[str, Any]]:
        return next((model for model in self.availableModels() if model["name"] == modelName), None)

    def defaultModelName(self) -> Optional[str]:
        models = self.availableModels()
        return models[0]["name"] if models else None

    def startRun(self, inputVolume: vtkMRMLScalarVolumeNode, modelName: str, device: str = "auto",
                 alreadyInTemplateSpace: bool = False, brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None,
                 diffusion: Optional[dict[str, Any]] = None):
        """Start the analysis in the background; returns a RunHandle to poll, finish or cancel.

        ``diffusion`` overrides a diffusion model's card settings for this run: any of noise_level,
        steps, samples (more than 1 also gives an uncertainty map) and noise ("gaussian" or "coarse").
        It is only passed on for diffusion models (ignored, with a warning, for a registered model of
        another family; a model given by folder is left to the command-line tool to judge)."""
        from NormativeAnomalySlicer import run_controller
        from NormativeAnomalySlicer.model_cards import diffusionSettings, isDiffusionModel

        card = self.modelCard(modelName)
        if diffusion and card is not None and not isDiffusionModel(card):
            logging.warning(f"NormativeAnomaly: {modelName} is not a diffusion model: diffusion settings ignored")
            diffusion = None
        return run_controller.startRun(inputVolume, modelName, device, alreadyInTemplateSpace, brainMask,
                                       slicer.app.temporaryPath, diffusion=diffusion,
                                       diffusionCard=diffusionSettings(card))

    def waitForRun(self, handle, timeoutSeconds: float = 3600.0):
        """Block (keeping the application responsive) until the run ends; returns its RunState."""
        from NormativeAnomalySlicer import run_controller

        return run_controller.waitForRun(handle, timeoutSeconds, slicer.app.processEvents)

    def cancelRun(self, handle):
        from NormativeAnomalySlicer import run_controller

        return run_controller.cancelRun(handle)

    def finishRun(self, handle):
        """Load a finished run (all or nothing): returns (ResultNodes, LiveSegmentation)."""
        from NormativeAnomalySlicer import run_controller

        return run_controller.finishRun(handle, slicer.mrmlScene, slicer.modules.colors.logic())


class NormativeAnomalyTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RunThresholdRejectExport()
        self.setUp()
        self.test_Panel()
        self.setUp()
        self.test_Cancel()
        self.setUp()
        self.test_Diffusion()

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
        import numpy
        from NormativeAnomalyLib.mrml.export import EXPORT_FILES, export_result
        from NormativeAnomalyLib.mrml.result_nodes import SEGMENT_ID

        self.delayDisplay("Running the default model on the demo case")
        inputVolume = self._loadDemo()
        logic = NormativeAnomalyLogic()
        handle = logic.startRun(inputVolume, logic.defaultModelName())
        state = logic.waitForRun(handle, timeoutSeconds=1800)
        self.assertEqual(state.returncode, 0, f"run failed: {state.message}")
        nodes, live = logic.finishRun(handle)
        self.assertFalse(os.path.exists(handle.workDir))

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
        """The panel's controls drive the result: threshold slider (after its throttle delay), table row
        selection (centres the views), Reject button, export button."""
        import time
        from NormativeAnomalyLib.mrml.export import EXPORT_FILES
        from NormativeAnomalyLib.mrml.result_nodes import SEGMENT_ID

        inputVolume = self._loadDemo()
        slicer.util.selectModule("NormativeAnomaly")
        widget = slicer.util.getModuleWidget("NormativeAnomaly")
        logic = widget.logic
        handle = logic.startRun(inputVolume, logic.defaultModelName())
        self.assertEqual(logic.waitForRun(handle, timeoutSeconds=1800).returncode, 0)
        nodes, _live = logic.finishRun(handle)
        logic.getParameterNode().activeResult = nodes.segmentation

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
        from NormativeAnomalySlicer.model_cards import isDiffusionModel
        self.assertEqual(widget.ui.diffusionGroupBox.isHidden(),
                         not isDiffusionModel(logic.modelCard(widget.ui.modelSelector.currentData)))
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
        self.assertAlmostEqual(redOffset, superior, delta=2.0)  # the slice snaps to the volume's planes
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
        self.delayDisplay("Test passed")

    def test_Cancel(self):
        """Cancel right after the start: the child stops, the temporary folder goes, the scene is unchanged."""
        inputVolume = self._loadDemo()
        logic = NormativeAnomalyLogic()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        handle = logic.startRun(inputVolume, logic.defaultModelName())
        logic.cancelRun(handle)
        self.assertIsNotNone(handle.run.process.poll())
        self.assertFalse(os.path.exists(handle.workDir))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")

    def test_Diffusion(self):
        """A registered diffusion model: selecting it loads its card's settings into the panel; a short
        run (2 samples of 2 denoising steps) gives an uncertainty map on the input's grid, shown on demand.
        Skipped when no diffusion model is registered."""
        from NormativeAnomalyLib.mrml.display import show_result
        from NormativeAnomalySlicer.model_cards import diffusionSettings, isDiffusionModel

        logic = NormativeAnomalyLogic()
        model = next((model for model in logic.availableModels() if isDiffusionModel(model)), None)
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
        card = diffusionSettings(model)
        parameters = widget.logic.getParameterNode()
        self.assertFalse(widget.ui.diffusionGroupBox.isHidden())
        self.assertEqual(parameters.modelName, model["name"])
        self.assertEqual(parameters.diffusionNoise, card["noise"])
        self.assertEqual(parameters.samples, min(max(int(card["samples"]), 1), 32))

        self.delayDisplay(f"Running {model['name']} with 2 samples of 2 steps")
        handle = logic.startRun(inputVolume, model["name"], diffusion={"samples": 2, "steps": 2})
        state = logic.waitForRun(handle, timeoutSeconds=1800)
        self.assertEqual(state.returncode, 0, f"run failed: {state.message}")
        nodes, _live = logic.finishRun(handle)
        self.assertIsNotNone(nodes.uncertainty_map, "no uncertainty map from a run with 2 samples")
        self._assertOnInputGrid(nodes.uncertainty_map, inputVolume)
        show_result(nodes, 0.5, 0.0, show_uncertainty=True)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), nodes.uncertainty_map.GetID())
        self.delayDisplay("Test passed")
