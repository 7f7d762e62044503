"""How a result looks: colours, the anomaly-map overlay and its legend, slice-view layers.

Works on whatever slice views the scene has (Slicer's, the web app's, or none).
"""

from __future__ import annotations

from ..lesions import significant
from .result_nodes import ResultNodes

# Slicer's Inferno table when the application loaded it; PET-Heat is built into MRML.
ANOMALY_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLPETProceduralColorNodePET-Heat")
# Voxels below the threshold that flags this fraction of healthy voxels are left transparent,
# so the overlay shows where the scan departs from the norm, not healthy residual noise.
OVERLAY_FLOOR_FPR = 0.1
# "No upper bound" for the overlay's display threshold, as a finite number: the display node writes
# its thresholds into a saved scene as text, and reads "inf" back as 0 (nothing would show).
OVERLAY_CEILING = 1e30


def style_result(nodes: ResultNodes, color_logic=None) -> None:
    """Colours and windows of a new result; a colour legend when a colour logic is given."""
    scene = nodes.segmentation.GetScene()
    calibration = nodes.calibration
    anomaly_display = nodes.anomaly_map.GetDisplayNode()
    color_id = next((i for i in ANOMALY_COLOR_NODE_IDS if scene.GetNodeByID(i) is not None), None)
    if color_id:
        anomaly_display.SetAndObserveColorNodeID(color_id)
    # Rounded as a saved scene keeps them, so a reopened scene shows the same voxels.
    low = significant(calibration.threshold_for_fpr(OVERLAY_FLOOR_FPR))
    high = significant(max(calibration.threshold_for_fpr(calibration.fpr[0]), low * 1.01 + 1e-6))
    anomaly_display.SetAutoWindowLevel(False)
    anomaly_display.SetWindowLevelMinMax(low, high)
    anomaly_display.SetApplyThreshold(True)
    anomaly_display.SetLowerThreshold(low)
    anomaly_display.SetUpperThreshold(OVERLAY_CEILING)
    # The reconstruction is shown with the input's window, so fading compares like with like.
    input_display = nodes.input_volume.GetDisplayNode()
    pseudo_display = nodes.pseudo_healthy.GetDisplayNode()
    if input_display is not None:
        pseudo_display.SetAutoWindowLevel(False)
        pseudo_display.SetWindowLevel(input_display.GetWindow(), input_display.GetLevel())
    if nodes.uncertainty_map is not None:  # shown on demand (as a layer); greys, full range
        nodes.uncertainty_map.GetDisplayNode().SetAutoWindowLevel(True)
    segmentation_display = nodes.segmentation.GetDisplayNode()
    segmentation_display.SetOpacity2DFill(0.25)
    segmentation_display.SetOpacity2DOutline(1.0)
    if color_logic is not None:
        legend = color_logic.AddDefaultColorLegendDisplayNode(nodes.anomaly_map)
        if legend is not None:
            legend.SetTitleText("Anomaly score")


def show_result(nodes: ResultNodes, overlay_opacity: float = 0.5, fade: float = 0.0,
                show_uncertainty: bool = False) -> None:
    """Input in the background of every slice view; in the foreground the anomaly map (or, with
    ``show_uncertainty``, the uncertainty map when the result has one) at ``overlay_opacity``,
    or, to compare, the pseudo-healthy reconstruction at opacity ``fade`` when ``fade`` > 0."""
    scene = nodes.segmentation.GetScene()
    overlay = nodes.uncertainty_map if show_uncertainty and nodes.uncertainty_map is not None else nodes.anomaly_map
    foreground, opacity = ((nodes.pseudo_healthy, fade) if fade > 0 else (overlay, overlay_opacity))
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        was_modifying = composite.StartModify()
        composite.SetBackgroundVolumeID(nodes.input_volume.GetID())
        composite.SetForegroundVolumeID(foreground.GetID())
        composite.SetForegroundOpacity(min(max(opacity, 0.0), 1.0))
        composite.EndModify(was_modifying)
    segmentation_display = nodes.segmentation.GetDisplayNode()
    for result_segmentation in _result_segmentations(scene):
        display = result_segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(result_segmentation is nodes.segmentation)
    segmentation_display.SetVisibility(True)


def centre_on(node, ras: tuple[float, float, float]) -> None:
    """Centre every slice view on a point given in ``node``'s own RAS coordinates (a lesion's centroid
    in the input volume's): the views jump to world coordinates, through the node's parent transforms."""
    import slicer

    world = [0.0, 0.0, 0.0]
    node.TransformPointToWorld([float(value) for value in ras], world)
    slicer.vtkMRMLSliceNode.JumpAllSlices(node.GetScene(), *world, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def _result_segmentations(scene):
    from .result_nodes import RESULT_ATTRIBUTE

    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if node.GetAttribute(RESULT_ATTRIBUTE) == "1":
            yield node
