"""The MRML layer on a real ``vtkMRMLScene`` (slicer-core): what the Slicer panel and web app do.

The run itself goes through ``BackgroundRun`` (the CLI in a child process, as the Slicer
module runs it); expected segmentations are recomputed here, independently, with scipy
from the anomaly map the CLI wrote.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

slicer = pytest.importorskip("slicer")

from NormativeAnomalyLib.background import BackgroundRun, run_command  # noqa: E402
from NormativeAnomalyLib.errors import Cancelled, OutputError  # noqa: E402
from NormativeAnomalyLib.models import default_model_name  # noqa: E402
from NormativeAnomalyLib.mrml import (LiveSegmentation, SegmentationEditedError, SegmentationFrozenError,  # noqa: E402
                                      find_results, load_run)
from NormativeAnomalyLib.mrml.display import centre_on, show_result  # noqa: E402
from NormativeAnomalyLib.mrml.export import EXPORT_FILES, export_clashes, export_result  # noqa: E402
from NormativeAnomalyLib.run_folder import UNCERTAINTY_MAP  # noqa: E402
from NormativeAnomalyLib.mrml.lesion_table import read_lesion_table  # noqa: E402
from NormativeAnomalyLib.mrml.result_nodes import SEGMENT_ID, ResultNodes  # noqa: E402
from NormativeAnomalyLib.mrml.scene import create_scene  # noqa: E402
from NormativeAnomalyLib.mrml.volumes import ijk_to_ras, load_volume_file  # noqa: E402
from NormativeAnomalyLib.progress import Monitor  # noqa: E402
from NormativeAnomalyLib.run_folder import read_run_folder  # noqa: E402

CONNECTIVITY = np.ones((3, 3, 3), bool)


# --- the run, in a background process ------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(demo_paths, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mrml") / "out"
    run = BackgroundRun(run_command(demo_paths[0], out, model=default_model_name()))
    fractions = []
    while (state := run.poll()).running:
        fractions.append(state.fraction)
        time.sleep(0.05)
    state = run.poll()
    assert state.returncode == 0, run.log()
    assert state.fraction == 1.0
    assert fractions == sorted(fractions), "progress went backwards"
    assert len(set(fractions)) > 3, f"too few progress steps: {sorted(set(fractions))}"
    return out


@pytest.mark.reliability
@pytest.mark.parametrize("stage", ["registration", "inference", "to_input_grid"])
@pytest.mark.slow
def test_background_run_cancel_stops_the_child_and_leaves_no_output(demo_paths, tmp_path, stage, reliability_case):
    out = tmp_path / "out"
    run = BackgroundRun(run_command(demo_paths[0], out, model=default_model_name()))
    deadline = time.monotonic() + 120
    while run.poll().stage != stage and run.poll().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.poll().running, f"the run ended before it reached {stage}"
    state = run.cancel()
    assert not state.running and state.returncode == 130, run.log()
    assert "nothing was written" in state.message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "a staging folder was left behind"
    reliability_case("fault", f"Slicer panel: Cancel during {stage}",
                     f"child process stopped (exit 130): \"{state.message}\"; no output folder, no staging folder")


@pytest.mark.reliability
@pytest.mark.skipif(os.name != "posix", reason="process groups and SIGTERM are POSIX")
@pytest.mark.slow
def test_cancel_reaches_the_interpreter_behind_a_launcher(demo_paths, tmp_path, reliability_case):
    """Slicer's PythonSlicer is a launcher that does not forward signals: Cancel must still stop the CLI."""
    out = tmp_path / "out"
    launcher = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]
    run = BackgroundRun(launcher + run_command(demo_paths[0], out, model=default_model_name()))
    deadline = time.monotonic() + 120
    while run.poll().stage == "starting" and run.poll().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll().running
    run.cancel()
    with pytest.raises(ProcessLookupError):
        os.killpg(run.process.pid, 0)  # nothing is left in the run's process group
    assert "nothing was written" in run.log()  # the CLI itself unwound
    assert not out.exists() and list(tmp_path.iterdir()) == []
    reliability_case("fault", "Slicer panel: Cancel behind a launcher that does not forward signals",
                     "the whole process group stopped; the CLI unwound (\"nothing was written\"); no file left")


def test_background_run_reports_the_cli_error_in_one_line(tmp_path):
    bad = tmp_path / "not_an_image.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    state = BackgroundRun(run_command(bad, tmp_path / "out")).wait(120)
    assert state.returncode == 1
    assert state.message.startswith("normative-anomaly: error:") and "not_an_image" in state.message
    assert not (tmp_path / "out").exists()


# --- a scene with the input, as Slicer loads it ---------------------------------------------


def load_input(standalone, path: Path, name: str = "demo_t1"):
    return load_volume_file(standalone.scene, path, name)


@pytest.fixture
def scene_with_result(demo_run, demo_paths):
    standalone = create_scene()
    input_volume = load_input(standalone, demo_paths[0])
    nodes, live = load_run(standalone.scene, input_volume, read_run_folder(demo_run),
                           color_logic=standalone.color_logic)
    return standalone, nodes, live


@pytest.fixture(scope="module")
def scores(demo_run) -> tuple[np.ndarray, float]:
    image = sitk.ReadImage(str(demo_run / "anomaly_map.nii.gz"))
    return sitk.GetArrayFromImage(image), float(np.prod(image.GetSpacing()))


def expected_mask(scores, threshold: float, min_mm3: float) -> np.ndarray:
    values, voxel_mm3 = scores
    components, count = ndimage.label(values > threshold, structure=CONNECTIVITY)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    keep = np.flatnonzero(sizes * voxel_mm3 >= max(min_mm3, 1e-9))
    return np.isin(components, keep[keep > 0])


def segment_on_input_grid(nodes: ResultNodes) -> np.ndarray:
    """The segment as Slicer's Segmentations module exports it onto the input volume: (z, y, x) bool."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    scene = nodes.segmentation.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
    try:
        ids = __import__("vtk").vtkStringArray()
        ids.InsertNextValue(SEGMENT_ID)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            nodes.segmentation, ids, labelmap, nodes.input_volume)
        x, y, z = labelmap.GetImageData().GetDimensions()
        assert np.allclose(ijk_to_ras(labelmap), ijk_to_ras(nodes.input_volume), atol=1e-6)
        return vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(z, y, x) > 0
    finally:
        scene.RemoveNode(labelmap)


def threshold_settings(nodes: ResultNodes) -> list[float]:
    calibration = nodes.calibration
    return [calibration.threshold_for_fpr(f) for f in (0.3, 0.05, 0.01, 0.002, 1e-4)] + [1e6]


# --- geometry, thresholds, table ------------------------------------------------------------


def test_outputs_have_the_input_geometry_and_sit_beside_it(scene_with_result):
    standalone, nodes, _ = scene_with_result
    reference = ijk_to_ras(nodes.input_volume)
    for node in (nodes.anomaly_map, nodes.pseudo_healthy):
        assert np.array_equal(ijk_to_ras(node), reference)
        assert node.GetImageData().GetDimensions() == nodes.input_volume.GetImageData().GetDimensions()
    labelmap = slicer.vtkOrientedImageData()
    nodes.segmentation.GetBinaryLabelmapRepresentation(SEGMENT_ID, labelmap)
    matrix = __import__("vtk").vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), reference, atol=1e-9)
    # Names and subject hierarchy: named after input and model, under the input's parent.
    model = default_model_name()
    assert nodes.anomaly_map.GetName() == f"demo_t1 anomaly map ({model})"
    assert nodes.segmentation.GetName() == f"demo_t1 anomalies ({model})"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(standalone.scene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(nodes.input_volume))
    for node in nodes.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == parent


def test_outputs_follow_a_study_and_a_parent_transform(demo_run, demo_paths):
    standalone = create_scene(slice_views=False)
    scene = standalone.scene
    input_volume = load_input(standalone, demo_paths[0])
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.SetItemParent(sh.GetItemByDataNode(input_volume), study)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    input_volume.SetAndObserveTransformNodeID(transform.GetID())
    nodes, _ = load_run(scene, input_volume, read_run_folder(demo_run))
    for node in nodes.nodes()[:3]:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    for node in (nodes.anomaly_map, nodes.pseudo_healthy, nodes.segmentation):
        assert node.GetTransformNodeID() == transform.GetID()


def test_segment_is_the_thresholded_map_at_every_slider_setting(scene_with_result, scores):
    _, nodes, live = scene_with_result
    seen = set()
    thresholds = threshold_settings(nodes)
    # Up, down and back again: a stale voxel from a previous setting would show.
    for threshold in thresholds + thresholds[::-1][1:]:
        for min_mm3 in (0.0, 50.0, 500.0):
            segmentation = live.update(threshold, min_mm3)
            expected = expected_mask(scores, threshold, min_mm3)
            actual = segment_on_input_grid(nodes)
            assert actual.sum() == expected.sum(), (threshold, min_mm3)
            assert np.array_equal(actual, expected), (threshold, min_mm3)
            assert np.array_equal(segmentation.mask, expected)
            seen.add(int(expected.sum()))
    assert len(seen) > 5 and 0 in seen, f"the settings did not exercise the range: {sorted(seen)}"
    assert nodes.threshold == thresholds[0] and nodes.min_lesion_mm3 == 500.0


def test_threshold_then_size_equals_size_then_threshold(scene_with_result):
    _, nodes, live = scene_with_result
    low, high = nodes.calibration.threshold_for_fpr(0.05), nodes.calibration.threshold_for_fpr(0.01)
    live.update(high, 0.0)
    live.update(low)
    first = (segment_on_input_grid(nodes), read_lesion_table(nodes.lesion_table))
    live.update(high, 0.0)
    live.update(min_lesion_mm3=100.0)
    live.update(low)
    live.update(high, 0.0)
    live.update(min_lesion_mm3=100.0)
    live.update(threshold=low)
    second = (segment_on_input_grid(nodes), read_lesion_table(nodes.lesion_table))
    live.update(low, 0.0)
    live.update(min_lesion_mm3=100.0)
    third = (segment_on_input_grid(nodes), read_lesion_table(nodes.lesion_table))
    assert np.array_equal(second[0], third[0]) and second[1] == third[1]
    assert first[0].sum() > second[0].sum() > 0  # the size filter removed something, not everything


def test_lesion_table_headers_name_each_unit_once(scene_with_result):
    """qMRMLTableModel shows a column's title (or its name) and appends " [unit]" to it."""
    _, nodes, _ = scene_with_result
    table_node, table = nodes.lesion_table, nodes.lesion_table.GetTable()
    assert table_node.GetUseColumnTitleAsColumnHeader()
    headers = []
    for column in range(table.GetNumberOfColumns()):
        name = table.GetColumnName(column)
        header = table_node.GetColumnTitle(name) or name
        unit = table_node.GetColumnUnitLabel(name)
        headers.append(f"{header} [{unit}]" if unit else header)
        assert not unit or header.count(unit) == 0, headers[-1]
    assert "Volume [mL]" in headers and "R [mm]" in headers


def test_lesion_table_lists_the_connected_components(scene_with_result, scores):
    standalone, nodes, live = scene_with_result
    values, voxel_mm3 = scores
    threshold = nodes.calibration.threshold_for_fpr(0.02)
    live.update(threshold, 20.0)
    rows = read_lesion_table(nodes.lesion_table)
    components, count = ndimage.label(expected_mask(scores, threshold, 20.0), structure=CONNECTIVITY)
    assert len(rows) == count > 1
    sizes = np.bincount(components.ravel())[1:]
    assert [row["ID"] for row in rows] == list(range(1, count + 1))
    assert sorted((round(r["Volume"], 4) for r in rows), reverse=True) == [r["Volume"] for r in rows]
    by_volume = sorted(range(count), key=lambda c: -sizes[c])
    input_image = sitk.ReadImage(str(Path(live.nodes.input_volume.GetStorageNode().GetFileName())))
    for row, component in zip(rows, by_volume):
        inside = components == component + 1
        assert row["Volume"] == pytest.approx(sizes[component] * voxel_mm3 / 1000, abs=1e-4)
        assert row["Max score"] == pytest.approx(values[inside].max(), rel=1e-5)  # 6 significant digits
        assert row["Mean score"] == pytest.approx(values[inside].mean(), rel=1e-5)
        z, y, x = (float(np.mean(axis)) for axis in np.nonzero(inside))
        lps = input_image.TransformContinuousIndexToPhysicalPoint((x, y, z))
        assert (row["R"], row["A"], row["S"]) == pytest.approx((-lps[0], -lps[1], lps[2]), abs=0.01)
        assert row["Status"] == "kept"
    # A row centres the slice views on its lesion.
    centre_on(live.nodes.input_volume, (rows[1]["R"], rows[1]["A"], rows[1]["S"]))
    red = standalone.slice_node("Red").GetSliceToRAS()
    assert red.GetElement(2, 3) == pytest.approx(rows[1]["S"], abs=1e-6)


def test_a_row_centres_the_views_on_the_lesion_where_a_parent_transform_shows_it(scene_with_result):
    """Centroids are in the input's own coordinates; the views jump to world coordinates."""
    standalone, nodes, live = scene_with_result
    live.update(nodes.calibration.threshold_for_fpr(0.01), 0.0)
    row = read_lesion_table(nodes.lesion_table)[0]
    transform = standalone.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = __import__("vtk").vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    shift.SetElement(2, 3, 12.5)
    transform.SetMatrixTransformToParent(shift)
    nodes.input_volume.SetAndObserveTransformNodeID(transform.GetID())
    centre_on(nodes.input_volume, (row["R"], row["A"], row["S"]))
    assert standalone.slice_node("Red").GetSliceToRAS().GetElement(2, 3) == pytest.approx(row["S"] + 12.5, abs=1e-6)
    assert standalone.slice_node("Yellow").GetSliceToRAS().GetElement(0, 3) == pytest.approx(row["R"] + 5.0, abs=1e-6)


def test_rejected_lesion_leaves_the_segment_and_stays_rejected(scene_with_result, scores):
    _, nodes, live = scene_with_result
    threshold = nodes.calibration.threshold_for_fpr(0.01)
    segmentation = live.update(threshold, 0.0)
    total, first = int(segmentation.mask.sum()), segmentation.lesions[0]
    segmentation = live.set_rejected(first.id)
    assert segmentation.mask.sum() == total - first.voxels == segment_on_input_grid(nodes).sum()
    assert read_lesion_table(nodes.lesion_table)[0]["Status"] == "rejected"
    # A slightly lower threshold grows the lesion; it is still the rejected one.
    lower = live.update(nodes.calibration.threshold_for_fpr(0.012))
    rejected = [lesion for lesion in lower.lesions if lesion.rejected]
    assert len(rejected) == 1 and rejected[0].voxels >= first.voxels
    assert segment_on_input_grid(nodes).sum() == lower.mask.sum() == sum(l.voxels for l in lower.kept)
    restored = live.set_rejected(rejected[0].id, False)
    assert not any(lesion.rejected for lesion in restored.lesions)
    assert np.array_equal(segment_on_input_grid(nodes), expected_mask(scores, nodes.threshold, 0.0))


def paint(nodes: ResultNodes, ijk: tuple[int, int, int]) -> np.ndarray:
    """An edit as the Segment Editor makes it: the segment's labelmap replaced with one more voxel
    (on a larger extent than the module writes). Returns the edited segment on the input grid."""
    from vtkmodules.util import numpy_support

    edited = segment_on_input_grid(nodes)
    i, j, k = ijk
    edited[k, j, i] = True
    labelmap = slicer.vtkOrientedImageData()
    z, y, x = edited.shape
    labelmap.SetExtent(0, x - 1, 0, y - 1, 0, z - 1)
    labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(edited.astype(np.uint8).ravel(), deep=True,
                                                                  array_type=__import__("vtk").VTK_UNSIGNED_CHAR))
    matrix = __import__("vtk").vtkMatrix4x4()
    nodes.input_volume.GetIJKToRASMatrix(matrix)
    labelmap.SetImageToWorldMatrix(matrix)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, nodes.segmentation, SEGMENT_ID, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return edited


def test_an_edit_made_outside_the_panel_is_never_overwritten_by_a_slider(scene_with_result):
    """Edited in the Segment Editor without the panel's hand-over button: the next slider move
    freezes the segment (one-line notice) instead of replacing the edits; reset brings the sliders back."""
    _, nodes, live = scene_with_result
    live.update(nodes.calibration.threshold_for_fpr(0.01), 0.0)
    live.update(nodes.calibration.threshold_for_fpr(0.05), 0.0)  # the module's own writes are not edits
    assert not live.edited_outside()
    edited = paint(nodes, (2, 3, 4))  # a corner voxel no threshold segments
    with pytest.raises(SegmentationEditedError, match="edited by hand") as raised:
        live.update(nodes.calibration.threshold_for_fpr(0.2))
    assert "\n" not in str(raised.value) and nodes.frozen
    assert np.array_equal(segment_on_input_grid(nodes), edited)
    with pytest.raises(SegmentationFrozenError):
        live.update(nodes.calibration.threshold_for_fpr(0.2))
    live.reset()
    assert not nodes.frozen and not segment_on_input_grid(nodes)[4, 3, 2]
    live.update(nodes.calibration.threshold_for_fpr(0.2))  # the sliders work again


def test_an_edit_saved_in_a_scene_is_found_when_the_result_is_used_again(scene_with_result):
    """A result from a reopened scene: compared with what its saved settings give."""
    _, nodes, live = scene_with_result
    edited = paint(nodes, (2, 3, 4))
    fresh = LiveSegmentation(ResultNodes.from_segmentation(nodes.segmentation))
    with pytest.raises(SegmentationEditedError):
        fresh.update(nodes.calibration.threshold_for_fpr(0.2))
    assert np.array_equal(segment_on_input_grid(nodes), edited)


def test_manual_editing_freezes_the_sliders_until_reset(scene_with_result):
    _, nodes, live = scene_with_result
    live.freeze()
    before = segment_on_input_grid(nodes)
    with pytest.raises(SegmentationFrozenError, match="manual editing"):
        live.update(nodes.calibration.threshold_for_fpr(0.2))
    assert np.array_equal(segment_on_input_grid(nodes), before)
    live.reset()
    assert not nodes.frozen


# --- all or nothing -------------------------------------------------------------------------


class CancelAfter:
    def __init__(self, checks: int) -> None:
        self.left = checks

    def __call__(self) -> bool:
        self.left -= 1
        return self.left < 0


def scene_state(scene) -> tuple:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    children = __import__("vtk").vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), children, True)
    ids = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    return tuple(ids), children.GetNumberOfIds()


@pytest.mark.reliability
def test_cancel_while_adding_leaves_the_scene_as_it_was(demo_run, demo_paths, reliability_case):
    standalone = create_scene()
    scene = standalone.scene
    input_volume = load_input(standalone, demo_paths[0])
    outputs = read_run_folder(demo_run)
    before = scene_state(scene)
    cancelled_at = []
    for checks in range(12):
        try:
            load_run(scene, input_volume, outputs, Monitor(cancel=CancelAfter(checks)), standalone.color_logic)
        except Cancelled:
            cancelled_at.append(checks)
            assert scene_state(scene) == before, f"nodes left behind after a cancel at check {checks}"
            continue
        break  # this many checks let it finish
    assert len(cancelled_at) >= 5, "the cancel points were not exercised"
    assert len(find_results(scene, input_volume)) == 1  # the run that was not cancelled
    reliability_case("fault", "Slicer logic: Cancel at each point while result nodes are added",
                     f"cancelled at {len(cancelled_at)} check points: each time the scene's nodes and subject "
                     "hierarchy were as before")


@pytest.mark.reliability
def test_a_result_on_another_grid_is_refused_without_leaving_nodes(demo_run, real_t1_head_path, reliability_case):
    standalone = create_scene(slice_views=False)
    other = load_input(standalone, real_t1_head_path, "other head")
    before = scene_state(standalone.scene)
    with pytest.raises(OutputError, match="voxels") as error:
        load_run(standalone.scene, other, read_run_folder(demo_run))
    assert scene_state(standalone.scene) == before
    reliability_case("input volume", "Slicer logic: a result folder loaded onto a volume of another grid",
                     f"refused: {error.value}; no node added")


# --- display, two models, export, save and reload -------------------------------------------


def test_layers_fade_and_switching_between_results(scene_with_result, demo_run):
    standalone, nodes, _ = scene_with_result
    scene = standalone.scene
    outputs = read_run_folder(demo_run)
    outputs.summary = dataclasses.replace(outputs.summary, model=dict(outputs.model, name="second-model"))
    second, _ = load_run(scene, nodes.input_volume, outputs)
    assert [r.segmentation for r in find_results(scene, nodes.input_volume)] == [nodes.segmentation,
                                                                                 second.segmentation]
    show_result(nodes, overlay_opacity=0.4)
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == nodes.input_volume.GetID()
        assert composite.GetForegroundVolumeID() == nodes.anomaly_map.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    assert nodes.segmentation.GetDisplayNode().GetVisibility() and not second.segmentation.GetDisplayNode().GetVisibility()
    show_result(second, overlay_opacity=0.4, fade=0.7)
    for composite in composites:
        assert composite.GetForegroundVolumeID() == second.pseudo_healthy.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    assert second.segmentation.GetDisplayNode().GetVisibility() and not nodes.segmentation.GetDisplayNode().GetVisibility()
    display = nodes.anomaly_map.GetDisplayNode()
    assert display.GetColorNodeID() and display.GetApplyThreshold()
    assert standalone.color_logic.GetColorLegendDisplayNode(nodes.anomaly_map) is not None


def test_export_writes_what_the_user_sees_and_never_overwrites_unasked(scene_with_result, tmp_path):
    import slicerio

    _, nodes, live = scene_with_result
    segmentation = live.update(nodes.calibration.threshold_for_fpr(0.02), 0.0)
    live.set_rejected(1)
    paths = export_result(nodes, tmp_path / "export")
    assert [p.name for p in paths] == list(EXPORT_FILES) and all(p.is_file() for p in paths)
    written = slicerio.read_segmentation(str(paths[0]))
    segment = written["segments"][0]
    voxels = written["voxels"] if written["voxels"].ndim == 3 else written["voxels"][segment["layer"]]
    # The file may hold a box of the input's grid: find where its first voxel lies on the input.
    input_ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras(nodes.input_volume)
    offset = np.rint(np.linalg.solve(input_ijk_to_lps, written["ijkToLPS"])[:3, 3])
    expected = segment_on_input_grid(nodes)
    placed = np.zeros(expected.shape, bool)
    i, j, k = (int(v) for v in offset)
    block = voxels.transpose(2, 1, 0) == segment["labelValue"]
    placed[k:k + block.shape[0], j:j + block.shape[1], i:i + block.shape[2]] = block
    assert np.array_equal(placed, expected) and expected.sum() == segmentation.mask.sum() - segmentation.lesions[0].voxels
    with open(paths[3]) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(segmentation.lesions) and rows[0]["Status"] == "rejected"
    anomaly_map = sitk.ReadImage(str(paths[1]))
    assert anomaly_map.GetSize() == nodes.input_volume.GetImageData().GetDimensions()
    stamp = paths[0].stat().st_mtime_ns
    with pytest.raises(OutputError, match="already holds"):
        export_result(nodes, tmp_path / "export")
    assert paths[0].stat().st_mtime_ns == stamp
    export_result(nodes, tmp_path / "export", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(EXPORT_FILES)


def test_export_asks_before_replacing_any_hand_over_file(scene_with_result, tmp_path):
    """What the panel asks about (export_clashes) is every file export would replace, the
    uncertainty map included, so a confirmed export never fails on one it did not ask about."""
    _, nodes, _ = scene_with_result
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / UNCERTAINTY_MAP).write_bytes(b"an earlier export")
    (folder / "notes.txt").write_text("the user's own")
    assert export_clashes(folder) == [UNCERTAINTY_MAP]
    with pytest.raises(OutputError, match=UNCERTAINTY_MAP):
        export_result(nodes, folder)
    export_result(nodes, folder, overwrite=bool(export_clashes(folder)))
    assert (folder / "notes.txt").read_text() == "the user's own"
    assert (folder / UNCERTAINTY_MAP).exists() == (nodes.uncertainty_map is not None)  # no stale map left


@pytest.mark.parametrize("as_bundle", [False, True], ids=["mrml", "mrb"])
def test_saved_scene_reopens_with_outputs_and_settings(scene_with_result, tmp_path, as_bundle):
    standalone, nodes, live = scene_with_result
    threshold = nodes.calibration.threshold_for_fpr(0.02)
    live.update(threshold, 30.0)
    live.set_rejected(2)
    before_mask, before_table = segment_on_input_grid(nodes), read_lesion_table(nodes.lesion_table)

    folder = tmp_path / "saved"
    folder.mkdir()
    assert standalone.application_logic.SaveSceneToSlicerDataBundleDirectory(str(folder), None)
    reopened = create_scene(slice_views=False)
    if as_bundle:
        bundle = tmp_path / "saved.mrb"
        assert standalone.application_logic.Zip(str(bundle), str(folder))
        (tmp_path / "unpacked").mkdir()
        assert reopened.application_logic.OpenSlicerDataBundle(str(bundle), str(tmp_path / "unpacked"))
    else:
        reopened.scene.SetURL(str(folder / "saved.mrml"))
        assert reopened.scene.Connect()

    results = find_results(reopened.scene)
    assert len(results) == 1
    result = results[0]
    assert result.threshold == threshold and result.min_lesion_mm3 == 30.0
    assert result.model == nodes.model and result.calibration == nodes.calibration
    assert result.rejected_peaks == nodes.rejected_peaks and not result.frozen
    assert np.array_equal(segment_on_input_grid(result), before_mask)
    assert read_lesion_table(result.lesion_table) == before_table
    assert np.array_equal(ijk_to_ras(result.anomaly_map), ijk_to_ras(result.input_volume))
    # The overlay looks as it did: colours, window, and a display threshold that still lets voxels through.
    saved, shown = nodes.anomaly_map.GetDisplayNode(), result.anomaly_map.GetDisplayNode()
    assert shown.GetColorNodeID() == saved.GetColorNodeID() and shown.GetColorNodeID()
    assert (shown.GetWindow(), shown.GetLevel()) == pytest.approx((saved.GetWindow(), saved.GetLevel()), rel=1e-5)
    assert not shown.GetAutoWindowLevel() and shown.GetApplyThreshold()
    assert shown.GetLowerThreshold() == pytest.approx(saved.GetLowerThreshold(), rel=1e-5)
    assert shown.GetUpperThreshold() == pytest.approx(saved.GetUpperThreshold(), rel=1e-5)
    values = slicer.util.arrayFromVolume(result.anomaly_map)
    shows = (values >= shown.GetLowerThreshold()) & (values <= shown.GetUpperThreshold())
    assert shows.sum() == ((values >= saved.GetLowerThreshold()) & (values <= saved.GetUpperThreshold())).sum() > 0
    # The sliders work again on the reopened scene, from the saved settings.
    reloaded = LiveSegmentation(result).update()
    assert np.array_equal(reloaded.mask, before_mask)
    assert sum(lesion.rejected for lesion in reloaded.lesions) == 1


def test_mrml_result_equals_the_cli_segmentation(scene_with_result, demo_run):
    """The same numbers through both front ends: a GUI's run writes only run.json and the maps, and
    the module's first segment is what the CLI segments from that map (its lesion count included)."""
    from NormativeAnomalyLib.lesions import segment_anomalies
    from NormativeAnomalyLib.run_folder import MAP_FILES

    assert sorted(path.name for path in demo_run.iterdir()) == sorted(MAP_FILES)
    _, nodes, _ = scene_with_result
    summary = json.loads((demo_run / "run.json").read_text())
    assert nodes.threshold == summary["threshold"]
    cli = segment_anomalies(read_run_folder(demo_run).anomaly_map, summary["threshold"], summary["min_lesion_mm3"])
    assert len(cli.kept) == summary["lesion_count"]
    assert np.array_equal(segment_on_input_grid(nodes), cli.mask)
    assert len(read_lesion_table(nodes.lesion_table)) == summary["lesion_count"]


def test_an_uncertainty_map_becomes_a_node_that_is_exported_and_removed_with_its_result(demo_run, demo_paths,
                                                                                        tmp_path):
    """Diffusion runs with several samples also give a variance map: one more node of the result."""
    import dataclasses

    standalone = create_scene()
    input_volume = load_input(standalone, demo_paths[0])
    outputs = read_run_folder(demo_run)
    variance = sitk.Abs(outputs.anomaly_map) * 0.5
    before = scene_state(standalone.scene)
    nodes, _ = load_run(standalone.scene, input_volume, dataclasses.replace(outputs, uncertainty=variance))
    assert nodes.uncertainty_map is not None and nodes.uncertainty_map in nodes.nodes()
    assert nodes.uncertainty_map.GetName() == f"demo_t1 uncertainty ({default_model_name()})"
    assert np.array_equal(ijk_to_ras(nodes.uncertainty_map), ijk_to_ras(input_volume))
    assert ResultNodes.from_segmentation(nodes.segmentation).uncertainty_map is nodes.uncertainty_map
    show_result(nodes, overlay_opacity=0.6, show_uncertainty=True)
    composite = standalone.scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == nodes.uncertainty_map.GetID()
    paths = export_result(nodes, tmp_path / "export")
    assert "uncertainty_map.nii.gz" in [p.name for p in paths]
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "export/uncertainty_map.nii.gz"))),
                               sitk.GetArrayFromImage(variance), rtol=1e-6)
    nodes.remove()
    assert scene_state(standalone.scene) == before
