"""Reading and validation on real images: geometry kept, bad volumes refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from NormativeAnomalyLib.errors import InputVolumeError, OutputError
from NormativeAnomalyLib.volume_io import read_mask, read_volume, validate_volume, write_image


def test_reads_real_head_with_its_geometry(real_t1_head_path):
    image = read_volume(real_t1_head_path)
    on_disk = sitk.ReadImage(str(real_t1_head_path))
    assert image.GetSize() == on_disk.GetSize() == (128, 128, 62)
    assert image.GetSpacing() == on_disk.GetSpacing()
    assert image.GetOrigin() == on_disk.GetOrigin()
    assert image.GetDirection() == on_disk.GetDirection()
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(on_disk))


def test_reads_a_dicom_series_folder(tiny_t1_path, tmp_path):
    image = sitk.Cast(sitk.ReadImage(str(tiny_t1_path)), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    d = image.GetDirection()
    orientation = (d[0], d[3], d[6], d[1], d[4], d[7])  # DICOM: row then column direction cosines
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0020|000e": series_uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.1.2", "0008|0060": "MR",
            "0020|0032": "\\".join(map(str, origin)), "0020|0013": str(k + 1),
            "0020|0037": "\\".join(map(str, orientation)),
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.3.{k + 1}",
        }.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    read = read_volume(tmp_path)
    assert read.GetSize() == image.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-3)
    # The series reader may order slices the other way (a flipped axis); voxels must sit at the same places.
    same_grid = sitk.Resample(read, image, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(same_grid), sitk.GetArrayViewFromImage(image))


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputVolumeError, match="no DICOM series"):
        read_volume(tmp_path)


@pytest.mark.parametrize(
    "values, message",
    [
        (np.zeros((20, 20, 20), np.float32), "empty"),
        (np.full((20, 20, 20), 7.0, np.float32), "constant"),
        (np.pad(np.full((1, 1, 1), np.nan, np.float32), 10, constant_values=1.0), "NaN or infinite"),
        (np.pad(np.full((1, 1, 1), np.inf, np.float32), 10, constant_values=1.0), "NaN or infinite"),
        (np.ones((4, 30, 30), np.float32), "at least 8"),
    ],
)
def test_bad_volumes_are_refused_with_one_line(values, message):
    with pytest.raises(InputVolumeError, match=message) as error:
        validate_volume(sitk.GetImageFromArray(values))
    assert "\n" not in str(error.value)


def test_huge_volume_is_refused_from_its_header_alone(tmp_path, monkeypatch):
    import NormativeAnomalyLib.volume_headers as volume_headers

    path = tmp_path / "big.nrrd"
    sitk.WriteImage(sitk.Image(64, 64, 64, sitk.sitkUInt8), str(path))
    monkeypatch.setattr(volume_headers, "MAX_VOXELS", 64**3 - 1)
    with pytest.raises(InputVolumeError, match="over the limit"):
        read_volume(path)


def test_mask_is_brought_onto_the_input_grid(real_t1_head_path, tmp_path):
    image = read_volume(real_t1_head_path)
    coarse = sitk.BinaryThreshold(sitk.Shrink(image, [2, 2, 2]), 50, 1e9)
    path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(coarse, str(path))
    mask = read_mask(path, image)
    assert mask.GetSize() == image.GetSize() and mask.GetDirection() == image.GetDirection()
    assert 0 < sitk.GetArrayViewFromImage(mask).mean() < 1


def test_write_image_is_atomic_and_leaves_no_temporary(tmp_path, tiny_t1_path):
    image = read_volume(tiny_t1_path)
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous")
    write_image(image, target)
    assert sitk.ReadImage(str(target)).GetSize() == image.GetSize()
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    with pytest.raises(OutputError):
        write_image(image, tmp_path / "missing-folder" / "x.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused(tmp_path, real_t1_head_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(real_t1_head_path)), str(whole))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(InputVolumeError, match="corrupt or truncated"):
        read_volume(cut)


def test_nan_in_a_float_nifti_is_refused(tmp_path, tiny_t1_path):
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_t1_path))).astype(np.float32)
    values[10, 10, 10] = np.nan
    path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    with pytest.raises(InputVolumeError, match="1 NaN or infinite"):
        read_volume(path)
