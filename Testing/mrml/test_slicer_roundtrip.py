"""The segmentation written by ``normative-anomaly run``, read back by real Slicer code.

(a) ``slicerio.read_segmentation`` and (b) the MRML segmentation storage node of the
``slicer-core`` package (what 3D Slicer itself runs when it loads a .seg.nrrd) must both
give exactly the CLI's lesion mask, on the input volume's grid as Slicer loads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEGMENT_ID = "Anomaly"


def run_cli(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "NormativeAnomaly"))
    return subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=timeout)


@pytest.fixture(scope="module")
def head_run(real_t1_head_path, tmp_path_factory) -> Path:
    """A run on the real head with a permissive threshold and no size filter, so lesions are found."""
    out = tmp_path_factory.mktemp("slicer-roundtrip") / "out"
    result = run_cli("run", real_t1_head_path, "--out", out, "--fpr", "0.05", "--min-lesion-mm3", "0", "--quiet")
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def expected_mask(head_run) -> np.ndarray:
    """The CLI's mask, rebuilt from its outputs: anomaly map > threshold, kept lesions only; (z, y, x)."""
    summary = json.loads((head_run / "run.json").read_text())
    lesions = json.loads((head_run / "lesions.json").read_text())
    anomaly_map = sitk.ReadImage(str(head_run / "anomaly_map.nii.gz"))
    scores = sitk.GetArrayFromImage(anomaly_map)
    above = scores > summary["threshold"]
    components, count = ndimage.label(above, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    voxel_mm3 = float(np.prod(anomaly_map.GetSpacing()))
    kept = np.flatnonzero(sizes * voxel_mm3 >= max(summary["min_lesion_mm3"], 1e-9))
    kept = kept[kept > 0]
    mask = np.isin(components, kept)

    assert summary["min_lesion_mm3"] == 0 and summary["threshold_healthy_fpr"] == pytest.approx(0.05)
    assert mask.any(), "the run found no anomaly; the round trip would test nothing"
    assert len(kept) == summary["lesion_count"] == len(lesions)
    assert int(mask.sum()) == sum(lesion["voxels"] for lesion in lesions)
    assert sorted(sizes[kept].tolist()) == sorted(lesion["voxels"] for lesion in lesions)
    return mask


def vtk_matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def vtk_image_to_zyx(image_data) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy

    x, y, z = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    assert scalars.GetNumberOfComponents() == 1
    return vtk_to_numpy(scalars).reshape(z, y, x)


def load_volume_node(scene, path: Path):
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"MRML could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def ijk_to_ras(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return vtk_matrix_to_numpy(matrix)


@pytest.fixture(scope="module")
def mrml(head_run, real_t1_head_path):
    """A fresh MRML scene with the input volume and the CLI's segmentation, loaded by their storage nodes."""
    import slicer

    scene = slicer.vtkMRMLScene()
    volume = load_volume_node(scene, real_t1_head_path)
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(head_run / "anomalies.seg.nrrd"))
    assert storage.ReadData(segmentation) == 1, "the MRML segmentation storage node could not read anomalies.seg.nrrd"
    segmentation.SetAndObserveStorageNodeID(storage.GetID())
    return scene, volume, segmentation


# --- (a) slicerio ------------------------------------------------------------------------


@pytest.mark.slow
def test_slicerio_reads_the_cli_mask(head_run, expected_mask, real_t1_head_path):
    import slicerio

    segmentation = slicerio.read_segmentation(str(head_run / "anomalies.seg.nrrd"))
    segments = segmentation["segments"]
    assert [segment["id"] for segment in segments] == [SEGMENT_ID]
    voxels = segmentation["voxels"]
    if voxels.ndim == 4:  # (layer, i, j, k) when segments overlap; one segment is one layer
        voxels = voxels[segments[0]["layer"]]
    mask = voxels.transpose(2, 1, 0) == segments[0]["labelValue"]  # (i, j, k) -> (z, y, x)
    assert mask.shape == expected_mask.shape
    assert mask.sum() == expected_mask.sum()
    assert np.array_equal(mask, expected_mask)

    # Geometry: the same IJK-to-RAS as the input volume loaded by Slicer's volume storage node.
    import slicer

    volume = load_volume_node(slicer.vtkMRMLScene(), real_t1_head_path)
    assert np.allclose(LPS_TO_RAS @ segmentation["ijkToLPS"], ijk_to_ras(volume), atol=1e-4)


# --- (b) MRML segmentation storage node -------------------------------------------------


@pytest.mark.slow
def test_mrml_segmentation_node_holds_one_anomaly_segment(mrml):
    _, _, segmentation_node = mrml
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    assert segmentation.GetNthSegmentID(0) == SEGMENT_ID
    assert segmentation.GetSegment(SEGMENT_ID).GetName() == "Anomaly"
    assert segmentation.ContainsRepresentation("Binary labelmap")


@pytest.mark.slow
def test_mrml_binary_labelmap_matches_cli_mask(mrml, expected_mask):
    """The segment's own oriented image (cropped to its extent) placed into the input's grid."""
    import slicer

    _, volume, segmentation_node = mrml
    import vtk

    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(SEGMENT_ID, labelmap)
    image_to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    assert np.allclose(vtk_matrix_to_numpy(image_to_world), ijk_to_ras(volume), atol=1e-4)

    i0, i1, j0, j1, k0, k1 = labelmap.GetExtent()
    assert min(i0, j0, k0) >= 0
    assert all(high < size for high, size in zip((i1, j1, k1), reversed(expected_mask.shape)))
    placed = np.zeros(expected_mask.shape, bool)
    placed[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = vtk_image_to_zyx(labelmap) > 0
    assert placed.sum() == expected_mask.sum()
    assert np.array_equal(placed, expected_mask)


@pytest.mark.slow
def test_mrml_export_to_labelmap_on_the_input_matches_cli_mask(mrml, expected_mask):
    """What Slicer's Segmentations module does: export the segment onto the input volume's grid."""
    import slicer

    scene, volume, segmentation_node = mrml
    labelmap_node = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap_node)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, [SEGMENT_ID], labelmap_node, volume)
    assert labelmap_node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert np.allclose(ijk_to_ras(labelmap_node), ijk_to_ras(volume), atol=1e-4)
    exported = vtk_image_to_zyx(labelmap_node.GetImageData()) > 0
    assert exported.shape == expected_mask.shape
    assert exported.sum() == expected_mask.sum()
    assert np.array_equal(exported, expected_mask)


@pytest.mark.slow
def test_mrml_geometry_of_outputs_matches_input(head_run, real_t1_head_path):
    """The anomaly map and pseudo-healthy image, loaded as Slicer loads them, overlay the input exactly."""
    import slicer

    scene = slicer.vtkMRMLScene()
    reference = load_volume_node(scene, real_t1_head_path)
    expected = ijk_to_ras(reference)
    source = sitk.ReadImage(str(real_t1_head_path))
    from NormativeAnomalyLib.volume_io import ijk_to_lps

    assert np.allclose(LPS_TO_RAS @ ijk_to_lps(source), expected, atol=1e-4)  # SimpleITK and MRML agree
    for name in ("anomaly_map.nii.gz", "pseudo_healthy.nii.gz"):
        node = load_volume_node(scene, head_run / name)
        assert node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
        assert np.allclose(ijk_to_ras(node), expected, atol=1e-4), name
