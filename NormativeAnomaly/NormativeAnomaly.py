import dataclasses
import logging
from typing import Annotated, Any, Optional

import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from NormativeAnomalyLib.options import (DEVICES, DIFFUSION_DEFAULTS, DIFFUSION_NOISE_KINDS, DIFFUSION_RANGES,
                                         MIN_LESION_MM3_MAX, SKULL_CHOICES, RunOptions)
from NormativeAnomalySlicer.sample_data import registerSampleData
from NormativeAnomalySlicer.self_test import NormativeAnomalySelfTests

from slicer.i18n import tr as _
from slicer.i18n import translate

CONTRIBUTORS = "NormativeAnomaly developers (NormativeAnomaly project)"  # as EXTENSION_CONTRIBUTORS in CMakeLists.txt

# Torch and MONAI are never imported in Slicer's process: the analysis runs in a PythonSlicer child
# process (NormativeAnomalyLib.cli), and every torch check asks such a child (NormativeAnomalySlicer).
# The heavier helpers (SimpleITK, scipy) are imported when the panel is first shown, not at startup.


class NormativeAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Normative Anomaly")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = [CONTRIBUTORS]
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
    device: Annotated[str, Choice(list(DEVICES))] = RunOptions.device
    alreadyInTemplateSpace: bool = RunOptions.registered
    acceptPoorAlignment: bool = RunOptions.accept_poor_alignment
    skull: Annotated[str, Choice(list(SKULL_CHOICES))] = "detect"
    noiseLevel: Annotated[int, WithinRange(*DIFFUSION_RANGES["noise_level"])] = DIFFUSION_DEFAULTS["noise_level"]
    diffusionSteps: Annotated[int, WithinRange(*DIFFUSION_RANGES["steps"])] = DIFFUSION_DEFAULTS["steps"]
    samples: Annotated[int, WithinRange(*DIFFUSION_RANGES["samples"])] = DIFFUSION_DEFAULTS["samples"]
    diffusionNoise: Annotated[str, Choice(list(DIFFUSION_NOISE_KINDS))] = DIFFUSION_DEFAULTS["noise"]
    activeResult: Optional[vtkMRMLSegmentationNode]
    threshold: Annotated[float, WithinRange(0.0, 1.0e6)] = 0.0
    minLesionMm3: Annotated[float, WithinRange(0.0, MIN_LESION_MM3_MAX)] = 0.0
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    fade: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    showUncertainty: bool = False  # the uncertainty map as the overlay, when the active result has one


class NormativeAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Lifecycle and parameter node; the model selector is an InputsPanel, the Run section a RunPanel,
    the results, lesions and export sections a ResultsPanel (NormativeAnomalySlicer)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: Optional[NormativeAnomalyLogic] = None
        self._parameterNode: Optional[NormativeAnomalyParameterNode] = None
        self._parameterNodeGuiTag = None
        self._handlingModified = False

    def setup(self) -> None:
        from NormativeAnomalySlicer.inputs_panel import InputsPanel
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
        # Connects and fills the model selector (the list is dynamic: no SlicerParameterName).
        self._inputs = InputsPanel(self.ui, self.logic, self._currentParameterNode, self._showStatus)

        self.initializeParameterNode()

    def onReload(self) -> None:
        """Developer mode's Reload: the module's packages too (their deepest modules first), then
        the module file, so that an edit anywhere in them takes effect without a restart."""
        from NormativeAnomalySlicer.developer import reloadPackages

        reloadPackages(("NormativeAnomalyLib", "NormativeAnomalySlicer"))
        ScriptedLoadableModuleWidget.onReload(self)

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
            self._inputs.onParameterNodeModified()  # the model selector follows modelName
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

    def _showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text


class NormativeAnomalyLogic(ScriptedLoadableModuleLogic):
    """Runs NormativeAnomalyLib's command-line tool in a child PythonSlicer process and loads its results
    with the library's MRML layer. Usable without the widget (see the test)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._models: Optional[list[dict[str, Any]]] = None
        self.modelsError = ""  # why no model is listed (a missing or broken registry), for the panel

    def getParameterNode(self) -> NormativeAnomalyParameterNode:
        return NormativeAnomalyParameterNode(super().getParameterNode())

    def availableModels(self) -> list[dict[str, Any]]:
        """Registered models (card fields and ``default``), the default first."""
        from NormativeAnomalySlicer.model_cards import availableModels

        if self._models is None:
            models, self.modelsError = availableModels()
            if self.modelsError:
                return models  # not cached: the next look tries again (e.g. after a repair)
            self._models = models
        return self._models

    def modelCard(self, modelName: Optional[str]) -> Optional[dict[str, Any]]:
        return next((model for model in self.availableModels() if model["name"] == modelName), None)

    def defaultModelName(self) -> Optional[str]:
        models = self.availableModels()
        return models[0]["name"] if models else None

    def startRun(self, inputVolume: vtkMRMLScalarVolumeNode, modelName: str, options: Optional[RunOptions] = None,
                 brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None):
        """Start the analysis in the background; returns a RunHandle to poll, finish or cancel.

        ``options``: what the run is told beyond its input and model (NormativeAnomalyLib.options.RunOptions;
        the panel's come from options_from_panel). Its ``diffusion`` overrides (noise_level, steps, samples,
        noise) are passed on for diffusion models only: ignored, with a warning, for a registered model of
        another family (a model given by folder is left to the command-line tool to judge)."""
        from NormativeAnomalyLib.mrml import run_controller
        from NormativeAnomalyLib.models.registry import card_diffusion_settings, is_diffusion_model

        options = options or RunOptions()
        card = self.modelCard(modelName)
        if options.diffusion and card is not None and not is_diffusion_model(card):
            logging.warning(f"NormativeAnomaly: {modelName} is not a diffusion model: diffusion settings ignored")
            options = dataclasses.replace(options, diffusion=None)
        return run_controller.start_run(inputVolume, modelName, options, brainMask, slicer.app.temporaryPath,
                                        diffusion_card=card_diffusion_settings(card))

    def waitForRun(self, handle, timeoutSeconds: float = 3600.0):
        """Block (keeping the application responsive) until the run ends; returns its RunState."""
        from NormativeAnomalyLib.mrml import run_controller

        return run_controller.wait_for_run(handle, timeoutSeconds, slicer.app.processEvents)

    def cancelRun(self, handle):
        from NormativeAnomalyLib.mrml import run_controller

        return run_controller.cancel_run(handle)

    def finishRun(self, handle):
        """Load a finished run (all or nothing): returns (ResultNodes, LiveSegmentation)."""
        from NormativeAnomalyLib.mrml import run_controller

        return run_controller.finish_run(handle, slicer.mrmlScene, slicer.modules.colors.logic())


class NormativeAnomalyTest(ScriptedLoadableModuleTest, NormativeAnomalySelfTests):
    """The test_* methods are NormativeAnomalySlicer.self_test's."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def newLogic(self) -> NormativeAnomalyLogic:
        return NormativeAnomalyLogic()

    def runTest(self):
        from NormativeAnomalySlicer.self_test import torchMissingReason

        self.setUp()
        self.test_PrecomputedRun()  # needs neither PyTorch nor MONAI
        reason = torchMissingReason()
        if reason:
            self.delayDisplay(f"Skipped the tests that run a model: {reason}")
            return
        for test in (self.test_RunThresholdRejectExport, self.test_Panel, self.test_Cancel, self.test_Diffusion):
            self.setUp()
            test()
