"""The model selector of the "Inputs" section, its model card and the diffusion settings it loads.

The model list is dynamic, so modelSelector is synchronised with the parameter node's modelName by
hand (it has no SlicerParameterName); the other inputs are bound in the .ui. The widget calls
``onParameterNodeModified`` on any parameter change.
"""

from __future__ import annotations

from typing import Any, Callable

import slicer

from NormativeAnomalyLib.models.registry import card_diffusion_settings, preselected_model
from NormativeAnomalyLib.options import DIFFUSION_ARGUMENTS, DIFFUSION_NOISE_KINDS, DIFFUSION_RANGES

from .model_cards import cardHtml

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    _ = str


class InputsPanel:
    def __init__(self, ui: Any, logic: Any, parameterNode: Callable[[], Any],
                 showStatus: Callable[[str], None]) -> None:
        self.ui = ui
        self.logic = logic
        self._parameterNode = parameterNode  # returns the widget's current parameter node wrapper, or None
        self._showStatus = showStatus
        ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self._populateModelSelector()
        self._input = None  # the input volume the model was last chosen for
        self._parameters = None  # the parameter node that input belongs to

    def onParameterNodeModified(self) -> None:
        """Show the parameter node's model when it is not the one shown; preselect the model of a
        newly chosen input volume's contrast."""
        parameters = self._parameterNode()
        if not parameters:
            return
        if parameters is not self._parameters:  # another scene, or its saved choices: kept as they are
            self._parameters, self._input = parameters, parameters.inputVolume
        elif parameters.inputVolume is not self._input:
            self._input = parameters.inputVolume
            if self._input is not None:
                self._preselectModel(self._input.GetName())
        if self.ui.modelSelector.currentData != parameters.modelName:
            self._syncModelSelector()

    def _preselectModel(self, volumeName: str) -> None:
        model, why = preselected_model(volumeName, self.logic.availableModels())
        if model is not None and model != self._parameterNode().modelName:
            self._setModel(model)
            self._showStatus(_("Model {model} chosen for {volume}: {why}").format(model=model, volume=volumeName,
                                                                                 why=why))

    def _populateModelSelector(self) -> None:
        """The registered models, the default one first (it is selected when the parameter node has none)."""
        for model in self.logic.availableModels():
            label = f"{model['name']} ({model.get('family') or '?'}, {model.get('modality') or '?'})"
            self.ui.modelSelector.addItem(label, model["name"])
        if self.logic.modelsError:
            self._showStatus(_("Could not list the models: {error}").format(error=self.logic.modelsError))

    def _syncModelSelector(self) -> None:
        """Show the parameter node's model; use the default model if it is unset or unknown."""
        index = max(self.ui.modelSelector.findData(self._parameterNode().modelName), 0)
        if index < self.ui.modelSelector.count:
            self.ui.modelSelector.currentIndex = index
            self._setModel(self.ui.modelSelector.itemData(index))
        self._showModelCard()

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode() and index >= 0:
            self._setModel(self.ui.modelSelector.itemData(index))
        self._showModelCard()

    def _setModel(self, modelName: str) -> None:
        """Store the model in the parameter node. When it changes to a diffusion model, its card's
        settings become the diffusion settings shown (the user may then change them); when it is
        the same model (the selector following the parameter node), the stored settings are kept."""
        parameters = self._parameterNode()
        if parameters.modelName == modelName:
            return
        settings = card_diffusion_settings(self.logic.modelCard(modelName))
        with slicer.util.NodeModify(parameters):  # one Modified event for the whole change
            parameters.modelName = modelName
            if settings is not None:
                self._loadDiffusionSettings(parameters, settings)

    def _loadDiffusionSettings(self, parameters: Any, settings: dict[str, Any]) -> None:
        """A card's settings into the parameter node (the fields DIFFUSION_ARGUMENTS names), within the
        ranges the spin boxes offer."""
        for key, (lowest, highest) in DIFFUSION_RANGES.items():
            try:
                value = int(settings[key])
            except (KeyError, TypeError, ValueError):
                continue
            setattr(parameters, DIFFUSION_ARGUMENTS[key]["panel"], min(max(value, lowest), highest))
        if settings.get("noise") in DIFFUSION_NOISE_KINDS:
            setattr(parameters, DIFFUSION_ARGUMENTS["noise"]["panel"], settings["noise"])

    def _showModelCard(self) -> None:
        self.ui.modelCardLabel.text = cardHtml(self.logic.modelCard(self.ui.modelSelector.currentData))
