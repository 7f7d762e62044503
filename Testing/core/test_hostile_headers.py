"""Volume headers and paths that would make the readers do what the user never asked: read files
outside the input's folder (NRRD ``data file``, MetaImage ``ElementDataFile``), block on a pipe,
spend hours on impossible geometry, allocate gigabytes, stack a broken DICOM series, abort the
process on a file name that is not UTF-8, or blame the scan for a bad mask. Each is refused in
one line before any heavy work, or handled correctly.

Every case is recorded for docs/reliability.md (scripts/reliability_report.py).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import SimpleITK as sitk
from cli_runs import LIBRARY_ROOT, REPO, assert_ok, read_json, run_cli

from NormativeAnomalyLib.errors import InputVolumeError
from NormativeAnomalyLib.resources import demo_case
from NormativeAnomalyLib.volume_io import read_mask, read_volume, validate_volume
from NormativeAnomalyWeb.files import FileAccess

pytestmark = pytest.mark.reliability

DEMO = demo_case().image
TINY = REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz"
TEMPLATE = REPO / "Resources" / "Templates" / "icbm152_2009c_t1_2mm"
FAST_MODEL = "intensity-t1"  # these cases are about the input, not the network


def refused(result: subprocess.CompletedProcess) -> str:
    """The one line a refused run printed (exit 1)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("normative-anomaly: error:"), result.stderr
    assert "internal error" not in lines[0]
    return lines[0]


def run(input_path, out: Path, *extra, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_cli("run", input_path, "--out", out, "--model", FAST_MODEL, "--quiet", *extra, timeout=timeout)


def demo_image() -> sitk.Image:
    """The demo's voxels and geometry without its NIfTI fields (which MetaImage cannot store)."""
    demo = sitk.ReadImage(str(DEMO))
    image = sitk.GetImageFromArray(sitk.GetArrayFromImage(demo))
    image.CopyInformation(demo)
    return image


# --- Data files a header names ---------------------------------------------------------------


def _numbers(values) -> str:
    return " ".join(f"{value:g}" for value in values)


def mha_header(data_file: str) -> str:
    """A MetaImage header of the demo's grid (16-bit voxels) whose data are in ``data_file``."""
    image = demo_image()
    return (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"CompressedData = False\nTransformMatrix = {_numbers(image.GetDirection())}\n"
            f"Offset = {_numbers(image.GetOrigin())}\nElementSpacing = {_numbers(image.GetSpacing())}\n"
            f"DimSize = {_numbers(image.GetSize())}\nElementType = MET_SHORT\nElementDataFile = {data_file}\n")


def nrrd_header(data_file: str, newline: str = "\n") -> str:
    """An NRRD header of the demo's grid (16-bit voxels, LPS) whose data are in ``data_file``."""
    image = demo_image()
    direction = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    axes = " ".join("(" + ",".join(f"{v:g}" for v in direction[:, axis]) + ")" for axis in range(3))
    lines = ["NRRD0004", "type: short", "dimension: 3", "space: left-posterior-superior",
             f"sizes: {_numbers(image.GetSize())}", f"space directions: {axes}", "kinds: domain domain domain",
             "endian: little", "encoding: raw", "space origin: (" + ",".join(f"{v:g}" for v in image.GetOrigin()) + ")",
             f"data file: {data_file}"]
    return newline.join(lines) + newline


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """(shared, secret): the folder a header is given in, and beside it one it must not read from,
    holding the demo's voxels as raw data files (secret/x.raw, secret/y.raw)."""
    shared, secret = tmp_path / "shared", tmp_path / "secret"
    shared.mkdir()
    secret.mkdir()
    voxels = sitk.GetArrayFromImage(demo_image()).astype("<i2").tobytes()
    (secret / "x.raw").write_bytes(voxels)
    (secret / "y.raw").write_bytes(voxels)
    return shared, secret


def _hidden_data_file(shared: Path, secret: Path) -> str:
    """MetaIO takes a name without '=' as a field whose value is after the next '=', here on the
    ElementDataFile = LOCAL line; the second ElementDataFile, the one it reads, names the secret."""
    header = mha_header(f"LOCAL\nElementDataFile = {secret / 'x.raw'}")
    return header.replace("ElementDataFile = LOCAL", "Comment\nElementDataFile = LOCAL")


def _link_out(shared: Path, secret: Path) -> str:
    (shared / "link.raw").symlink_to(secret / "y.raw")
    return nrrd_header("link.raw")


# (header file name, its text from (shared, secret), a word of the refusal, description)
OUTSIDE = [
    pytest.param("abs.mha", lambda sh, se: mha_header(str(se / "x.raw")), "outside the header's folder",
                 "MetaImage .mha whose ElementDataFile is an absolute path elsewhere", id="mha-absolute"),
    pytest.param("rel.mha", lambda sh, se: mha_header("../secret/x.raw"), "outside the header's folder",
                 "MetaImage .mha whose ElementDataFile is ../ (relative, out of the folder)", id="mha-relative"),
    pytest.param("pair.mhd", lambda sh, se: mha_header("../secret/x.raw"), "outside the header's folder",
                 "detached MetaImage .mhd whose data file is ../", id="mhd-detached"),
    pytest.param("list.mhd", lambda sh, se: mha_header("LIST 3D\n../secret/x.raw"), "outside the header's folder",
                 "MetaImage ElementDataFile = LIST naming a file out of the folder", id="mha-list"),
    pytest.param("pattern.mhd", lambda sh, se: mha_header("../secret/x%d.raw 1 1 1"), "numbered pattern",
                 "MetaImage ElementDataFile as a numbered pattern (%d)", id="mha-pattern"),
    pytest.param("hidden.mhd", _hidden_data_file, "not 'Name = value'",
                 "MetaImage header whose line without '=' makes MetaIO skip 'ElementDataFile = LOCAL' and read a "
                 "second ElementDataFile elsewhere", id="mha-hidden-data-file"),
    pytest.param("abs.nrrd", lambda sh, se: nrrd_header(str(se / "y.raw")), "outside the header's folder",
                 "NRRD .nrrd whose data file is an absolute path elsewhere", id="nrrd-absolute"),
    pytest.param("rel.nrrd", lambda sh, se: nrrd_header("../secret/y.raw"), "outside the header's folder",
                 "NRRD .nrrd whose data file is ../", id="nrrd-relative"),
    pytest.param("pair.nhdr", lambda sh, se: nrrd_header("../secret/y.raw"), "outside the header's folder",
                 "detached NRRD .nhdr whose data file is ../", id="nhdr-detached"),
    pytest.param("mac.nhdr", lambda sh, se: nrrd_header("../secret/y.raw", newline="\r"),
                 "outside the header's folder", "detached NRRD .nhdr with old Mac (CR) line ends", id="nhdr-cr"),
    pytest.param("list.nhdr", lambda sh, se: nrrd_header("LIST 3\n../secret/y.raw"), "outside the header's folder",
                 "NRRD data file: LIST naming a file out of the folder", id="nrrd-list"),
    pytest.param("pattern.nhdr", lambda sh, se: nrrd_header("../secret/y%03d.raw 1 116 1 2"), "numbered pattern",
                 "NRRD data file as a numbered pattern (%03d min max step)", id="nrrd-pattern"),
    pytest.param("stdin.nhdr", lambda sh, se: nrrd_header("-"), "standard input",
                 "NRRD data file '-' (standard input)", id="nrrd-stdin"),
    pytest.param("link.nhdr", _link_out, "outside the header's folder",
                 "NRRD data file in the folder that is a link leading out of it", id="nrrd-link-out"),
]


@pytest.mark.parametrize("name, header, keyword, description", OUTSIDE)
def test_header_naming_data_outside_its_folder_is_refused(name, header, keyword, description, folders,
                                                          reliability_case):
    shared, secret = folders
    path = shared / name
    path.write_text(header(shared, secret))
    with pytest.raises(InputVolumeError, match=keyword) as error:
        read_volume(path)
    assert "\n" not in str(error.value)
    reliability_case("input volume", description, f"refused before reading: {error.value}")


@pytest.mark.parametrize("suffix, kind", [(".mnc", "MINC"), (".h5", "HDF5")])
def test_formats_whose_links_cannot_be_checked_are_refused(suffix, kind, tmp_path, reliability_case):
    """HDF5 (and MINC 2, built on it) can link to datasets in other files, anywhere."""
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(demo_image(), str(path))
    with pytest.raises(InputVolumeError, match=f"in the {kind} format") as error:
        read_volume(path)
    reliability_case("input volume", f"a {kind} volume ({suffix}: its links to other files cannot be checked)",
                     f"refused: {error.value}")


def test_detached_headers_with_their_data_beside_them_are_read(folders):
    shared, secret = folders
    (shared / "sub").mkdir()
    shutil.copy(secret / "x.raw", shared / "x.raw")
    shutil.copy(secret / "y.raw", shared / "sub" / "y.raw")
    (shared / "x.mhd").write_text(mha_header("x.raw"))
    (shared / "y.nhdr").write_text(nrrd_header("sub/y.raw"))
    (shared / "list.nhdr").write_text(nrrd_header("LIST 3\nsub/y.raw"))
    expected = sitk.GetArrayFromImage(demo_image())
    for name in ("x.mhd", "y.nhdr", "list.nhdr"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(shared / name)), expected)


def test_cli_input_and_mask_read_no_data_file_outside_their_folder(folders, tmp_path, reliability_case):
    shared, secret = folders
    (shared / "scan.mha").write_text(mha_header(str(secret / "x.raw")))
    (shared / "mask.nhdr").write_text(nrrd_header("../secret/y.raw"))
    for who, input_path, extra in (("input", shared / "scan.mha", ()),
                                   ("--mask", DEMO, ("--mask", shared / "mask.nhdr"))):
        line = refused(run(input_path, tmp_path / "out", *extra))
        assert "outside the header's folder" in line and not (tmp_path / "out").exists()
        reliability_case("input volume", f"{who} header whose data file lies outside its folder (CLI)",
                         f"exit 1: {line}")


def test_web_reads_data_files_only_from_the_same_shared_folder(folders, tmp_path, reliability_case):
    shared, secret = folders
    access = FileAccess([shared], tmp_path / "work", max_upload_bytes=20_000_000)
    try:
        (shared / "data").mkdir()
        (shared / "cases").mkdir()
        shutil.copy(secret / "x.raw", shared / "data" / "x.raw")
        (shared / "cases" / "ok.mhd").write_text(mha_header("../data/x.raw"))
        assert access.resolve(shared / "cases" / "ok.mhd") == shared / "cases" / "ok.mhd"  # the same shared folder
        (shared / "abs.mha").write_text(mha_header(str(secret / "x.raw")))
        (shared / "rel.nhdr").write_text(nrrd_header("../secret/y.raw"))
        for name in ("abs.mha", "rel.nhdr"):
            with pytest.raises(InputVolumeError, match="outside the folder this server shares") as typed:
                access.resolve(shared / name)
            reliability_case("web app", f"open a shared {name} whose header names a data file outside the shared "
                             "folder", f"refused before reading: {typed.value}")
        with pytest.raises(InputVolumeError, match="outside its upload") as uploaded:
            access.save_upload("abs.mha", mha_header(str(secret / "x.raw")).encode())
        assert not any(access.uploads.iterdir())  # the refused upload is not kept
        # One upload cannot read another's voxels: the first is a complete .mha, the second only a header.
        first = access.save_upload("first.mha", mha_header("LOCAL").encode() + (secret / "x.raw").read_bytes())
        stealer = mha_header(f"../{first.parent.name}/first.mha").replace("ElementType",
                                                                          "HeaderSize = -1\nElementType")
        with pytest.raises(InputVolumeError, match="outside its upload") as other_upload:
            access.save_upload("steal.mha", stealer.encode())
        assert [path.name for path in access.uploads.rglob("*.mha")] == ["first.mha"]
        assert access.resolve(first) == first
    finally:
        access.close()
    reliability_case("web app", "upload a .mha whose ElementDataFile is an absolute server path",
                     f"refused, nothing kept: {uploaded.value}")
    reliability_case("web app", "upload a .mha header reading another upload's voxels (../upload-x/...)",
                     f"refused, nothing kept: {other_upload.value}")


def test_web_session_reads_a_header_with_its_data_elsewhere_in_the_shared_folder(folders, tmp_path):
    """What the page loads goes through the same rule: a data file in another sub-folder of the
    same shared folder is read, one outside it is not (and the loaded input stays)."""
    pytest.importorskip("trame_slicer", reason="the web requirements are not installed")
    from NormativeAnomalyLib.mrml.scene import create_scene
    from NormativeAnomalyWeb.session import AnalysisSession

    shared, secret = folders
    (shared / "data").mkdir()
    (shared / "cases").mkdir()
    shutil.copy(secret / "x.raw", shared / "data" / "x.raw")
    (shared / "cases" / "ok.mhd").write_text(mha_header("../data/x.raw"))
    (shared / "abs.mha").write_text(mha_header(str(secret / "x.raw")))
    access = FileAccess([shared], tmp_path / "work")
    standalone = create_scene()
    session = AnalysisSession(standalone.scene, access)
    try:
        volume = session.load(shared / "cases" / "ok.mhd")
        assert volume.GetImageData().GetDimensions() == (116, 140, 116)
        with pytest.raises(InputVolumeError, match="outside the folder this server shares"):
            session.load(shared / "abs.mha")
        assert session.input_volume is volume
    finally:
        session.close()
        standalone.close()
        access.close()


# --- Files that are not files, names that are not UTF-8 ------------------------------------------


def test_web_refuses_a_shared_file_whose_name_is_not_utf8(tmp_path, reliability_case):
    """The scene (VTK) takes UTF-8 names only: such a file is neither listed nor opened (it raised a
    UnicodeEncodeError past the page's error line)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    odd = _not_utf8(shared, b"t\xeate.nii.gz")
    shutil.copy(TINY, odd)
    access = FileAccess([shared], tmp_path / "work")
    try:
        assert not [choice for choice in access.volumes() if choice.path.parent == shared]
        with pytest.raises(InputVolumeError, match="not UTF-8") as error:
            access.resolve(odd)
        assert "\n" not in str(error.value)
    finally:
        access.close()
    reliability_case("web app", "open a shared file whose name is not UTF-8 (Latin-1 bytes)",
                     f"not listed; refused: {error.value}")




@pytest.mark.parametrize("where", ["input", "mask", "data file"])
def test_a_pipe_is_refused_without_blocking(where, tmp_path, reliability_case):
    pipe = tmp_path / ("pipe.raw" if where == "data file" else "pipe.nii.gz")
    os.mkfifo(pipe)
    if where == "input":
        args = (pipe,)
    elif where == "mask":
        args = (DEMO, "--mask", pipe)
    else:
        (tmp_path / "scan.nhdr").write_text(nrrd_header("pipe.raw"))
        args = (tmp_path / "scan.nhdr",)
    line = refused(run(args[0], tmp_path / "out", *args[1:], timeout=120))
    assert "not a regular file" in line
    reliability_case("input volume", f"a named pipe (FIFO) as the {where}", f"exit 1 at once: {line}")


def _cli_in_child(code: str, *args) -> subprocess.CompletedProcess:
    """Python ``code`` in a fresh interpreter (SimpleITK aborted the whole process on some names)."""
    env = dict(os.environ, PYTHONPATH=str(LIBRARY_ROOT))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", env=env, timeout=300)


def _not_utf8(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


def test_file_names_that_are_not_utf8_are_read(tmp_path, template_t1_path, reliability_case):
    """A scan and mask named in another system's encoding (Latin-1 bytes): the run goes through."""
    scan, mask = _not_utf8(tmp_path, b"t\xeate\xff.nii.gz"), _not_utf8(tmp_path, b"cerveau\xe9.nii.gz")
    shutil.copy(template_t1_path, scan)
    shutil.copy(TEMPLATE / "brain_mask.nii.gz", mask)
    before = {path: path.read_bytes() for path in (scan, mask)}
    result = run(scan, tmp_path / "out", "--mask", mask, "--registered")
    assert_ok(result)
    assert result.stderr.strip() == ""
    assert read_json(tmp_path / "out" / "run.json")["lesion_count"] >= 0
    assert all(path.read_bytes() == content for path, content in before.items())
    reliability_case("input volume", "input and --mask file names that are not UTF-8 (b't\\xeate\\xff.nii.gz')",
                     "ran; outputs written, nothing on stderr")


def test_dicom_folder_and_batch_folder_with_names_that_are_not_utf8(tmp_path, reliability_case):
    cohort = tmp_path / "cohort"
    written = write_dicom_series(cohort / "series", [2.0 * k for k in range(25)])
    os.rename(written / "slice003.dcm", _not_utf8(written, b"coupe\xe9003.dcm"))  # renamed: ITK cannot write it
    series = _not_utf8(cohort, b"s\xe9rie")
    os.rename(written, series)
    shutil.copy(TINY, cohort / "tiny.nii.gz")
    read = _cli_in_child("import sys; from NormativeAnomalyLib.volume_io import read_volume; "
                         "print(read_volume(sys.argv[1]).GetSize())", series)
    assert read.returncode == 0 and read.stdout.strip() == "(33, 41, 25)" and read.stderr == "", read.stderr
    cases = _cli_in_child("import sys; from NormativeAnomalyLib.batch import read_cases; "
                          "print(len(read_cases(sys.argv[1])))", cohort)
    assert cases.returncode == 0 and cases.stdout.strip() == "2", cases.stderr
    reliability_case("input volume", "a DICOM series folder and one of its files named in Latin-1 (not UTF-8)",
                     "read: 33x41x25, nothing on stderr")
    reliability_case("batch", "a cohort folder holding a DICOM folder named in Latin-1 (not UTF-8)",
                     "both cases listed; the process no longer aborts")


# --- Geometry and sizes no scan has --------------------------------------------------------------


def _mha_with(folder: Path, field: str, value: str) -> Path:
    from test_hostile_volumes import _mha_with

    return _mha_with(folder, "scan.mha", field, value)


def test_astronomical_origin_is_refused_before_registration(tmp_path, reliability_case):
    """An origin of 1e150 mm kept registration busy for good (Ctrl-C and SIGTERM ignored)."""
    line = refused(run(_mha_with(tmp_path, "Offset", "1e150 0 0"), tmp_path / "out", timeout=120))
    assert "origin" in line
    reliability_case("input volume", "origin at 1e150 mm (MHA)", f"exit 1 at once: {line}")


def _nrrd_with(folder: Path, field: str, value: str) -> Path:
    """The demo as a detached NRRD with one header field rewritten."""
    path = folder / "scan.nhdr"
    (folder / "scan.raw").write_bytes(sitk.GetArrayFromImage(demo_image()).astype("<i2").tobytes())
    lines = [f"{field}: {value}" if line.startswith(f"{field}:") else line
             for line in nrrd_header("scan.raw").splitlines()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _nifti_origin(folder: Path, origin: float) -> Path:
    image = demo_image()
    image.SetOrigin((origin, 0.0, 0.0))
    sitk.WriteImage(image, str(folder / "scan.nii.gz"))  # float32 fields: the origin becomes infinite
    return folder / "scan.nii.gz"


GEOMETRY = [
    pytest.param(lambda f: _nrrd_with(f, "space origin", "(1e60,0,0)"), "origin",
                 "origin at 1e60 mm (NRRD; registration gave up after 2 s)", id="far-origin"),
    pytest.param(lambda f: _nifti_origin(f, 1e60), "not finite", "origin 1e60 mm in a NIfTI (infinite in its "
                 "float32 fields; ITK made it 0)", id="nifti-infinite-origin"),
    pytest.param(lambda f: _mha_with(f, "ElementSpacing", "1e-9 1e-9 1e-9"), "spacing", "voxel spacing 1e-9 mm",
                 id="tiny-spacing"),
    pytest.param(lambda f: _mha_with(f, "ElementSpacing", "0 1.5 1.5"), "spacing", "voxel spacing 0 mm",
                 id="zero-spacing"),
    pytest.param(lambda f: _mha_with(f, "ElementSpacing", "1e5 1e5 1e5"), "spacing",
                 "voxel spacing 1e5 mm (a field of view of 14,000 km)", id="huge-spacing"),
    pytest.param(lambda f: _mha_with(f, "TransformMatrix", "0 0 0 0 0 0 0 0 0"), "singular",
                 "all-zero direction matrix (MHA)", id="zero-direction"),
    pytest.param(lambda f: _mha_with(f, "TransformMatrix", "-1 0 0 -0.15 -1 0 0 0 1"), "not orthonormal",
                 "sheared direction matrix (MHA)", id="sheared"),
]


@pytest.mark.parametrize("build, keyword, description", GEOMETRY)
def test_impossible_geometry_is_refused_from_the_header(build, keyword, description, tmp_path, reliability_case):
    path = build(tmp_path)
    with pytest.raises(InputVolumeError, match=keyword) as error:
        read_volume(path)
    assert "\n" not in str(error.value)
    reliability_case("input volume", description, f"refused before reading the voxels: {error.value}")


def test_sheared_volume_from_memory_is_refused(reliability_case):
    """The Slicer module hands over images in memory: the same check applies."""
    image = demo_image()
    image.SetDirection((np.asarray(image.GetDirection()).reshape(3, 3)
                        @ np.array([[1, 0.15, 0], [0, 1, 0], [0, 0, 1]])).ravel().tolist())
    with pytest.raises(InputVolumeError, match="not orthonormal") as error:
        validate_volume(image, name="volume 'demo'")
    reliability_case("Slicer module", "a sheared volume node (non-orthogonal IJK-to-RAS)", f"refused: {error.value}")


def test_mask_header_over_the_size_limit_is_refused_unread(tmp_path, reliability_case):
    """A 200-byte --mask header over a big sparse data file: refused from the header."""
    header = tmp_path / "mask.nhdr"
    header.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 600 600 600\nencoding: raw\n"
                      "data file: mask.raw\n")
    with open(tmp_path / "mask.raw", "wb") as data:
        data.truncate(600**3)
    line = refused(run(DEMO, tmp_path / "out", "--mask", header))
    assert "over the limit" in line and line.count("mask") >= 1
    reliability_case("input volume", "--mask header of 600^3 voxels over a sparse 216 MB file",
                     f"exit 1 from the header: {line}")


def _nifti_claiming_extensions(path: Path, size: int) -> Path:
    """The demo's NIfTI header saying its extensions take ``size`` bytes, then nothing: whatever
    read the extensions would first allocate them."""
    raw = bytearray(gzip.decompress(DEMO.read_bytes())[:348])
    raw[108:112] = struct.pack("<f", 352 + size)
    path.write_bytes(gzip.compress(bytes(raw) + bytes([1, 0, 0, 0]) + struct.pack("<ii", size, 6) + bytes(64)))
    return path


def test_nifti_header_extensions_are_capped_before_reading(tmp_path, reliability_case):
    path = _nifti_claiming_extensions(tmp_path / "scan.nii.gz", 2**30)
    with pytest.raises(InputVolumeError, match="NIfTI header extensions") as error:
        read_volume(path)
    with pytest.raises(InputVolumeError, match="NIfTI header extensions"):
        read_mask(path, demo_image())
    reliability_case("input volume", "a .nii.gz whose header declares 1 GiB of extensions",
                     f"refused from the first 544 bytes: {error.value}")


def test_a_nifti_extension_nibabel_warns_about_leaves_stderr_clean(tmp_path, reliability_case):
    """An extension size that is not a multiple of 16: ITK reads the file, nibabel warned on stderr."""
    raw = bytearray(gzip.decompress(DEMO.read_bytes()))
    extension = struct.pack("<ii", 20, 6) + b'{"a":1}' + bytes(5) + struct.pack("<ii", 12, 6) + b"x" + bytes(3)
    header = raw[:348] + bytes([1, 0, 0, 0]) + extension
    header[108:112] = struct.pack("<f", len(header))
    path = tmp_path / "odd_extension.nii.gz"
    path.write_bytes(gzip.compress(bytes(header + raw[352:]), 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_volume(path)
    assert image.GetSize() == (116, 140, 116) and not caught, [str(w.message) for w in caught]
    reliability_case("input volume", "NIfTI extension whose size is not a multiple of 16",
                     "read; nibabel's warning no longer printed (stderr stays empty)")


# --- DICOM series ------------------------------------------------------------------------------


def write_dicom_series(folder: Path, positions: Sequence[float]) -> Path:
    """Axial slices of the tiny real T1 (2 mm pixels), one series, slice k at ``positions[k]`` mm."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetArrayFromImage(sitk.Cast(sitk.ReadImage(str(TINY)), sitk.sitkInt16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, z in enumerate(positions):
        image = sitk.GetImageFromArray(volume[k % volume.shape[0]])
        image.SetSpacing((2.0, 2.0))
        for tag, value in {"0020|000e": "1.2.826.0.1.3680043.2.1125.7.1", "0008|0060": "MR",
                           "0020|000d": "1.2.826.0.1.3680043.2.1125.7.2", "0020|0032": f"0\\0\\{z:g}",
                           "0020|0013": str(k + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0008|0018": f"1.2.826.0.1.3680043.2.1125.7.3.{k + 1}"}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    return folder


SERIES = [
    pytest.param([2.0 * k for k in range(25) if k != 12], "1 missing slice", "one slice missing", id="missing"),
    pytest.param(sorted([2.0 * k for k in range(25)] + [24.0]), "duplicated", "one slice duplicated",
                 id="duplicated"),
    pytest.param([2.0 * k + (0.7 if k == 12 else 0) for k in range(25)], "unevenly spaced",
                 "one slice 0.7 mm from its place", id="uneven"),
]


@pytest.mark.parametrize("positions, keyword, description", SERIES)
def test_broken_dicom_series_is_refused(positions, keyword, description, tmp_path, capfd, reliability_case):
    folder = write_dicom_series(tmp_path / "series", positions)
    capfd.readouterr()
    with pytest.raises(InputVolumeError, match=keyword) as error:
        read_volume(folder)
    assert "2 mm apart" in str(error.value) and "\n" not in str(error.value)
    assert capfd.readouterr().err == ""  # ITK's warning is not printed either
    reliability_case("input volume", f"DICOM series with {description}", f"refused: {error.value}")


def test_complete_dicom_series_is_read_quietly(tmp_path, capfd):
    folder = write_dicom_series(tmp_path / "series", [2.0 * k for k in range(25)])
    capfd.readouterr()
    image = read_volume(folder)
    assert image.GetSize() == (33, 41, 25) and image.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    assert capfd.readouterr().err == ""


def test_folder_without_dicom_leaves_only_the_error(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("not an image")
    capfd.readouterr()
    with pytest.raises(InputVolumeError, match="no DICOM series"):
        read_volume(tmp_path)
    assert capfd.readouterr().err == ""  # GDCM's "No Series were found" warning is silenced


# --- A mask that misses the brain ------------------------------------------------------------


def _box_mask(path: Path, corner: int) -> Path:
    demo = sitk.ReadImage(str(DEMO))
    voxels = np.zeros(sitk.GetArrayViewFromImage(demo).shape, np.uint8)
    voxels[:corner, :corner, :corner] = 1
    mask = sitk.GetImageFromArray(voxels)
    mask.CopyInformation(demo)
    sitk.WriteImage(mask, str(path))
    return path


@pytest.mark.parametrize("corner, description", [
    (30, "a --mask box in a corner of the volume, off the brain (the run went through before)"),
    (8, "a --mask of a few voxels off the brain (the input was blamed: 'is this a brain MRI')"),
])
@pytest.mark.slow
def test_mask_that_misses_the_brain_is_blamed(corner, description, tmp_path, reliability_case):
    mask = _box_mask(tmp_path / "mask.nii.gz", corner)
    line = refused(run(DEMO, tmp_path / "out", "--mask", mask))
    assert "brain mask given (--mask)" in line and "brain mri" not in line.lower(), line
    reliability_case("input volume", description, f"exit 1: {line}")


@pytest.mark.reliability
def test_a_data_file_name_with_a_nul_byte_is_refused(tmp_path, reliability_case):
    """Found by the fuzzer: a NUL byte in a MetaImage data file name made path resolution raise."""
    from NormativeAnomalyLib.errors import InputVolumeError
    from NormativeAnomalyLib.volume_io import read_volume

    header = tmp_path / "nul.mha"
    header.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_FLOAT\n"
                       b"ElementDataFile = da\x00ta.raw\n")
    with pytest.raises(InputVolumeError, match="NUL byte") as refused:
        read_volume(header)
    assert "\n" not in str(refused.value)
    reliability_case("input volume", "a MetaImage header naming a data file with a NUL byte", f"refused: {refused.value}")
