"""The nodes of one result, how they are linked, and the settings saved with the scene.

A result is an "anomalies" segmentation node that references the input volume, the
anomaly map, the pseudo-healthy reconstruction and the lesion table; the model card
summary, calibration, threshold, minimum size and rejected lesions are attributes of the
segmentation node. Node references and attributes are saved in the .mrml, so a reopened
scene gives back every result with its settings. Several results (models) may share an input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import slicer

from ..progress import Monitor
from ..run_folder import RunOutputs
from ..scoring import Calibration
from .volumes import add_volume_node

RESULT_ATTRIBUTE = "NormativeAnomaly.Result"
SEGMENT_ID = "Anomaly"
SEGMENT_COLOR = (1.0, 0.85, 0.1)
ROLES = {"input": "NormativeAnomaly.input", "anomaly_map": "NormativeAnomaly.anomalyMap",
         "pseudo_healthy": "NormativeAnomaly.pseudoHealthy", "lesion_table": "NormativeAnomaly.lesionTable"}
UNCERTAINTY_ROLE = "NormativeAnomaly.uncertaintyMap"  # only for models that give one


@dataclass
class ResultNodes:
    segmentation: Any  # vtkMRMLSegmentationNode: the result's root, holds the settings
    input_volume: Any
    anomaly_map: Any
    pseudo_healthy: Any
    lesion_table: Any
    uncertainty_map: Any = None  # variance over stochastic reconstructions (diffusion models), or None

    @classmethod
    def from_segmentation(cls, segmentation) -> "ResultNodes":
        if segmentation is None or segmentation.GetAttribute(RESULT_ATTRIBUTE) != "1":
            raise ValueError("not a NormativeAnomaly result segmentation")
        nodes = {key: segmentation.GetNodeReference(role) for key, role in ROLES.items()}
        missing = [key for key, node in nodes.items() if node is None]
        if missing:
            raise ValueError(f"result {segmentation.GetName()!r} lost its {', '.join(missing)} node(s)")
        return cls(segmentation, nodes["input"], nodes["anomaly_map"], nodes["pseudo_healthy"], nodes["lesion_table"],
                   segmentation.GetNodeReference(UNCERTAINTY_ROLE))

    # Settings, stored as attributes of the segmentation node.
    def _get(self, key: str) -> Any:
        value = self.segmentation.GetAttribute(f"NormativeAnomaly.{key}")
        return None if value is None else json.loads(value)

    def _set(self, key: str, value: Any) -> None:
        self.segmentation.SetAttribute(f"NormativeAnomaly.{key}", json.dumps(value))

    @property
    def model(self) -> dict[str, Any]:
        return self._get("model")

    @property
    def calibration(self) -> Calibration:
        table = self._get("calibration")
        return Calibration(tuple(table["fpr"]), tuple(table["threshold"]))

    threshold = property(lambda self: self._get("threshold"), lambda self, v: self._set("threshold", float(v)))
    min_lesion_mm3 = property(lambda self: self._get("minLesionMm3"),
                              lambda self, v: self._set("minLesionMm3", float(v)))
    rejected_peaks = property(lambda self: [tuple(p) for p in self._get("rejectedPeaks") or []],
                              lambda self, v: self._set("rejectedPeaks", [list(map(int, p)) for p in v]))
    frozen = property(lambda self: bool(self._get("frozen")), lambda self, v: self._set("frozen", bool(v)))

    def nodes(self) -> list[Any]:
        """The nodes this result created (not the input)."""
        created = [self.segmentation, self.anomaly_map, self.pseudo_healthy, self.lesion_table]
        return created + ([self.uncertainty_map] if self.uncertainty_map is not None else [])

    def remove(self) -> None:
        scene = self.segmentation.GetScene()
        for node in self.nodes():
            if node is not None and node.GetScene() is scene:
                remove_node(scene, node)


def remove_node(scene, node) -> None:
    """Remove a node and the display/storage nodes it owns; its subject-hierarchy item goes with it."""
    owned = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        owned += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetNumberOfStorageNodes"):
        owned += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = shNode.GetItemByDataNode(node) if shNode else 0
    if item:
        shNode.RemoveItem(item, False, False)  # the item only (not its children); the node goes next
    if node.GetScene() is scene:
        scene.RemoveNode(node)
    for other in owned:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


def result_name(input_volume, model_name: str, what: str) -> str:
    return f"{input_volume.GetName()} {what} ({model_name})"


def add_result_nodes(scene, input_volume, outputs: RunOutputs, monitor: Monitor | None = None) -> ResultNodes:
    """Add one result's nodes next to ``input_volume``: all of them, or none (on error or Cancel)."""
    monitor = monitor or Monitor()
    model_name = outputs.model.get("name", "model")
    created: list[Any] = []

    def keep(node):
        created.append(node)
        monitor.check()
        return node

    try:
        monitor.check()
        pseudo_healthy = keep(add_volume_node(scene, outputs.pseudo_healthy,
                                              result_name(input_volume, model_name, "pseudo-healthy"), input_volume))
        anomaly_map = keep(add_volume_node(scene, outputs.anomaly_map,
                                           result_name(input_volume, model_name, "anomaly map"), input_volume))
        uncertainty = None
        if outputs.uncertainty is not None:
            uncertainty = keep(add_volume_node(scene, outputs.uncertainty,
                                               result_name(input_volume, model_name, "uncertainty"), input_volume))
        table = keep(scene.AddNewNodeByClass("vtkMRMLTableNode", result_name(input_volume, model_name, "lesions")))
        segmentation = keep(scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                    result_name(input_volume, model_name, "anomalies")))
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
        segmentation.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
        segmentation.GetSegmentation().AddEmptySegment(SEGMENT_ID, "Anomaly", SEGMENT_COLOR)
        if segmentation.GetSegmentation().GetSegment(SEGMENT_ID) is None:
            raise RuntimeError("the segmentation cannot hold a binary labelmap (segmentation converters missing)")
        for key, node in (("input", input_volume), ("anomaly_map", anomaly_map), ("pseudo_healthy", pseudo_healthy),
                          ("lesion_table", table)):
            segmentation.SetNodeReferenceID(ROLES[key], node.GetID())
        if uncertainty is not None:
            segmentation.SetNodeReferenceID(UNCERTAINTY_ROLE, uncertainty.GetID())
        segmentation.SetAttribute(RESULT_ATTRIBUTE, "1")
        nodes = ResultNodes(segmentation, input_volume, anomaly_map, pseudo_healthy, table, uncertainty)
        nodes._set("model", outputs.model)
        nodes._set("calibration", {"fpr": list(outputs.calibration.fpr),
                                   "threshold": list(outputs.calibration.threshold)})
        nodes.threshold, nodes.min_lesion_mm3, nodes.rejected_peaks, nodes.frozen = \
            outputs.threshold, outputs.min_lesion_mm3, [], False
        _place_beside(scene, input_volume, nodes.nodes())
        monitor.check()
        return nodes
    except BaseException:
        for node in reversed(created):
            if node.GetScene() is scene:
                remove_node(scene, node)
        raise


def _place_beside(scene, input_volume, nodes: list[Any]) -> None:
    """Put the nodes under the input's parent in the subject hierarchy (its study, when loaded from DICOM)."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if shNode is None:
        return
    input_item = shNode.GetItemByDataNode(input_volume)
    parent = shNode.GetItemParent(input_item) if input_item else shNode.GetSceneItemID()
    for node in nodes:
        item = shNode.GetItemByDataNode(node)
        if item:  # Slicer's subject-hierarchy plugins create items for new nodes; MRML alone does not
            shNode.SetItemParent(item, parent)
        else:
            shNode.CreateItem(parent, node)


def find_results(scene, input_volume=None) -> list[ResultNodes]:
    """Every complete result in the scene (of one input volume, if given), in creation order."""
    results = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if node.GetAttribute(RESULT_ATTRIBUTE) != "1":
            continue
        try:
            result = ResultNodes.from_segmentation(node)
        except ValueError:
            continue  # a result whose other nodes were deleted by the user
        if input_volume is None or result.input_volume is input_volume:
            results.append(result)
    return results
