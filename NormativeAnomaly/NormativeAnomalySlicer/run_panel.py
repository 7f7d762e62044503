"""The "Run" section and the dependency check of the panel: start, poll, cancel, install.

The run itself (temporary folder, child process, loading) is the module Logic's, through
``run_controller``; this class only drives the controls and polls with a QTimer.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import qt
import slicer

from NormativeAnomalyLib.models.registry import is_diffusion_model
from NormativeAnomalyLib.mrml import run_controller
from NormativeAnomalyLib.mrml.run_controller import RunFailedError, stage_text
from NormativeAnomalyLib.options import options_from_panel

from .dependencies import DependencyProbe, deviceText, installDependencies
from .requirements import missing_packages

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    _ = str

POLL_INTERVAL_MS = 250


class RunPanel:
    def __init__(self, ui: Any, logic: Any, parameterNode: Callable[[], Any], showStatus: Callable[[str], None],
                 onResultLoaded: Callable[[Any, Any], None]) -> None:
        self.ui = ui
        self.logic = logic
        self._parameterNode = parameterNode  # returns the widget's current parameter node wrapper, or None
        self._showStatus = showStatus
        self._onResultLoaded = onResultLoaded  # (ResultNodes, LiveSegmentation) of a finished run
        self.handle = None  # run_controller.RunHandle while a run is going: one at a time
        self._stopping: list[tuple[Any, str]] = []  # cancelled runs whose child is still stopping, and the status after
        self._runQueued = False  # Run was clicked before the dependency check answered
        self._probe = DependencyProbe()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        ui.applyButton.connect("clicked()", self.onApply)
        ui.cancelButton.connect("clicked()", self.onCancel)
        ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        ui.dependenciesFrame.visible = False  # shown when the check finds something missing
        ui.progressBar.value = 0

    @property
    def running(self) -> bool:
        return self.handle is not None

    def detectDevices(self) -> None:
        """Device detection needs torch, which only a child process may import: it runs in the
        background the first time the module is entered, then the answer is cached for the session."""
        self._probe.start(self._onProbeResult)
        if self._probe.running:
            self._onProbeResult(None)

    def cleanup(self) -> None:
        """The module is closed (the application is quitting): no timer will run after this, so the
        children are stopped here, waiting for them (seconds at most)."""
        handles = [handle for handle, _status in self._stopping] + ([self.handle] if self.handle else [])
        self.handle, self._stopping = None, []
        self._timer.stop()
        for handle in handles:
            self.logic.cancelRun(handle)
        self._probe.stop()

    def checkCanApply(self) -> None:
        parameters = self._parameterNode()
        canApply = bool(parameters and parameters.inputVolume and parameters.modelName and not self.running
                        and not self._runQueued)
        self.ui.applyButton.enabled = canApply
        self.ui.cancelButton.enabled = self.running or self._runQueued
        self.ui.applyButton.toolTip = (
            _("Compute the pseudo-healthy image, anomaly map and anomaly segmentation") if canApply
            else _("An analysis is running") if self.running else _("Select an input volume and a model"))
        for widget in (self.ui.inputVolumeSelector, self.ui.brainMaskSelector, self.ui.modelSelector,
                       self.ui.deviceSelector, self.ui.alreadyInTemplateSpaceCheckBox):
            widget.enabled = not self.running  # the run uses the values it started with
        # The diffusion settings only apply to diffusion models: hidden for the others.
        diffusion = bool(parameters) and self._isDiffusionModel(parameters.modelName)
        self.ui.diffusionGroupBox.visible = diffusion
        self.ui.diffusionGroupBox.enabled = diffusion and not self.running

    def _isDiffusionModel(self, modelName: str) -> bool:
        return is_diffusion_model(self.logic.modelCard(modelName))

    # Dependencies --------------------------------------------------------------------------------

    def _onProbeResult(self, result: Optional[dict]) -> None:
        self.ui.deviceInfoLabel.text = deviceText(result)
        if result is not None and "error" not in result:
            missing = missing_packages(result)
            self.ui.dependenciesFrame.visible = bool(missing)
            self.ui.dependenciesFrame.toolTip = _("Missing: {packages}").format(packages=", ".join(missing))

    def _onProbeResultForRun(self, result: dict) -> None:
        """The dependency check answered after Run was clicked: start the run now, if still wanted."""
        self._onProbeResult(result)
        if not self._runQueued:  # cancelled or the module was closed meanwhile
            return
        self._runQueued = False
        if "error" not in result and missing_packages(result):
            self._askToInstall()
        else:  # complete, or the check failed: the run itself will say what is missing
            self._startRun()

    def _askToInstall(self) -> None:
        self.ui.dependenciesFrame.visible = True
        self._showStatus(_("PyTorch and MONAI are needed first: click \"Install PyTorch and MONAI...\"."))
        self.checkCanApply()

    def onInstallDependencies(self) -> None:
        """Ask the child Python what it has (in the background), then offer to install what is missing."""
        self.ui.installDependenciesButton.enabled = False
        self._showStatus(_("Checking PyTorch and MONAI..."))
        self._probe.start(self._installMissing)

    def _installMissing(self, result: dict) -> None:
        self.ui.installDependenciesButton.enabled = True
        self._onProbeResult(result)
        missing = missing_packages(result)  # a failed check counts torch and monai as missing
        if not missing:
            self.ui.dependenciesFrame.visible = False
            self._showStatus(_("PyTorch and MONAI are already installed."))
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("These Python packages will be downloaded and installed into Slicer's Python environment "
                  "(an internet connection is needed; PyTorch with GPU support is several GB and may take "
                  "several minutes):\n\n{packages}\n\nContinue?").format(packages="\n".join(missing)),
                windowTitle=_("Install PyTorch and MONAI")):
            return
        self.ui.installDependenciesButton.enabled = False
        self._showStatus(_("Installing PyTorch and MONAI (see the Python console)..."))
        try:
            installDependencies(missing)
        except RuntimeError as error:  # one line, e.g. offline
            self._showStatus(str(error))
            slicer.util.errorDisplay(str(error), windowTitle=_("Install PyTorch and MONAI"))
            return
        finally:
            self.ui.installDependenciesButton.enabled = True
        self._showStatus(_("Installed; checking the installation..."))
        self._probe.start(self._onProbeResult)

    # Run -----------------------------------------------------------------------------------------

    def onApply(self) -> None:
        """Run: once the dependency check has answered (it runs in the background the first time)."""
        if self.running or self._runQueued or not self._parameterNode():
            return
        result = DependencyProbe.cached()
        if result is None:
            self._runQueued = True
            self._showStatus(_("Checking PyTorch and MONAI..."))
            self.checkCanApply()
            self._probe.start(self._onProbeResultForRun)
            return
        if missing_packages(result):
            self._askToInstall()
            return
        self._startRun()

    def _startRun(self) -> None:
        parameters = self._parameterNode()
        if self.running or not parameters:
            return
        try:
            options = options_from_panel(parameters, diffusion=self._isDiffusionModel(parameters.modelName))
            self.handle = self.logic.startRun(parameters.inputVolume, parameters.modelName, options,
                                              parameters.brainMask)
        except (OSError, RuntimeError, ValueError) as error:
            message = _("Could not start the analysis: {error}").format(error=error)
            self._showStatus(message)
            slicer.util.errorDisplay(message)
            self.checkCanApply()
            return
        self.ui.progressBar.value = 0
        self.checkCanApply()
        self._timer.start()
        self._poll()

    def _poll(self) -> None:
        self._pollStopping()
        handle = self.handle
        if handle is None:
            if not self._stopping:
                self._timer.stop()
            return
        state = handle.poll()
        self.ui.progressBar.value = int(round(100 * state.fraction))
        if state.running:
            self._showStatus(stage_text(state.stage))
            return
        if not self._stopping:
            self._timer.stop()
        self.handle = None
        self._showStatus(_("Loading the results..."))
        try:
            with slicer.util.WaitCursor():
                nodes, live = self.logic.finishRun(handle)  # all or nothing
        except RunFailedError as error:  # the child's one-line message
            self._failed(str(error), show=not error.cancelled)
            return
        except Exception as error:  # reading or loading the outputs: nothing was added
            logging.exception("NormativeAnomaly: could not load the results")
            self._failed(_("Could not load the results: {error}").format(error=error))
            return
        self._onResultLoaded(nodes, live)
        kept = [lesion for lesion in live.current.lesions if not lesion.rejected]
        self._showStatus(_("Done: {count} lesion(s), {volume:.2f} mL, at a {percent:.2g} % healthy false-positive "
                           "rate.").format(count=len(kept), volume=sum(lesion.volume_ml for lesion in kept),
                                           percent=100 * live.fpr))
        self.checkCanApply()

    def _failed(self, message: str, show: bool = True) -> None:
        self._showStatus(message)
        if show:
            slicer.util.errorDisplay(_("Anomaly detection failed: {error}").format(error=message))
        self.ui.progressBar.value = 0
        self.checkCanApply()

    def onCancel(self) -> None:
        self.cancel(_("Cancelled"))

    def cancel(self, status: str) -> None:
        """Stop a running analysis (Cancel, scene close); the scene is left as it was. The child is
        asked to stop and the timer finishes the job, so the GUI never waits for it."""
        queued, self._runQueued = self._runQueued, False
        handle, self.handle = self.handle, None
        if handle is None:
            if queued:  # Run was waiting for the dependency check: it will not start
                self._showStatus(status)
            self.checkCanApply()
            return
        run_controller.request_cancel(handle)
        self._stopping.append((handle, status))
        self.ui.progressBar.value = 0
        self._showStatus(_("Cancelling..."))
        self.checkCanApply()
        self._timer.start()

    def _pollStopping(self) -> None:
        for entry in list(self._stopping):
            handle, status = entry
            if run_controller.cancel_finished(handle):
                self._stopping.remove(entry)
                if self.handle is None:  # a new run's status is not overwritten
                    self._showStatus(status)
