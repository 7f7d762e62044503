"""The MRML layer: analysis results as MRML nodes, and live threshold updates.

Needs MRML only (3D Slicer, or the ``slicer-core`` package: no Qt, no application), so the
Slicer module and the web app share it and pytest runs it on a real ``vtkMRMLScene``.
Every function takes the scene or nodes it works on; nothing here reads ``slicer.mrmlScene``.

- ``volumes``: SimpleITK image <-> volume node, with the input's exact geometry.
- ``result_nodes``: the nodes of one result (input, pseudo-healthy, anomaly map, anomalies
  segmentation, lesion table), their links and saved settings; added all-or-nothing.
- ``live_segmentation``: threshold / minimum size / rejected lesions -> segment and table.
- ``lesion_table``, ``display``, ``export``: the table node, slice-view layers and colours,
  files for hand-over.
- ``run_controller``: one analysis as a CLI child process (temporary folder, progress, Cancel),
  loaded into a scene all-or-nothing.
- ``scene``: a scene with the logics Slicer would provide (tests, benchmark, web app).
"""

from .live_segmentation import LiveSegmentation, SegmentationEditedError, SegmentationFrozenError
from .result_nodes import ResultNodes, add_result_nodes, find_results
from .run_controller import load_run

__all__ = ["LiveSegmentation", "SegmentationEditedError", "SegmentationFrozenError", "ResultNodes", "add_result_nodes", "find_results",
           "load_run"]
