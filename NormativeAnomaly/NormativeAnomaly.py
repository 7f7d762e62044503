import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Annotated, Any, Optional

import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4 has no translation support
    _ = str

# Torch and MONAI are never imported here (nor at import time of anything this file imports):
# inference runs in a separate PythonSlicer process. A later issue adds pip_ensure for them.

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
CLI_MODULE = "NormativeAnomalyLib.cli"


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


@parameterNodeWrapper
class NormativeAnomalyParameterNode:
    """inputVolume: volume to analyse; modelName: normative model (name from the CLI's model list);
    alreadyInTemplateSpace: skip registration; device: auto, cpu or cuda."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    alreadyInTemplateSpace: bool = False
    # Choice is required by the parameter node wrapper to bind a str to a QComboBox.
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"


class NormativeAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: Optional[NormativeAnomalyLogic] = None
        self._parameterNode: Optional[NormativeAnomalyParameterNode] = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NormativeAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = NormativeAnomalyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # The model list is dynamic, so modelSelector is synchronised by hand (no SlicerParameterName).
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self._populateModelSelector()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are connected here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._syncModelSelector()
            self._checkCanApply()

    def _populateModelSelector(self) -> None:
        """List the CLI's models, the default one first (it is selected when the parameter node has none)."""
        try:
            for model in sorted(self.logic.availableModels(), key=lambda m: not m.get("default")):
                label = f"{model['name']} ({model.get('family', '?')}, {model.get('modality', '?')})"
                self.ui.modelSelector.addItem(label, model["name"])
        except Exception as e:
            logging.error(f"Could not list normative models: {e}")
            self.ui.statusLabel.text = _("Could not list the models (see the Python console).")

    def _syncModelSelector(self) -> None:
        """Show the parameter node's model; use the default model if it is unset or unknown."""
        index = max(self.ui.modelSelector.findData(self._parameterNode.modelName), 0)
        if index < self.ui.modelSelector.count:
            self.ui.modelSelector.currentIndex = index
            self._parameterNode.modelName = self.ui.modelSelector.itemData(index)

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelName = self.ui.modelSelector.itemData(index)

    def _checkCanApply(self, caller=None, event=None) -> None:
        canApply = bool(self._parameterNode and self._parameterNode.inputVolume and self._parameterNode.modelName)
        self.ui.applyButton.enabled = canApply
        self.ui.applyButton.toolTip = (_("Compute the pseudo-healthy image, anomaly map and anomaly segmentation")
                                       if canApply else _("Select an input volume and a model"))

    def onApplyButton(self) -> None:
        parameters = self._parameterNode
        self.ui.applyButton.enabled = False
        self.ui.statusLabel.text = _("Detecting anomalies...")
        slicer.app.processEvents()
        succeeded = False
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection failed."), waitCursor=True):
            self.logic.process(parameters.inputVolume, parameters.modelName, parameters.device,
                               parameters.alreadyInTemplateSpace)
            succeeded = True
        self.ui.statusLabel.text = _("Done.") if succeeded else _("Failed (see the Python console for details).")
        self._checkCanApply()


class NormativeAnomalyLogic(ScriptedLoadableModuleLogic):
    """Runs NormativeAnomalyLib's command-line tool in a separate PythonSlicer process."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._models: Optional[list[dict[str, Any]]] = None

    def getParameterNode(self) -> NormativeAnomalyParameterNode:
        return NormativeAnomalyParameterNode(super().getParameterNode())

    def availableModels(self, refresh: bool = False) -> list[dict[str, Any]]:
        """Models known to the CLI: dicts with at least name, family, modality and default (bool)."""
        if self._models is None or refresh:
            self._models = _parseJson(self._runCli(["models", "--json"]), list)
        return self._models

    def defaultModelName(self) -> Optional[str]:
        models = self.availableModels()
        defaults = [model["name"] for model in models if model.get("default")]
        return defaults[0] if defaults else (models[0]["name"] if models else None)

    def process(self, inputVolume: vtkMRMLScalarVolumeNode, modelName: str, device: str = "auto",
                alreadyInTemplateSpace: bool = False,
                ) -> tuple[vtkMRMLScalarVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode]:
        """Return the pseudo-healthy volume, the anomaly map and the anomaly segmentation nodes."""
        if not inputVolume or not inputVolume.GetImageData() or not modelName:
            raise ValueError("An input volume with image data and a model name are required")
        workDir = tempfile.mkdtemp(prefix="NormativeAnomaly-", dir=slicer.app.temporaryPath)
        try:
            inputPath = os.path.join(workDir, "input.nii.gz")
            # A standalone storage node writes the file without redirecting the input node's own storage node
            # to this temporary file (which slicer.util.saveNode would do).
            storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storageNode.SetFileName(inputPath)
            if not storageNode.WriteData(inputVolume):
                raise RuntimeError(f"Could not write the input volume to {inputPath}")
            outDir = os.path.join(workDir, "out")
            args = ["run", inputPath, "--out", outDir, "--model", modelName, "--device", device, "--json"]
            if alreadyInTemplateSpace:
                args.append("--registered")
            # Blocking for now: a background process with progress and cancel comes in a later issue.
            self._runCli(args)  # its JSON summary goes to the application log

            baseName, suffix = inputVolume.GetName(), f"({modelName})"
            pseudoHealthy = slicer.util.loadVolume(os.path.join(outDir, "pseudo_healthy.nii.gz"))
            anomalyMap = slicer.util.loadVolume(os.path.join(outDir, "anomaly_map.nii.gz"))
            anomalies = slicer.util.loadSegmentation(os.path.join(outDir, "anomalies.seg.nrrd"))
            labels = {"pseudo-healthy": pseudoHealthy, "anomaly map": anomalyMap, "anomalies": anomalies}
            for label, node in labels.items():
                node.SetName(f"{baseName} {label} {suffix}")
                # The files are deleted below: detach them so that the nodes count as not saved yet.
                slicer.mrmlScene.RemoveNode(node.GetStorageNode())
                node.StorableModified()
        finally:
            shutil.rmtree(workDir, ignore_errors=True)

        colorNodeID = "vtkMRMLColorTableNodeFileInferno.txt"
        if not slicer.mrmlScene.GetNodeByID(colorNodeID):
            colorNodeID = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"
        anomalyMap.GetDisplayNode().SetAndObserveColorNodeID(colorNodeID)
        slicer.util.setSliceViewerLayers(background=inputVolume, foreground=anomalyMap, foregroundOpacity=0.5)
        return pseudoHealthy, anomalyMap, anomalies

    def _runCli(self, args: list[str]) -> str:
        """Run `python -m NormativeAnomalyLib.cli ARGS` with the module folder on PYTHONPATH; return its output."""
        pythonPath = os.pathsep.join(filter(None, [MODULE_DIR, slicer.util.startupEnvironment().get("PYTHONPATH")]))
        command = [shutil.which("PythonSlicer") or sys.executable, "-m", CLI_MODULE, *args]
        logging.info("Running: " + " ".join(command))
        proc = slicer.util.launchConsoleProcess(command, updateEnvironment={"PYTHONPATH": pythonPath})
        lines = []
        for line in proc.stdout:
            lines.append(line)
            logging.info(line.rstrip())
            slicer.app.processEvents()  # keep the GUI responsive while waiting
        proc.wait()
        output = "".join(lines)
        if proc.returncode != 0:
            raise RuntimeError(f"{CLI_MODULE} {args[0]} failed (exit code {proc.returncode}):\n{output[-3000:]}")
        return output


def _parseJson(output: str, expectedType: type) -> Any:
    """Return the first JSON value of expectedType that starts a line of the CLI output (log lines are mixed in)."""
    for match in re.finditer(r"^[ \t]*([\[{])", output, re.MULTILINE):
        try:
            value = json.JSONDecoder().raw_decode(output, match.start(1))[0]
        except json.JSONDecodeError:
            continue
        if isinstance(value, expectedType):
            return value
    raise RuntimeError(f"No JSON {expectedType.__name__} in the command-line tool output:\n{output[-3000:]}")


class NormativeAnomalyTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NormativeAnomaly1()

    def test_NormativeAnomaly1(self):
        """Run the default model on the bundled demo case and check the three outputs."""
        import numpy
        self.delayDisplay("Starting the test")
        # Bundled demo case: module Resources when installed, top-level Resources in the source tree.
        candidates = [os.path.normpath(os.path.join(MODULE_DIR, parent, "Resources", "SampleData", "demo_t1.nii.gz"))
                      for parent in (os.curdir, os.pardir)]
        demoPath = next((path for path in candidates if os.path.exists(path)), None)
        self.assertIsNotNone(demoPath, f"demo case not found: {candidates}")
        inputVolume = slicer.util.loadVolume(demoPath)
        logic = NormativeAnomalyLogic()
        modelName = logic.defaultModelName()
        self.assertTrue(modelName, "no model available")

        pseudoHealthy, anomalyMap, anomalies = logic.process(inputVolume, modelName)
        for node in (pseudoHealthy, anomalyMap, anomalies):
            self.assertTrue(node and slicer.mrmlScene.IsNodePresent(node))
        self.assertEqual(anomalyMap.GetImageData().GetDimensions(), inputVolume.GetImageData().GetDimensions())
        inputMatrix, anomalyMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputMatrix)
        anomalyMap.GetIJKToRASMatrix(anomalyMatrix)
        numpy.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(anomalyMatrix),
                                      slicer.util.arrayFromVTKMatrix(inputMatrix), atol=1e-4)
        self.delayDisplay("Test passed")
