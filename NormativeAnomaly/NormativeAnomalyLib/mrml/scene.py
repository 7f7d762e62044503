"""A standalone MRML scene with the module logics 3D Slicer would have created.

Inside Slicer the application provides all of this; tests, benchmarks and the web app
build it here. The logics must stay referenced for as long as the scene is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import slicer

SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


@dataclass
class StandaloneScene:
    scene: Any  # vtkMRMLScene
    application_logic: Any
    color_logic: Any
    logics: list[Any] = field(default_factory=list)  # kept alive with the scene
    slice_logics: dict[str, Any] = field(default_factory=dict)

    def slice_node(self, name: str):
        return self.slice_logics[name].GetSliceNode()

    def close(self) -> None:
        """Detach the logics before the scene goes: VTK crashes when a slice logic outlives the
        volumes its layers show (Python may free the fields in any order)."""
        for slice_logic in self.slice_logics.values():
            slice_logic.SetMRMLScene(None)
        self.slice_logics.clear()
        self.scene.Clear(True)

    def __del__(self) -> None:
        if self.slice_logics:
            self.close()


def create_scene(slice_views: bool = True) -> StandaloneScene:
    """A scene with colour tables, subject hierarchy, segmentation converters and (optionally)
    the three slice views of Slicer's default layout."""
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkMRMLApplicationLogic()
    application_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLScene(scene)
    logics = []
    for logic_class in (slicer.vtkSlicerSubjectHierarchyModuleLogic, slicer.vtkSlicerSegmentationsModuleLogic,
                        slicer.vtkSlicerTablesLogic):
        logic = logic_class()
        logic.SetMRMLScene(scene)
        logics.append(logic)
    standalone = StandaloneScene(scene, application_logic, color_logic, logics)
    if slice_views:
        for name, orientation in SLICE_VIEWS.items():
            slice_logic = slicer.vtkMRMLSliceLogic()
            slice_logic.SetMRMLApplicationLogic(application_logic)
            slice_logic.SetMRMLScene(scene)
            slice_logic.AddSliceNode(name).SetOrientation(orientation)
            standalone.slice_logics[name] = slice_logic
    return standalone
