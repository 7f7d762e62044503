"""The "Results and thresholds", "Lesions" and "Edit and export" sections of the panel.

They only wire controls to NormativeAnomalyLib's MRML layer (LiveSegmentation, display, export):
no segmentation math here. The widget calls ``setResult`` when the parameter node's activeResult
changes and ``onSettingsChanged`` / ``showResult`` on any parameter change.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import qt
import slicer

from NormativeAnomalyLib.errors import NormativeAnomalyError
from NormativeAnomalyLib.mrml import LiveSegmentation, ResultNodes, SegmentationFrozenError
from NormativeAnomalyLib.mrml.live_segmentation import threshold_range
from NormativeAnomalyLib.mrml.display import OVERLAY_FLOOR_FPR, centre_on, show_result
from NormativeAnomalyLib.mrml.export import export_clashes, export_result
from NormativeAnomalyLib.mrml.lesion_table import read_lesion_table, summarize
from NormativeAnomalyLib.mrml.result_nodes import RESULT_ATTRIBUTE, SEGMENT_ID
from NormativeAnomalyLib.options import MIN_LESION_MM3_MAX

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    _ = str

# Like the Threshold effect's preview: a single-shot timer restarted on every slider change, so a
# drag re-segments once it pauses rather than at every step.
UPDATE_DELAY_MS = 150


class ResultsPanel:
    def __init__(self, ui: Any, parameterNode: Callable[[], Any], showStatus: Callable[[str], None]) -> None:
        self.ui = ui
        self._parameterNode = parameterNode  # returns the widget's current parameter node wrapper, or None
        self._showStatus = showStatus
        self.nodes: Optional[ResultNodes] = None
        self.live: Optional[LiveSegmentation] = None
        self.source = None  # the segmentation node setResult was last called with (even if it failed)
        self._adopted: Optional[tuple[ResultNodes, LiveSegmentation]] = None
        self._shownDisplay: Optional[tuple] = None
        self._thresholdTolerance = 0.0

        self._updateTimer = qt.QTimer()
        self._updateTimer.setSingleShot(True)
        self._updateTimer.setInterval(UPDATE_DELAY_MS)
        self._updateTimer.connect("timeout()", self._applySettings)

        # Only NormativeAnomaly results are listed (not every segmentation of the scene).
        ui.resultSelector.addAttribute("vtkMRMLSegmentationNode", RESULT_ATTRIBUTE, "1")
        ui.lesionTableView.connect("selectionChanged()", self.onLesionSelectionChanged)
        ui.rejectLesionButton.connect("clicked()", self.onRejectSelected)
        ui.restoreLesionButton.connect("clicked()", self.onRestoreSelected)
        ui.editInSegmentEditorButton.connect("clicked()", self.onEditInSegmentEditor)
        ui.exportButton.connect("clicked()", self.onExport)
        ui.resetToThresholdedButton.connect("clicked()", self.onResetToThresholded)  # shown while frozen
        self._anomalyLegend = _(
            "Overlay: anomaly score (colour bar in the views), transparent below the level exceeded by "
            "{percent:g}% of healthy voxels; yellow outline: the anomaly segment.").format(
            percent=100 * OVERLAY_FLOOR_FPR)
        self._uncertaintyLegend = _(
            "Overlay: uncertainty, the variance of the model's reconstructions (grey scale, brighter is less "
            "certain); yellow outline: the anomaly segment.")
        ui.legendLabel.text = self._anomalyLegend
        self._sliderToolTips = {slider.objectName: slider.toolTip for slider in self._settingSliders()}
        self._uncertaintyToolTip = ui.showUncertaintyCheckBox.toolTip
        self._updateControls()

    def _settingSliders(self) -> tuple:
        return (self.ui.thresholdSliderWidget, self.ui.minLesionSizeSliderWidget)

    def cleanup(self) -> None:
        self._updateTimer.stop()
        self.setResult(None)

    # Active result -------------------------------------------------------------------------------

    def adopt(self, nodes: ResultNodes, live: LiveSegmentation) -> None:
        """A result just loaded by a run: reuse its LiveSegmentation (already segmented) in setResult."""
        self._adopted = (nodes, live)

    def setResult(self, segmentation) -> None:
        """Show a result, load its saved threshold and minimum size into the parameter node."""
        self._updateTimer.stop()
        self.source, self.nodes, self.live, self._shownDisplay = segmentation, None, None, None
        self.ui.legendLabel.text = self._anomalyLegend  # until showResult shows another overlay
        adopted, self._adopted = self._adopted, None
        if segmentation is not None:
            try:
                if adopted is not None and adopted[0].segmentation is segmentation:
                    self.nodes, self.live = adopted
                else:
                    nodes = ResultNodes.from_segmentation(segmentation)
                    self.nodes, self.live = nodes, LiveSegmentation(nodes)
            except (ValueError, NormativeAnomalyError) as error:
                self._showStatus(_("Cannot use this result: {error}").format(error=error))
        self.ui.lesionTableView.setMRMLTableNode(self.nodes.lesion_table if self.nodes else None)
        parameters = self._parameterNode()
        if self.nodes is not None and parameters is not None:
            self._setThresholdRange(self.nodes)
            parameters.threshold = self.nodes.threshold
            parameters.minLesionMm3 = min(max(self.nodes.min_lesion_mm3, 0.0), MIN_LESION_MM3_MAX)
            if self.nodes.uncertainty_map is None:
                parameters.showUncertainty = False  # its check box is disabled: not left checked
            self.showResult()
        self._updateControls()

    def reapplyThresholdRange(self) -> None:
        """After the parameter node's GUI connection, which resets the slider to its declared range."""
        if self.nodes is not None:
            self._setThresholdRange(self.nodes)

    def _setThresholdRange(self, nodes: ResultNodes) -> None:
        """The slider's range and step: the MRML layer's ``threshold_range`` (the web app's too)."""
        sliderRange = threshold_range(nodes)
        slider = self.ui.thresholdSliderWidget
        slider.decimals = sliderRange.decimals
        slider.singleStep = sliderRange.step
        slider.pageStep = sliderRange.step * 10
        slider.setRange(0.0, sliderRange.maximum)
        # The slider rounds values to its decimals: a difference smaller than that is no change.
        self._thresholdTolerance = 0.5 * 10.0 ** -slider.decimals

    # Parameter changes ---------------------------------------------------------------------------

    def onSettingsChanged(self) -> None:
        """Threshold or minimum size may have changed: label now, segmentation after a pause."""
        parameters = self._parameterNode()
        if self.live is None or parameters is None:
            return
        self._setFprLabel(self.nodes.calibration.fpr_for_threshold(parameters.threshold))
        if (abs(parameters.threshold - self.nodes.threshold) > self._thresholdTolerance
                or abs(parameters.minLesionMm3 - self.nodes.min_lesion_mm3) > 0.5):
            self._updateTimer.start()  # restarts a pending update

    def _applySettings(self) -> None:
        parameters = self._parameterNode()
        if self.live is None or parameters is None:
            return
        try:
            self.live.update(threshold=parameters.threshold, min_lesion_mm3=parameters.minLesionMm3)
        except SegmentationFrozenError as error:  # edited by hand (maybe just now, outside the panel)
            self._showStatus(str(error))
            self._updateControls()
        except NormativeAnomalyError as error:
            self._showStatus(_("Cannot update the segmentation: {error}").format(error=error))
        self._setFprLabel(self.live.fpr)
        self._updateSummary()

    def flushPendingUpdate(self) -> None:
        """Apply a slider change still waiting for its timer (before editing or exporting)."""
        if self._updateTimer.isActive():
            self._updateTimer.stop()
            self._applySettings()

    def showResult(self) -> None:
        """Slice views: input, anomaly (or uncertainty) map or pseudo-healthy overlay (only when something
        changed, so the user's own layer choices are not reset at every threshold step)."""
        parameters = self._parameterNode()
        if self.nodes is None or parameters is None:
            return
        uncertainty = bool(parameters.showUncertainty) and self.nodes.uncertainty_map is not None
        display = (self.nodes.segmentation.GetID(), parameters.overlayOpacity, parameters.fade, uncertainty)
        if display != self._shownDisplay:
            self._shownDisplay = display
            show_result(self.nodes, parameters.overlayOpacity, parameters.fade, show_uncertainty=uncertainty)
            self.ui.legendLabel.text = self._uncertaintyLegend if uncertainty else self._anomalyLegend

    # Lesions -------------------------------------------------------------------------------------

    def _selectedLesionIds(self) -> list[int]:
        """IDs of the selected rows, read through the view's model (which may be sorted)."""
        view = self.ui.lesionTableView
        model = view.model()
        if model is None or view.selectionModel() is None:
            return []
        idColumn = next((column for column in range(model.columnCount())
                         if str(model.headerData(column, qt.Qt.Horizontal, qt.Qt.DisplayRole)) == "ID"), 0)
        ids = []
        for row in sorted({index.row() for index in view.selectionModel().selectedIndexes()}):
            try:
                ids.append(int(float(model.data(model.index(row, idColumn)))))
            except (TypeError, ValueError):
                continue
        return ids

    def onLesionSelectionChanged(self) -> None:
        ids = self._selectedLesionIds()
        if self.nodes is None or not ids:
            return
        row = next((row for row in read_lesion_table(self.nodes.lesion_table) if row["ID"] == ids[0]), None)
        if row is not None:
            centre_on(self.nodes.input_volume, (row["R"], row["A"], row["S"]))

    def onRejectSelected(self) -> None:
        self._setRejected(True)

    def onRestoreSelected(self) -> None:
        self._setRejected(False)

    def _setRejected(self, rejected: bool) -> None:
        ids = self._selectedLesionIds()
        if self.live is None or not ids:
            self._showStatus(_("Select lesions in the table first."))
            return
        self.flushPendingUpdate()  # the IDs are those of the table as shown
        try:
            for lesionId in ids:
                self.live.set_rejected(lesionId, rejected)
        except NormativeAnomalyError as error:  # SegmentationFrozenError included
            self._showStatus(str(error))
        self._updateSummary()

    def _updateSummary(self) -> None:
        if self.nodes is None:
            self.ui.lesionSummaryLabel.text = ""
            return
        summary = summarize(read_lesion_table(self.nodes.lesion_table))
        text = _("{kept} lesion(s) kept ({volume:.2f} mL), {rejected} rejected").format(
            kept=summary.kept, volume=summary.kept_ml, rejected=summary.rejected)
        if self.nodes.frozen:
            text += " " + _("(edited by hand since: the table shows the thresholded lesions)")
        self.ui.lesionSummaryLabel.text = text

    def _setFprLabel(self, fpr: float) -> None:
        self.ui.fprLabel.text = _("Healthy false-positive rate: {percent:.2g} %").format(percent=100 * fpr)

    # Editing and export --------------------------------------------------------------------------

    def onEditInSegmentEditor(self) -> None:
        if self.nodes is None:
            return
        if not self.nodes.frozen:
            name = self.nodes.segmentation.GetName()
            if not slicer.util.confirmOkCancelDisplay(
                    _("After editing \"{name}\" by hand, the threshold and minimum size sliders no longer change "
                      "it (so that they cannot overwrite your edits). \"Reset to thresholded map\" discards the "
                      "edits and brings the sliders back.\n\nOpen it in the Segment Editor?").format(name=name),
                    windowTitle=_("Edit in Segment Editor")):
                return
            self.flushPendingUpdate()
            self.live.freeze()
            self._updateControls()
            self._updateSummary()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.util.getModuleWidget("SegmentEditor").editor  # qMRMLSegmentEditorWidget
        editor.setSegmentationNode(self.nodes.segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(self.nodes.input_volume)
        else:  # Slicer < 5.2
            editor.setMasterVolumeNode(self.nodes.input_volume)
        editor.setCurrentSegmentID(SEGMENT_ID)

    def onResetToThresholded(self) -> None:
        if self.live is None or not self.nodes.frozen:
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Discard the manual edits of \"{name}\" and segment the anomaly map again?").format(
                    name=self.nodes.segmentation.GetName()), windowTitle=_("Reset to thresholded map")):
            return
        try:
            self.live.reset()
        except NormativeAnomalyError as error:
            self._showStatus(str(error))
        self._updateControls()
        self._setFprLabel(self.live.fpr)
        self._updateSummary()

    def onExport(self) -> None:
        if self.nodes is None:
            return
        folder = self.ui.exportDirectoryButton.directory
        if not folder:
            self._showStatus(_("Choose an output folder first."))
            return
        self.flushPendingUpdate()
        clashes = export_clashes(folder)
        if clashes and not slicer.util.confirmOkCancelDisplay(
                _("{folder} already holds {files}.\n\nReplace them?").format(folder=folder, files=", ".join(clashes)),
                windowTitle=_("Export")):
            return
        try:
            paths = export_result(self.nodes, folder, overwrite=bool(clashes))
        except NormativeAnomalyError as error:  # OutputError: one line
            self._showStatus(_("Export failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("Export failed: {error}").format(error=error))
            return
        self._showStatus(_("Exported to {folder}: {files}").format(
            folder=folder, files=", ".join(path.name for path in paths)))

    # Enabled states ------------------------------------------------------------------------------

    def _updateControls(self) -> None:
        hasResult = self.nodes is not None
        frozen = hasResult and self.nodes.frozen
        for slider in self._settingSliders():
            slider.enabled = hasResult and not frozen
            slider.toolTip = (_("\"{name}\" was edited by hand in the Segment Editor: the sliders no longer change "
                                "it. Use \"Reset to thresholded map\" (this discards the edits) to use them again.")
                              .format(name=self.nodes.segmentation.GetName()) if frozen
                              else self._sliderToolTips[slider.objectName])
        for widget in (self.ui.overlayOpacitySliderWidget, self.ui.fadeSliderWidget, self.ui.exportButton,
                       self.ui.editInSegmentEditorButton):
            widget.enabled = hasResult
        for button in (self.ui.rejectLesionButton, self.ui.restoreLesionButton):
            button.enabled = hasResult and not frozen
        hasUncertainty = hasResult and self.nodes.uncertainty_map is not None
        self.ui.showUncertaintyCheckBox.enabled = hasUncertainty
        self.ui.showUncertaintyCheckBox.toolTip = (
            self._uncertaintyToolTip if hasUncertainty or not hasResult
            else _("This result has no uncertainty map: run a diffusion model with more than 1 sample to get one."))
        self.ui.resetToThresholdedButton.visible = frozen
        if hasResult:
            self._setFprLabel(self.nodes.calibration.fpr_for_threshold(self.nodes.threshold))
        else:
            self.ui.fprLabel.text = _("Healthy false-positive rate: -")
        self._updateSummary()
