"""Property-based tests (hypothesis): geometry survives every round trip the tool makes, and the
readers turn any corrupted file into a one-line InputVolumeError, never a crash or another error."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from NormativeAnomalyLib.errors import InputVolumeError
from NormativeAnomalyLib.volume_io import ijk_to_lps, read_volume

REPO = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _rotation(angles: tuple[float, float, float], flips: tuple[bool, bool, bool]) -> np.ndarray:
    """An orthonormal direction matrix: a rotation, then axis flips (left- or right-handed)."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*angles)
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    return matrix @ np.diag([-1.0 if flip else 1.0 for flip in flips])


geometries = st.fixed_dictionaries({
    "size": st.tuples(*[st.integers(8, 14)] * 3),
    "spacing": st.tuples(*[st.floats(0.3, 8.0)] * 3),
    "origin": st.tuples(*[st.floats(-300.0, 300.0)] * 3),
    "angles": st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    "flips": st.tuples(st.booleans(), st.booleans(), st.booleans()),
})


def _image(geometry: dict) -> sitk.Image:
    values = np.random.default_rng(0).random(tuple(reversed(geometry["size"]))).astype(np.float32) + 1.0
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(tuple(_rotation(geometry["angles"], geometry["flips"]).ravel()))
    return image


@SETTINGS
@given(geometry=geometries, suffix=st.sampled_from([".nii.gz", ".nrrd", ".mha"]))
def test_geometry_survives_write_and_read(tmp_path, geometry, suffix):
    """Any orthonormal direction, spacing and origin: read_volume gives back the voxels where they were."""
    image = _image(geometry)
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(image, str(path))
    read = read_volume(path)
    # NIfTI stores the direction as a quaternion in float32: agree to about 1e-4 mm per mm
    np.testing.assert_allclose(ijk_to_lps(read), ijk_to_lps(image), atol=2e-3 * max(geometry["spacing"]) * 14 + 1e-3)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(image))


@SETTINGS
@given(geometry=geometries, index=st.tuples(*[st.integers(0, 7)] * 3))
def test_ijk_to_lps_is_what_itk_computes(geometry, index):
    image = _image(geometry)
    point = ijk_to_lps(image) @ np.array([*index, 1.0])
    np.testing.assert_allclose(point[:3], image.TransformIndexToPhysicalPoint(index), atol=1e-6)


@SETTINGS
@given(geometry=geometries)
def test_mrml_node_geometry_round_trip(geometry):
    """Input image -> MRML volume node -> image again (what the Slicer panel does with the
    input and the result): the same IJK-to-RAS, the same voxels."""
    slicer = pytest.importorskip("slicer")  # slicer-core
    import vtk

    from NormativeAnomalyLib.mrml.volumes import add_volume_node, image_from_volume_node, image_ijk_to_ras, ijk_to_ras

    scene = slicer.vtkMRMLScene()
    image = _image(geometry)
    matrix = image_ijk_to_ras(image)
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")  # the input, as Slicer loaded it
    vtk_matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            vtk_matrix.SetElement(row, column, matrix[row, column])
    reference.SetIJKToRASMatrix(vtk_matrix)
    voxels = vtk.vtkImageData()
    voxels.SetDimensions(*image.GetSize())
    voxels.AllocateScalars(vtk.VTK_FLOAT, 1)
    reference.SetAndObserveImageData(voxels)
    node = add_volume_node(scene, image, "round trip", reference)
    np.testing.assert_allclose(ijk_to_ras(node), matrix, atol=1e-6)
    back = image_from_volume_node(node)
    np.testing.assert_allclose(ijk_to_lps(back), ijk_to_lps(image), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


# --- fuzzing the readers ----------------------------------------------------------------------

def _small_volume_bytes(suffix: str, tmp: Path) -> bytes:
    values = (np.random.default_rng(1).random((10, 10, 10)) * 1000).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.0, 1.2, 2.0))
    path = tmp / f"seed{suffix}"
    sitk.WriteImage(image, str(path), useCompression=False)
    return path.read_bytes()


def _mutate(blob: bytes, edits: list[tuple[int, int]], cut: int | None, header: int) -> bytes:
    data = bytearray(blob)
    for position, value in edits:  # most edits in the header, where parsers are
        data[position % header if position % 3 else position % len(data)] = value
    return bytes(data[:cut] if cut else data)


@pytest.mark.reliability
@pytest.mark.parametrize("suffix, header", [(".nii", 352), (".nrrd", 200), (".mha", 300), (".nii.gz", 352)])
def test_fuzzed_files_are_read_or_refused_in_one_line(tmp_path, suffix, header, reliability_case):
    seed = _small_volume_bytes(".nii" if suffix == ".nii.gz" else suffix, tmp_path)
    outcomes = {"read": 0, "refused": 0}
    messages: set[str] = set()

    @settings(max_examples=150, deadline=None, database=None)
    @given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6),
           cut=st.one_of(st.none(), st.integers(1, len(seed))))
    def one_file(edits, cut):
        blob = _mutate(seed, edits, cut, header)
        path = tmp_path / f"fuzz{suffix}"
        path.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" else blob)
        try:
            image = read_volume(path)
        except InputVolumeError as error:  # the only failure allowed: one line, naming the file
            message = str(error)
            assert "\n" not in message and str(path) in message, message
            outcomes["refused"] += 1
            messages.add(message.replace(str(path), "FILE").split(":")[0])
            return
        assert image.GetDimension() == 3 and np.isfinite(sitk.GetArrayViewFromImage(image)).all()
        outcomes["read"] += 1

    one_file()
    assert outcomes["refused"] > 0  # the mutations did break files
    reliability_case("input volume", f"fuzzed {suffix} files (150 byte-level mutations and truncations of a "
                     "valid file)", f"{outcomes['read']} still valid volumes read, {outcomes['refused']} refused "
                     f"with one line ({len(messages)} kinds of message); no crash, no other exception")
