"""The server-side scene and views: trame-slicer's SlicerApp, three slice views and a 3D view.

Rendering happens on the server (VTK offscreen: OSMesa without a GPU, EGL with one); trame-rca
streams each view to the browser as JPEG frames. The 3D view shows the segmentation as a
surface, which is rebuilt once the sliders pause: building it takes longer than a slider step.
"""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

from NormativeAnomalyLib.mrml.result_nodes import SEGMENT_ID

RENDER_WINDOWS = {"osmesa": "vtkOSOpenGLRenderWindow", "egl": "vtkEGLRenderWindow"}
LAYOUT = "NormativeAnomaly"  # axial and coronal on the left, sagittal and 3D on the right
TARGET_FPS = 60.0  # frames per second a view may send; also when the pointer is elsewhere
# trame-rca sends a frame at an "interactive" JPEG quality, then renders it again at its still
# quality (90) once nothing changed for 5 frame periods. Slider steps are not camera drags: one
# frame at the still quality halves the rendering work per step.
JPEG_QUALITY = 90


def choose_render_window(render: str = "auto") -> str | None:
    """Pick VTK's offscreen render window before VTK renders anything. ``auto``: VTK's own
    choice with a display (or when VTK_DEFAULT_OPENGL_WINDOW is set); on a headless machine
    EGL when an NVIDIA GPU and libEGL are there, otherwise OSMesa (CPU)."""
    if render not in ("auto", *RENDER_WINDOWS):
        raise ValueError(f"--render must be auto, osmesa or egl, not {render!r}")
    if render == "auto":
        if os.environ.get("VTK_DEFAULT_OPENGL_WINDOW") or os.environ.get("DISPLAY"):
            return os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")
        render = "egl" if os.path.exists("/dev/nvidia0") and ctypes.util.find_library("EGL") else "osmesa"
    os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = RENDER_WINDOWS[render]
    return RENDER_WINDOWS[render]


class SceneViews:
    """SlicerApp's scene with the colour logic the MRML layer needs, and the view layout."""

    def __init__(self, server, work_dir: Path) -> None:
        import slicer
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.app = SlicerApp()
        # SlicerApp's colour logic is MRML's; the anomaly map's colour legend needs Slicer's, which
        # looks for Slicer's colour files (slicer-core has none: the built-in PET-Heat table is used).
        (work_dir / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
        self.app.app_logic.SetHomeDirectory(str(work_dir))
        self.app.app_logic.SetShareDirectory("share")
        self.color_logic = slicer.vtkSlicerColorLogic()
        self.color_logic.SetMRMLApplicationLogic(self.app.app_logic)
        self.color_logic.SetMRMLScene(self.app.scene)
        register_rca_factories(self.app.view_manager, server, target_fps=TARGET_FPS, blur_fps=TARGET_FPS,
                               interactive_quality=JPEG_QUALITY)
        self.layout_manager = LayoutManager(self.app.scene, self.app.view_manager, server)
        self.layout_manager.register_layout(LAYOUT, _layout())
        self.layout_manager.set_layout(LAYOUT)

    @property
    def scene(self):
        return self.app.scene

    def show_input(self, volume) -> None:
        self.app.display_manager.show_volume_in_slice_background(volume)
        self.app.display_manager.reset_views()

    def before_segment_update(self, segmentation) -> None:
        """Drop the 3D surface before a slider step (it would be rebuilt at every step)."""
        if segmentation.GetSegmentation().ContainsRepresentation("Closed surface"):
            segmentation.RemoveClosedSurfaceRepresentation()

    def build_surface(self, segmentation) -> None:
        """The segmentation's 3D surface, once the sliders have paused (if it is not there yet)."""
        if self._empty(segmentation):  # nothing to build a surface from (VTK would report an error)
            return
        if not segmentation.GetSegmentation().ContainsRepresentation("Closed surface"):
            segmentation.CreateClosedSurfaceRepresentation()
            for view in self.app.view_manager.get_threed_views():
                view.schedule_render()

    @staticmethod
    def _empty(segmentation) -> bool:
        segment = segmentation.GetSegmentation().GetSegment(SEGMENT_ID)
        labelmap = segment.GetRepresentation("Binary labelmap") if segment is not None else None
        scalars = labelmap.GetPointData().GetScalars() if labelmap is not None else None
        return scalars is None or scalars.GetRange()[1] == 0

    def reset_3d(self) -> None:
        for view in self.app.view_manager.get_threed_views():
            view.reset_focal_point()
            view.schedule_render()


def _layout():
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    return Layout(LayoutDirection.Horizontal, [
        Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()]),
        Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()]),
    ])
