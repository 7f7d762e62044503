"""The trame application: browser state <-> AnalysisSession, and the run's progress.

Handlers only translate between trame state and the session (which holds the logic) and
push the results back into the state; the page itself is built in ``ui``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from trame.app import TrameApp
from trame.decorators import change, trigger

from NormativeAnomalyLib.errors import NormativeAnomalyError, one_line
from NormativeAnomalyLib.models.registry import preselected_model
from NormativeAnomalyLib.mrml.lesion_table import summarize
from NormativeAnomalyLib.mrml.run_controller import RunFailedError, stage_text

from . import ui
from .files import FileAccess
from .session import AnalysisSession, Display
from .views import SceneViews

log = logging.getLogger("normative-anomaly.web")
POLL_S = 0.25
TABLE_DELAY_S = 0.1
SURFACE_DELAY_S = 0.8  # the 3D surface is rebuilt once the sliders have been still this long
DOWNLOADS = {what: filename for what, _, filename, _ in ui.DOWNLOADS}


class NormativeAnomalyApp(TrameApp):
    def __init__(self, files: FileAccess, server=None, device: str = "auto", initial_volume: str | None = None,
                 python: str | None = None) -> None:
        super().__init__(server)
        from trame_slicer import module as trame_slicer_module

        self.server.enable_module(trame_slicer_module)
        self.files = files
        self.views = SceneViews(self.server, files.work_dir)
        self.session = AnalysisSession(self.views.scene, files, self.views.color_logic, device, python)
        self._pending: dict[str, Any] = {}
        self._worker: asyncio.Task | None = None
        self._surface_timer: asyncio.TimerHandle | None = None
        models = [m for m in self.session.models() if "error" not in m]
        self.state.update(ui.initial_state(models, files))
        self._models = {m["name"]: m for m in models}
        self.state.model = models[0]["name"] if models else None
        self._list_volumes()
        ui.build(self.server, self.views.layout_manager, files.max_upload_bytes)
        if initial_volume:
            self._load(initial_volume)

    # Input --------------------------------------------------------------------------------------

    def _list_volumes(self) -> None:
        self._volumes = {choice.label: choice.path for choice in self.files.volumes()}
        self.state.volumes = list(self._volumes)

    @trigger("load_volume")
    def load_volume(self) -> None:
        choice = (self.state.volume or "").strip()
        if not choice:
            self._error("choose a volume from the list, or type its path on the server")
            return
        self._load(self._volumes.get(choice, choice))  # a typed path is checked by FileAccess.resolve

    def _load(self, path) -> None:
        try:
            volume = self.session.load(path)
        except NormativeAnomalyError as error:
            self._error(one_line(error))
            return
        self._pending.clear()
        if self._surface_timer is not None:  # it would build the surface of a removed result
            self._surface_timer.cancel()
        self.views.show_input(volume)
        label = next((label for label, p in self._volumes.items() if p == Path(path).resolve()), Path(path).name)
        model, why = preselected_model(volume.GetName(), list(self._models.values()))
        if model is not None:
            self.state.model = model
        self.state.update({"volume": label, "input_name": volume.GetName(), "error": "",
                           "status": f"Loaded {volume.GetName()}; model {model}: {why}"})
        self._push_results()

    @change("upload")
    def on_upload(self, upload, **_) -> None:
        if not upload:
            return
        upload = upload[0] if isinstance(upload, list) else upload
        self.state.upload = None
        try:
            path = self.files.save_upload(upload.get("name", ""), bytes(upload.get("content") or b""))
        except (NormativeAnomalyError, OSError) as error:
            self._error(one_line(error))
            return
        self._list_volumes()
        self._load(path)

    # Model and run ------------------------------------------------------------------------------

    @change("model")
    def on_model(self, model, **_) -> None:
        self.state.model_card = ui.card_lines(self._models.get(model))

    @trigger("run")
    def run(self) -> None:
        try:
            self.session.start(self.state.model)
        except (NormativeAnomalyError, ValueError, OSError) as error:
            self._error(one_line(error))
            return
        self.state.update({"running": True, "progress": 0, "error": "", "status": stage_text("starting")})
        asyncio.ensure_future(self._follow_run())

    @trigger("cancel")
    def cancel(self) -> None:
        self.state.status = "Cancelling..."
        asyncio.ensure_future(self._cancel())

    async def _cancel(self) -> None:
        # Stopping the child can take seconds (it stops at its next check point): off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.session.cancel)
        with self.state:
            self.state.update({"running": False, "status": "Cancelled", "progress": 0})

    async def _follow_run(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            state = self.session.poll()
            if state is None:  # cancelled
                return
            if state.running:
                with self.state:
                    self.state.progress = round(100 * state.fraction)
                    self.state.status = stage_text(state.stage)
                continue
            break
        with self.state:
            self.state.running = False
            try:
                result = self.session.finish()
            except RunFailedError as error:
                self.state.status = ""
                self._error(str(error))  # the run's one-line message, or "Cancelled"
                return
            except NormativeAnomalyError as error:
                self._error(one_line(error))
                return
            self.state.status = f"{result.label}: done"
            self.views.build_surface(result.nodes.segmentation)
            self.views.reset_3d()
            self._push_results()

    # Results and sliders ------------------------------------------------------------------------

    @change("result")
    def on_result(self, result, **_) -> None:
        if result is None or self.session.active is self.session.results[int(result)]:
            return
        self._pending.clear()  # steps meant for the result shown before
        self.session.select(int(result))
        self.views.build_surface(self.session.active.nodes.segmentation)
        self._push_results()

    @change("threshold")
    def on_threshold(self, threshold, **_) -> None:
        if self.session.active is not None and threshold != self._requested("threshold"):
            self._request(threshold=float(threshold))

    @change("min_size")
    def on_min_size(self, min_size, **_) -> None:
        if self.session.active is not None and min_size != self._requested("min_lesion_mm3"):
            self._request(min_lesion_mm3=float(min_size))

    @trigger("set_fpr")
    def set_fpr(self, percent) -> None:
        """The threshold that flags this percentage of healthy voxels (the model's calibration)."""
        if self.session.active is None:
            return
        try:
            fraction = float(str(percent).strip().rstrip("%")) / 100
        except ValueError:
            fraction = -1.0
        if not 0 < fraction < 1:
            self._error(f"the healthy false-positive rate must be a percentage between 0 and 100, not {percent!r}")
            return
        self._request(threshold=self.session.threshold_for_fpr(fraction))

    def _requested(self, setting: str) -> float:
        """The value the segmentation will show once the pending steps are applied: a move back to
        the applied value while another one is pending must still be requested."""
        return self._pending.get(setting, getattr(self.session.active.nodes, setting))

    def _request(self, **settings) -> None:
        """Slider steps arrive faster than the segmentation follows: apply the latest only."""
        self._pending.update(settings)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._apply_pending())

    async def _apply_pending(self) -> None:
        """Apply the latest settings until none is pending. Steps arrive only while this awaits,
        so the loop looks for new ones after every await: a step that arrives during the last
        pause is applied by this worker, never left for one that is not started."""
        while self._pending and self.session.active is not None:
            settings, self._pending = self._pending, {}
            segmentation = self.session.active.nodes.segmentation
            modifying = segmentation.StartModify()  # the views redraw once, for both changes
            try:
                self.views.before_segment_update(segmentation)
                self.session.update(**settings)
            except NormativeAnomalyError as error:
                self._error(one_line(error))
            finally:
                segmentation.EndModify(modifying)
            with self.state:
                self._push_settings(table=False)
            await asyncio.sleep(0)  # let the views render and the state go out before the next step
            if not self._pending:
                # The table after the new frames: redrawing a long table in the browser would delay them.
                await asyncio.sleep(TABLE_DELAY_S)
        if self.session.active is None:  # another volume was loaded meanwhile
            return
        with self.state:
            self._push_table()
        if self._surface_timer is not None:
            self._surface_timer.cancel()
        segmentation = self.session.active.nodes.segmentation
        self._surface_timer = asyncio.get_running_loop().call_later(
            SURFACE_DELAY_S, self.views.build_surface, segmentation)

    @change("overlay_opacity", "fade", "show_uncertainty")
    def on_display(self, overlay_opacity, fade, show_uncertainty, **_) -> None:
        self.session.show(Display(float(overlay_opacity), float(fade), bool(show_uncertainty)))

    @trigger("centre_lesion")
    def centre_lesion(self, lesion_id) -> None:
        try:
            self.session.centre_on_lesion(int(lesion_id))
            self.state.selected_lesion = int(lesion_id)
        except NormativeAnomalyError as error:
            self._error(one_line(error))

    @trigger("reject_lesion")
    def reject_lesion(self, lesion_id, rejected) -> None:
        if self.session.active is None:
            return
        try:
            self.views.before_segment_update(self.session.active.nodes.segmentation)
            self.session.set_rejected(int(lesion_id), bool(rejected))
            self.views.build_surface(self.session.active.nodes.segmentation)
        except NormativeAnomalyError as error:
            self._error(one_line(error))
        self._push_settings()

    @trigger("download")
    def download(self, what: str) -> bytes:
        """A file of the active result (what the Slicer panel's Export writes), as bytes."""
        name = DOWNLOADS.get(what)
        if name is None or self.session.active is None:
            return b""
        content = self.session.download(name)
        self.state.status = f"Downloaded {name}" if content else f"{name}: not available for this result"
        self.state.flush()
        return content

    # State ------------------------------------------------------------------------------------

    def _push_results(self) -> None:
        results = self.session.results
        self.state.results = [{"title": r.label, "value": i} for i, r in enumerate(results)]
        active = self.session.active
        self.state.result = results.index(active) if active is not None else None
        self.state.has_result = active is not None
        if active is not None:
            limits = self.session.threshold_range()
            self.state.update({"threshold_max": limits.maximum, "threshold_step": limits.step,
                               "has_uncertainty": active.nodes.uncertainty_map is not None})
        self._push_settings()

    def _push_settings(self, table: bool = True) -> None:
        active = self.session.active
        if active is None:
            self.state.update({"lesions": [], "summary": "", "segment_voxels": 0, "fpr_percent": None})
            return
        self.state.update({
            "threshold": active.nodes.threshold,
            "min_size": active.nodes.min_lesion_mm3,
            "fpr_percent": 100 * self.session.fpr(),
            "segment_voxels": self.session.segment_voxels(),
        })
        if table:
            self._push_table()

    def _push_table(self) -> None:
        rows = self.session.lesions()
        summary = summarize(rows)
        self.state.lesions = ui.lesion_rows(rows)
        self.state.summary = f"{summary.kept} lesion(s) kept ({summary.kept_ml:.2f} mL), {summary.rejected} rejected"

    def _error(self, message: str) -> None:
        log.warning(message)
        self.state.error = message
