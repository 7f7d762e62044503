"""Volumes a clinician may hand the tool, through the CLI (which the Slicer module and batch runs
also go through): refused with one line and nothing written, or handled correctly.

Every case is recorded for docs/reliability.md (scripts/reliability_report.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_runs import REPO, assert_ok, read_json, run_cli

from NormativeAnomalyLib.resources import demo_case
from NormativeAnomalyLib.simulation import chest_phantom

pytestmark = pytest.mark.reliability

DEMO, DEMO_MASK = demo_case().image, demo_case().lesion_mask
T2_TEMPLATE = REPO / "Resources" / "Templates" / "icbm152_2009c_t2_2mm" / "image.nii.gz"
FAST_MODEL = "intensity-t1"  # these cases are about the input, not the network


def snapshot(root: Path) -> dict[str, object]:
    """Every file under ``root`` by relative path: its bytes, or for a big file its size and mtime."""
    def state(path: Path) -> object:
        stat = path.stat()
        return (stat.st_size, stat.st_mtime_ns) if stat.st_size > 1 << 26 else path.read_bytes()
    return {str(p.relative_to(root)): (state(p) if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def tiny_volume(tmp: Path) -> Path:
    return _write(sitk.GetImageFromArray(np.random.default_rng(0).random((5, 5, 5), dtype=np.float32)),
                  tmp / "tiny.nii.gz")


def huge_volume_header(tmp: Path) -> Path:
    """A 1024^3 float volume (4 GiB): a detached header and a sparse data file, so the test needs
    no 4 GiB of disk; a reader that loaded it would need 4 GiB of memory."""
    path = tmp / "huge.nhdr"
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 1024 1024 1024\nspacings: 0.2 0.2 0.2\n"
                    "encoding: raw\nendian: little\ndata file: huge.raw\n")
    with open(tmp / "huge.raw", "wb") as data:
        data.truncate(4 * 1024**3)
    return path


def label_map(tmp: Path) -> Path:
    return DEMO_MASK  # the demo's lesion mask: a real label map on the demo's grid


def corrupt_nrrd_header(tmp: Path) -> Path:
    path = tmp / "corrupt.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 64 banana 64\nencoding: raw\n\n" + bytes(1024))
    return path


def corrupt_nifti_header(tmp: Path) -> Path:
    """The demo with its header's dim[0] (number of dimensions) overwritten with 9."""
    import gzip

    data = bytearray(gzip.decompress(DEMO.read_bytes()))
    data[40:42] = (9).to_bytes(2, "little")
    path = tmp / "corrupt.nii"
    path.write_bytes(bytes(data))
    return path


def dicom_two_series(tmp: Path) -> Path:
    folder = tmp / "dicom"
    folder.mkdir()
    image = sitk.Cast(sitk.ReadImage(str(REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz")), sitk.sitkInt16)
    for series in (1, 2):
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(image.GetDepth()):
            slice_k = image[:, :, k]
            origin = image.TransformIndexToPhysicalPoint((0, 0, k))
            for tag, value in {"0020|000e": f"1.2.826.0.1.3680043.2.1125.9.{series}", "0008|0060": "MR",
                               "0020|000d": "1.2.826.0.1.3680043.2.1125.9.100",
                               "0020|0032": "\\".join(map(str, origin)), "0020|0013": str(k + 1),
                               "0020|0037": "1\\0\\0\\0\\1\\0",
                               "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.{series}.{k + 1}"}.items():
                slice_k.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"s{series}_{k:03d}.dcm"))
            writer.Execute(slice_k)
    return folder


def chest_ct(tmp: Path) -> Path:
    return _write(chest_phantom(), tmp / "chest.nii.gz")


def t2_for_a_t1_model(tmp: Path) -> Path:
    image = sitk.ReadImage(str(T2_TEMPLATE))
    moved = sitk.Euler3DTransform()
    moved.SetTranslation((6.0, -4.0, 5.0))
    return _write(sitk.Resample(image, image, moved, sitk.sitkLinear, 0.0), tmp / "t2.nii.gz")


def upside_down_head(tmp: Path) -> Path:
    """The demo's voxels flipped head-to-foot while its header is kept: a wrong orientation code."""
    image = sitk.ReadImage(str(DEMO))
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(image)[::-1]))
    flipped.CopyInformation(image)
    return _write(flipped, tmp / "upside_down.nii.gz")


def falsely_registered(tmp: Path) -> Path:
    return REPO / "Testing" / "Data" / "itk_kmeans_t1.nii.gz"  # run with --registered: it is not in template space


def _demo() -> sitk.Image:
    """The demo's voxels and geometry without its NIfTI fields (which MetaImage cannot store)."""
    demo = sitk.ReadImage(str(DEMO))
    image = sitk.GetImageFromArray(sitk.GetArrayFromImage(demo))
    image.CopyInformation(demo)
    return image


def sheared(tmp: Path) -> Path:
    """The demo's direction times a shear [[1, .15, 0], [0, 1, 0], [0, 0, 1]]: NIfTI outputs cannot hold
    it (ITK coerces it to orthogonal), so the maps would lie up to 21 mm off the input."""
    image = _demo()
    shear = np.array([[1, 0.15, 0], [0, 1, 0], [0, 0, 1]])
    image.SetDirection((np.asarray(image.GetDirection()).reshape(3, 3) @ shear).ravel().tolist())
    return _write(image, tmp / "sheared.mha")


def _mha_with(tmp: Path, name: str, field: str, value: str) -> Path:
    """The demo as MetaImage with one header field rewritten (values ITK itself refuses to set)."""
    path = _write(_demo(), tmp / name)
    data = path.read_bytes()
    start = data.index(field.encode() + b" = ")
    end = data.index(b"\n", start)
    path.write_bytes(data[:start] + f"{field} = {value}".encode() + data[end:])
    return path


def singular_direction(tmp: Path) -> Path:
    return _mha_with(tmp, "two_equal_axes.mha", "TransformMatrix", "1 0 0 1 0 0 0 0 1")


def nan_direction(tmp: Path) -> Path:
    return _mha_with(tmp, "nan_direction.mha", "TransformMatrix", "nan 0 0 0 nan 0 0 0 nan")


def far_origin(tmp: Path) -> Path:
    return _mha_with(tmp, "far.mha", "Offset", "1e30 0 0")


def big_nifti_extension(tmp: Path) -> Path:
    """The demo as a NIfTI whose header extension is 128 MiB (a sparse file): the NIfTI library and
    nibabel would each read it whole."""
    import gzip
    import struct

    raw = gzip.decompress(DEMO.read_bytes())
    size = 128 * 2**20
    header = bytearray(raw[:348])
    header[108:112] = struct.pack("<f", 352 + size)  # vox_offset
    path = tmp / "big_header.nii"
    with open(path, "wb") as stream:
        stream.write(bytes(header) + bytes([1, 0, 0, 0]) + struct.pack("<ii", size, 6))
        stream.seek(352 + size)
        stream.write(raw[352:])
    return path


def newline_in_name(tmp: Path) -> Path:
    path = tmp / "cut\nin two.nii.gz"
    path.write_bytes(DEMO.read_bytes()[:20000])
    return path


def dicom_missing_slice(tmp: Path) -> Path:
    from test_hostile_headers import write_dicom_series

    return write_dicom_series(tmp / "dicom", positions=[2.0 * k for k in range(25) if k != 12])


def dicom_folder_without_series(tmp: Path) -> Path:
    folder = tmp / "not_dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return folder


# (builder, extra CLI arguments, a word the one-line message must contain, description)
REFUSED = [
    pytest.param(tiny_volume, [], "at least 8", "tiny volume, 5x5x5 voxels", id="tiny"),
    pytest.param(huge_volume_header, [], "over the limit", "1024^3 float volume (4 GiB; a sparse file)", id="huge"),
    pytest.param(label_map, [], "label map", "a label map (the demo's lesion mask) given as the scan", id="label-map"),
    pytest.param(corrupt_nrrd_header, [], "cannot be read", "NRRD header with a non-numeric size", id="bad-nrrd"),
    pytest.param(corrupt_nifti_header, [], "cannot be read", "NIfTI header claiming 9 dimensions", id="bad-nifti"),
    pytest.param(dicom_two_series, [], "2 dicom series", "DICOM folder with two series mixed", id="dicom-mixed"),
    pytest.param(chest_ct, [], "not a t1 brain mri", "non-brain anatomy: a chest-CT-like phantom", id="chest"),
    pytest.param(t2_for_a_t1_model, [], "another modality", "T2 scan given to a T1 model", id="t2-for-t1"),
    pytest.param(upside_down_head, [], "correlates", "head stored upside down (header orientation wrong)",
                 id="upside-down"),
    pytest.param(falsely_registered, ["--registered"], "template",
                 "--registered given for a scan not in template space", id="falsely-registered"),
    pytest.param(sheared, [], "not orthonormal", "sheared (non-orthogonal) direction matrix (MHA)", id="sheared"),
    pytest.param(singular_direction, [], "singular", "singular direction matrix (two equal axes, MHA)",
                 id="singular-direction"),
    pytest.param(nan_direction, [], "singular", "NaN direction matrix (MHA)", id="nan-direction"),
    pytest.param(far_origin, [], "origin", "origin at 1e30 mm (MHA)", id="far-origin"),
    pytest.param(big_nifti_extension, [], "extensions", "NIfTI with a 128 MiB header extension (sparse file)",
                 id="nifti-extension"),
    pytest.param(newline_in_name, [], "truncated", "a truncated NIfTI whose file name holds a newline",
                 id="newline-name"),
    pytest.param(dicom_missing_slice, [], "missing", "DICOM series with one slice missing", id="dicom-missing"),
    pytest.param(dicom_folder_without_series, [], "no dicom series", "folder without DICOM files",
                 id="dicom-none"),
]


@pytest.mark.parametrize("build, extra, keyword, description", REFUSED)
@pytest.mark.slow
def test_hostile_volume_is_refused_with_one_line(build, extra, keyword, description, tmp_path, reliability_case):
    input_path = build(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("run", input_path, "--out", tmp_path / "out", "--model", FAST_MODEL, "--quiet", *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("normative-anomaly:"), result.stderr
    assert keyword in lines[0].lower(), lines[0]
    assert "internal error" not in lines[0]
    assert snapshot(tmp_path) == before  # nothing written, the input untouched
    reliability_case("input volume", description, f"exit 1: {lines[0]}")


def _run(input_path: Path, out: Path, *extra) -> dict:
    result = run_cli("run", input_path, "--out", out, "--model", FAST_MODEL, "--quiet", *extra)
    assert_ok(result)
    return read_json(out / "run.json")


def _segmentation_on(out: Path, reference: sitk.Image) -> np.ndarray:
    """The run's segmentation (on its input's grid) resampled onto ``reference``'s grid."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(out / "anomalies.seg.nrrd"))
    voxels = slicerio.extract_segments(segmentation, [("Anomaly", 1)])["voxels"].transpose(2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels).astype(np.uint8))
    image.CopyInformation(sitk.ReadImage(str(out / "anomaly_map.nii.gz")))
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return _run(DEMO, out), out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
def test_other_voxel_order_gives_the_same_result(demo_run, tmp_path, reliability_case):
    """The same physical image stored with another axis order and directions (PIR instead of the
    demo's): outputs on the new grid, the same segmentation once resampled back."""
    summary, out = demo_run
    demo = sitk.ReadImage(str(DEMO))
    reoriented = sitk.DICOMOrient(demo, "PIR")
    assert reoriented.GetDirection() != demo.GetDirection()
    path = _write(reoriented, tmp_path / "pir.nii.gz")
    other = _run(path, tmp_path / "out")
    anomaly_map = sitk.ReadImage(str(tmp_path / "out" / "anomaly_map.nii.gz"))
    assert anomaly_map.GetDirection() == pytest.approx(reoriented.GetDirection())
    dice = _dice(_segmentation_on(tmp_path / "out", demo), _segmentation_on(out, demo))
    assert dice > 0.9, dice
    assert other["lesion_volume_ml"] == pytest.approx(summary["lesion_volume_ml"], rel=0.1)
    reliability_case("input volume", "same head stored in another orientation (PIR voxel order)",
                     f"ran; segmentation Dice {dice:.3f} with the original orientation's, on the input's own grid")


@pytest.mark.slow
def test_extreme_anisotropy_is_handled_on_the_input_grid(demo_run, tmp_path, reliability_case):
    """0.5 x 0.5 x 7 mm voxels (a thick-slice clinical acquisition)."""
    summary, out = demo_run
    demo = sitk.ReadImage(str(DEMO), sitk.sitkFloat32)
    size = [round(n * s / t) for n, s, t in zip(demo.GetSize(), demo.GetSpacing(), (0.5, 0.5, 7.0))]
    thick = sitk.Resample(demo, size, sitk.Transform(), sitk.sitkLinear, demo.GetOrigin(), (0.5, 0.5, 7.0),
                          demo.GetDirection(), 0.0, sitk.sitkFloat32)
    path = _write(thick, tmp_path / "thick.nii.gz")
    other = _run(path, tmp_path / "out")
    anomaly_map = sitk.ReadImage(str(tmp_path / "out" / "anomaly_map.nii.gz"))
    assert anomaly_map.GetSize() == thick.GetSize() and anomaly_map.GetSpacing() == pytest.approx((0.5, 0.5, 7.0))
    assert other["registration"]["alignment"] >= other["registration"]["alignment_cutoff"]
    assert other["lesion_count"] >= 1
    reliability_case("input volume", "extreme anisotropy, 0.5 x 0.5 x 7 mm voxels",
                     f"ran; outputs on the 0.5x0.5x7 mm grid, alignment {other['registration']['alignment']:.2f}, "
                     f"{other['lesion_count']} lesion(s), {other['lesion_volume_ml']:.1f} mL "
                     f"(1.5 mm original: {summary['lesion_volume_ml']:.1f} mL)")


@pytest.mark.slow
def test_full_int32_range_gives_the_same_segmentation(demo_run, tmp_path, reliability_case):
    """Voxel values spanning the whole int32 range (an export that rescaled to the type's limits)."""
    summary, out = demo_run
    demo = sitk.ReadImage(str(DEMO), sitk.sitkFloat64)
    values = sitk.GetArrayFromImage(demo)
    low, high = values.min(), values.max()
    info = np.iinfo(np.int32)
    stretched = np.round(info.min + (values - low) / (high - low) * (float(info.max) - info.min))
    image = sitk.GetImageFromArray(np.clip(stretched, info.min, info.max).astype(np.int32))
    image.CopyInformation(demo)
    path = _write(image, tmp_path / "int32.nrrd")
    other = _run(path, tmp_path / "out")
    scores = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "anomaly_map.nii.gz")))
    assert np.isfinite(scores).all()
    dice = _dice(_segmentation_on(tmp_path / "out", demo), _segmentation_on(out, demo))
    assert dice > 0.95, dice
    reliability_case("input volume", "voxel values spanning the full int32 range",
                     f"ran; finite maps, segmentation Dice {dice:.3f} with the original's, "
                     f"{other['lesion_volume_ml']:.1f} mL vs {summary['lesion_volume_ml']:.1f} mL")
