"""Reading and validating input volumes, and writing images atomically.

Every check raises :class:`InputVolumeError` with one line that names the file and the
problem, before any work is done, so bad input never produces confident nonsense. What can
be judged from a header (data files it names, size, geometry, NIfTI extensions) is judged
before the voxels are read, so a hostile header costs neither memory nor time.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError, OutputError, one_line

# A 512^3 float32 volume is 0.5 GB; the pipeline holds a few copies. Larger inputs are
# refused rather than risking the host (Slicer shares this process).
MAX_VOXELS = 512**3
MIN_VOXELS_PER_AXIS = 8
# Geometry no scan has: registration of such a volume runs for hours or never converges.
MAX_COORDINATE_MM = 1e6  # origin and field of view: a kilometre
MIN_SPACING_MM = 1e-3
ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I|: float32 headers are exact to 1e-6
# NIfTI extensions (DICOM fields, JSON sidecars) are kilobytes; the NIfTI library reads them whole.
MAX_NIFTI_EXTENSION_BYTES = 64 * 2**20
MAX_TEXT_HEADER_BYTES = 2**20  # an NRRD or MetaImage header; attached voxels follow it
MAX_SLICE_DEVIATION = 0.01  # a DICOM slice may sit 1% of the spacing away from its uniform place


def read_volume(path: str | os.PathLike, *, name: str = "input", data_root: Path | None = None) -> sitk.Image:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA, ... or a DICOM series folder) as float32.

    Geometry (origin, spacing, direction) is kept as stored. Data files a header names must lie
    in ``data_root`` (default: the header's own folder).
    """
    path = Path(path)
    label = f"{name} {shown(path)}"
    if path.is_dir():
        return validate_volume(_read_dicom_series(path, label), name=label)
    return validate_volume(_read_image_file(path, name, label, data_root), name=label)


def read_mask(path: str | os.PathLike, reference: sitk.Image) -> sitk.Image:
    """Read a brain mask and bring it onto ``reference``'s grid (nearest neighbour)."""
    path = Path(path)
    label = f"mask {shown(path)}"
    if path.is_dir():
        raise InputVolumeError(f"{label} is a folder; give the mask as one volume file")
    mask = _read_image_file(path, "mask", label)
    mask = sitk.Resample(
        sitk.Cast(mask > 0, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    if not sitk.GetArrayViewFromImage(mask).any():
        raise InputVolumeError(f"{label} has no voxel inside the input volume")
    return mask


def shown(path: str | os.PathLike) -> str:
    """A path as one printable line: a newline or undecodable byte in a name would otherwise
    break the one-line message."""
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)[1:-1]


def _read_image_file(path: Path, name: str, label: str, data_root: Path | None = None) -> sitk.Image:
    """Every file-level check, the header, then the voxels."""
    _check_regular_file(path, name, label)
    reader_name = _reader_of(path, label)
    where = "the header's folder" if data_root is None else "the folder it may read from"
    data_files = _check_data_files(path, reader_name, data_root, label, where)
    if reader_name == "NiftiImageIO":
        _check_nifti_header(path, label)
    with _itk_file_name(path, data_files, label) as itk_name, _quiet():
        reader = sitk.ImageFileReader()
        reader.SetFileName(itk_name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise InputVolumeError(f"{label} cannot be read as an image: {_first_line(error)}") from None
        _check_header(reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(), label)
        _check_geometry(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection(), reader.GetSize(), label)
        try:
            image = reader.Execute()
        except RuntimeError as error:
            raise InputVolumeError(f"{label} is corrupt or truncated: {_first_line(error)}") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(path, label)
    return image


def _check_regular_file(path: Path, name: str, label: str) -> None:
    """Opening a pipe, device or socket blocks or never ends, and ignores Ctrl-C."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputVolumeError(f"{name} not found: {shown(path)}") from None
    except OSError as error:
        raise InputVolumeError(f"{label} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputVolumeError(f"{label} is not a regular file (a pipe, device or socket); give the volume file")


# --- Data files named in headers --------------------------------------------------------------


class DataFile(NamedTuple):
    written: str  # as the header names it
    path: Path  # the file the reader opens for it
    alias: str | None  # its name next to a renamed header (None: the reader does not join it to the header's folder)


# Readers whose files can name other files that cannot be listed here (HDF5 external links and
# storage, a Stimulate header's data file, Bruker's parameter files two folders up).
UNCHECKED_READERS = {"HDF5ImageIO": "HDF5", "MINCImageIO": "MINC", "StimulateImageIO": "Stimulate",
                     "Bruker2dseqImageIO": "Bruker 2dseq"}


def check_data_files(header: Path, root: Path | None = None, *, label: str | None = None,
                     where: str = "the header's folder") -> list[DataFile]:
    """The data files that reading ``header`` opens (NRRD ``data file``, MetaImage
    ``ElementDataFile``, the image of an Analyze/NIfTI pair), each checked to resolve (links
    followed) inside ``root`` (default: the header's own folder) and to be a regular file: a
    header could otherwise load any file on the machine as the volume. Forms that cannot be
    checked (numbered file patterns, standard input, formats with links) are refused."""
    label = label or shown(header)
    _check_regular_file(header, label, label)
    return _check_data_files(header, _reader_of(header, label), root, label, where)


def _check_data_files(header: Path, reader: str, root: Path | None, label: str, where: str) -> list[DataFile]:
    if reader in UNCHECKED_READERS:
        raise InputVolumeError(f"{label} is in the {UNCHECKED_READERS[reader]} format, whose links to other files "
                               "cannot be checked; convert it to NIfTI (.nii.gz), NRRD or MetaImage first")
    folder = (root or header.absolute().parent).resolve()
    data_files = _data_files(header, reader, label)
    for data in data_files:
        named = f"the data file {shown(data.written)!r}"
        if not data.path.resolve().is_relative_to(folder):
            raise InputVolumeError(f"{label} names {named} in its header, outside {where}; "
                                   "only data files inside it are read")
        if data.path.exists() and not data.path.is_file():
            raise InputVolumeError(f"{label} names {named} in its header, which is not a regular file "
                                   "(a folder, pipe, device or socket)")
    return data_files


def _reader_of(path: Path, label: str) -> str:
    """The ITK reader that will read ``path`` (it decides by name and content), or ''."""
    with _itk_file_name(path, [], label) as itk_name, _quiet():
        return sitk.ImageFileReader().GetImageIOFromFileName(itk_name)


def _data_files(header: Path, reader: str, label: str) -> list[DataFile]:
    if reader == "NiftiImageIO":
        return _pair_files(header)
    if reader not in ("NrrdImageIO", "MetaImageIO"):
        return []  # a single-file format
    head, complete = _leading_text(header)
    if reader == "NrrdImageIO":
        names = _nrrd_data_files(head, complete, label)
        return [_data_file(header, name, name[:1] == b"/" or name[1:2] == b":") for name in names]
    names = _metaimage_data_files(head, complete, label)
    return [_data_file(header, name, name[:1] in (b"/", b"~")) for name in names]


def _pair_files(header: Path) -> list[DataFile]:
    """An Analyze/NIfTI pair: the NIfTI library reads the header and image files by name, side
    by side (a link among them could lead anywhere)."""
    lower = header.name.lower()
    suffix = next((s for s in (".nii.gz", ".hdr.gz", ".img.gz", ".nii", ".hdr", ".img") if lower.endswith(s)), "")
    nifti = _nifti_header(_leading_bytes(header, 544))
    if suffix in (".nii", ".nii.gz") and not (nifti is not None and nifti["magic"] in (b"ni1", b"ni2")):
        return []  # a single .nii file holds its own voxels
    base = header.name[: len(header.name) - len(suffix)]
    siblings = []
    for sibling in (".hdr", ".hdr.gz", ".img", ".img.gz", ".HDR", ".IMG"):
        path = header.parent / (base + sibling)
        if path != header and os.path.lexists(path):
            siblings.append(DataFile(path.name, path, "volume" + sibling))
    return siblings


def _data_file(header: Path, name: bytes, absolute: bool) -> DataFile:
    written = os.fsdecode(name)
    if absolute:  # as the reader takes it: "/x" as is, "C:x" or "~x" relative to the working folder
        return DataFile(written, Path(written).absolute(), None)
    return DataFile(written, header.absolute().parent / written, written)


def _leading_text(path: Path) -> tuple[bytes, bool]:
    """The file's first bytes, and whether that is all of it."""
    with open(path, "rb") as stream:
        head = stream.read(MAX_TEXT_HEADER_BYTES + 1)
    return head[:MAX_TEXT_HEADER_BYTES], len(head) <= MAX_TEXT_HEADER_BYTES


def _too_long(label: str) -> InputVolumeError:
    return InputVolumeError(f"{label} has a header that does not end within {MAX_TEXT_HEADER_BYTES:,} bytes; "
                            "it is not a volume header this tool reads")


def _nrrd_data_files(head: bytes, complete: bool, label: str) -> list[bytes]:
    """NRRD as teem reads it: lines end in \\n, \\r or \\r\\n; the header ends at an empty line;
    ``data file: NAME``, a ``%d`` pattern, or ``data file: LIST`` and then every further line a
    name. Field names are matched loosely (any case, spaces): more is checked, never less."""
    lines = re.split(rb"\r\n|\r|\n", head)
    names: list[bytes] = []
    for number, line in enumerate(lines[1:], start=1):
        if not line:
            return _checkable(names, label)
        key, separator, value = line.partition(b": ")
        if not separator or key.lower().replace(b" ", b"").replace(b"_", b"") != b"datafile":
            continue
        value = value.lstrip(b" \t")
        if not value.startswith(b"LIST"):
            names.append(value)
        elif complete:
            return _checkable(names + [name for name in lines[number + 1:] if name], label)
        else:
            raise _too_long(label)
    if not complete:
        raise _too_long(label)
    return _checkable(names, label)


def _metaimage_data_files(head: bytes, complete: bool, label: str) -> list[bytes]:
    """MetaImage as MetaIO reads it: ``Name = value`` records up to ``ElementDataFile``, whose
    value is LOCAL (the voxels follow), a file (``.gz`` and ``.Z`` tried too), a ``%`` pattern,
    or LIST and then every further line a name. MetaIO takes a record's value from the next
    line when its own is empty; only headers with one record a line are accepted, so that the
    record read here is the one MetaIO reads."""
    lines = head.split(b"\n")
    for number, line in enumerate(lines):
        if not line.strip() or (number == len(lines) - 1 and not complete):
            continue
        cut = min((i for i in (line.find(b"="), line.find(b":")) if i >= 0), default=-1)
        value = line[cut + 1:].lstrip(b"=: \t\r\x0b\x0c") if cut >= 0 else b""
        if not value.strip():
            raise InputVolumeError(f"{label} has a header line that is not 'Name = value' "
                                   f"({shown(os.fsdecode(line[:60]))!r}); it is not a MetaImage header this tool reads")
        if line[:cut].strip() != b"ElementDataFile":
            continue
        value = value[:499]  # MetaIO's longest value
        if value.strip() in (b"LOCAL", b"Local", b"local"):
            return []
        if value.startswith(b"LIST"):
            if not complete:
                raise _too_long(label)
            return _checkable([name for name in lines[number + 1:] if name.strip()], label)
        names = _checkable([value], label)
        return names + [name + suffix for name in names for suffix in (b".gz", b".Z")]
    if not complete:
        raise _too_long(label)
    return []


def _checkable(names: list[bytes], label: str) -> list[bytes]:
    for name in names:
        if b"%" in name:  # a printf pattern the reader expands: its files cannot be listed safely
            raise InputVolumeError(f"{label} names its data files by a numbered pattern "
                                   f"({shown(os.fsdecode(name))!r}) in its header, which cannot be checked; "
                                   "save the volume as one file (.nrrd, .mha or .nii.gz)")
        if name.strip() == b"-":
            raise InputVolumeError(f"{label} reads its data from standard input ('-'); "
                                   "save the volume as one file (.nrrd, .mha or .nii.gz)")
    # Readers keep or trim the spaces and unprintable bytes around a name: every form must be inside.
    forms = (form for name in names
             for form in (name, name.strip(), name.rstrip(bytes(range(33)) + bytes(range(127, 256)))))
    return list(dict.fromkeys(form for form in forms if form))


@contextmanager
def _itk_file_name(path: Path, data_files: list[DataFile], label: str) -> Iterator[str]:
    """The name to give ITK for ``path``. SimpleITK aborts the whole process on a name that is
    not UTF-8 (bytes from another system's encoding); such a file is read through a link with a
    plain name in a temporary folder, next to links to the data files its header names."""
    if _is_utf8(str(path)):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="normative-anomaly-") as folder:
        alias = Path(folder) / ("volume" + _suffix(path))
        try:
            os.symlink(path.absolute(), alias)
            for data in data_files:
                if data.alias is not None and os.path.lexists(data.path):
                    _link_inside(Path(folder), data.alias, data.path)
        except (OSError, ValueError):
            raise InputVolumeError(f"{label} cannot be read under its name (it is not UTF-8); "
                                   "rename it with plain characters") from None
        yield str(alias)


def _link_inside(folder: Path, name: str, target: Path) -> None:
    link = Path(os.path.normpath(folder / name))
    if not link.is_relative_to(folder):
        raise ValueError(name)
    if os.path.lexists(link):
        return  # another spelling of the same name
    os.makedirs(folder / Path(name).parent, exist_ok=True)  # each folder a "sub/../x" passes through
    os.symlink(target.resolve(), link)


def _suffix(path: Path) -> str:
    """The suffix ITK chooses its reader by, in plain characters."""
    lower = path.name.lower()
    suffix = "".join(path.suffixes[-2:]) if lower.endswith((".nii.gz", ".hdr.gz", ".img.gz")) else path.suffix
    return suffix.encode("utf-8", "replace").decode("utf-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- The NIfTI header, before ITK or nibabel read it -------------------------------------------


def _check_nifti_header(path: Path, label: str) -> None:
    """Extensions are read whole by the NIfTI library and nibabel (a 3 MB .nii.gz can hold a
    1 GiB one), and ITK turns a non-finite origin into 0 with a warning: both are checked
    from the header's first bytes."""
    header_path = _pair_header(path)
    block = _leading_bytes(header_path, 544)
    header = _nifti_header(block)
    if header is None:
        return  # not a NIfTI/Analyze header: ITK says what is wrong
    size = int(header["sizeof_hdr"])
    if header["magic"] in (b"n+1", b"n+2"):  # one file: extensions lie between the header and vox_offset
        offset = float(header["vox_offset"])
        if not np.isfinite(offset) or offset < 0:
            raise InputVolumeError(f"{label} has a corrupt NIfTI header: vox_offset is {offset:g}")
        extensions = offset - size - 4
    else:  # a pair: extensions fill the rest of the header file
        extensions = _stream_length(header_path, size + 4 + MAX_NIFTI_EXTENSION_BYTES + 1) - size - 4
    if extensions > MAX_NIFTI_EXTENSION_BYTES:
        raise InputVolumeError(f"{label} has {extensions / 2**20:,.0f} MB of NIfTI header extensions, over the "
                               f"limit of {MAX_NIFTI_EXTENSION_BYTES / 2**20:.0f} MB; strip them (e.g. with "
                               "nibabel: img.header.extensions.clear())")
    _check_nifti_geometry(header, label)


def _check_nifti_geometry(header, label: str) -> None:
    fields = ["pixdim"]
    if int(header["qform_code"]) > 0:
        fields += ["quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"]
    if int(header["sform_code"]) > 0:
        fields += ["srow_x", "srow_y", "srow_z"]
    values = {field: np.atleast_1d(np.asarray(header[field], dtype=np.float64)) for field in fields}
    values["pixdim"] = values["pixdim"][1:4]  # the spatial spacings; pixdim[0] is qfac
    bad = [field for field, value in values.items() if not np.isfinite(value).all()]
    if bad:
        raise InputVolumeError(f"{label} has a corrupt NIfTI header: {', '.join(bad)} not finite "
                               "(an origin or spacing too large for its float32 fields?)")


def _pair_header(path: Path) -> Path:
    """For the image file of a pair, its header file."""
    lower = path.name.lower()
    for suffix in (".img", ".img.gz"):
        if lower.endswith(suffix):
            base = path.name[: -len(suffix)]
            for header_suffix in (".hdr", ".hdr.gz", ".HDR"):
                if (path.parent / (base + header_suffix)).is_file():
                    return path.parent / (base + header_suffix)
    return path


def _nifti_header(block: bytes):
    """nibabel's view of a NIfTI-1/2 or Analyze header from its bytes (no extensions read), or None."""
    import nibabel

    for endian in ("<", ">"):
        size = int.from_bytes(block[:4], "little" if endian == "<" else "big") if len(block) >= 4 else 0
        if size in (348, 540) and len(block) >= size:
            header_class = nibabel.Nifti1Header if size == 348 else nibabel.Nifti2Header
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    return header_class(binaryblock=block[:size], endianness=endian, check=False)
                except Exception:  # nibabel raises several types for a malformed block
                    return None
    return None


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as stream:
        compressed = stream.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _leading_bytes(path: Path, count: int) -> bytes:
    try:
        with _open_maybe_gzip(path) as stream:
            return stream.read(count)
    except (OSError, EOFError):  # a damaged file: the readers that follow say so
        return b""


def _stream_length(path: Path, limit: int) -> int:
    """The (decompressed) length of the file, counted up to ``limit``."""
    total = 0
    try:
        with _open_maybe_gzip(path) as stream:
            while total < limit and (block := stream.read(min(1 << 20, limit - total))):
                total += len(block)
    except (OSError, EOFError):
        pass
    return total


def _check_nifti_data(path: Path, name: str) -> None:
    """ITK's NIfTI reader pads a truncated file with zeros and turns NaN/Inf into 0 without a
    word; nibabel reads the same bytes strictly, so both are caught here."""
    import logging

    import nibabel

    nibabel_log = logging.getLogger("nibabel")
    level = nibabel_log.level
    nibabel_log.setLevel(logging.ERROR)  # its header fix-up warnings would print to stderr: ITK read the file
    try:
        with warnings.catch_warnings():  # e.g. on a malformed extension: ITK read the file, one line is enough
            warnings.simplefilter("ignore")
            data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as error:  # nibabel, gzip and zlib raise several types for a cut file
        # nibabel's messages run over several lines ("...\n - could the file be damaged?")
        raise InputVolumeError(f"{name} is corrupt or truncated: {one_line(error)}") from None
    finally:
        nibabel_log.setLevel(level)
    if data.dtype.kind in "fc":
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputVolumeError(f"{name} has {bad:,} NaN or infinite voxels; fix or mask them first")


# --- DICOM series ------------------------------------------------------------------------------


def has_dicom_series(folder: Path) -> bool:
    """Whether ``folder`` holds a DICOM series (safely: no pipe opened, any file name)."""
    try:
        _check_folder_entries(folder, shown(folder))
        with _dicom_folder(folder, shown(folder)) as itk_folder, _quiet():
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(itk_folder))
    except (InputVolumeError, OSError):
        return False


def _read_dicom_series(folder: Path, label: str) -> sitk.Image:
    _check_folder_entries(folder, label)
    with _dicom_folder(folder, label) as itk_folder, _quiet():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(itk_folder)
        if not series_ids:
            raise InputVolumeError(f"{label} is a folder with no DICOM series in it")
        if len(series_ids) > 1:
            raise InputVolumeError(
                f"{label} holds {len(series_ids)} DICOM series; put the one to analyse in a folder of its own"
            )
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(itk_folder, series_ids[0])
        _check_slices(files, label)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as error:
            raise InputVolumeError(f"DICOM series in {label} cannot be read: {_first_line(error)}") from None


def _check_folder_entries(folder: Path, label: str) -> None:
    """The DICOM scanner opens every file in the folder: a pipe there would block it for good."""
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise InputVolumeError(f"{label} cannot be listed: {error.strerror}") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue  # a broken link: the scanner skips it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputVolumeError(f"{label} holds {shown(entry.name)!r}, which is not a regular file "
                                   "(a pipe, device or socket); remove it from the series folder")


@contextmanager
def _dicom_folder(folder: Path, label: str) -> Iterator[str]:
    """The folder name to give GDCM; where it or a file name in it is not UTF-8 (SimpleITK would
    abort the process), a temporary folder of links with plain names to its files."""
    names = [entry.name for entry in os.scandir(folder)]
    if all(_is_utf8(text) for text in [str(folder), *names]):
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="normative-anomaly-dicom-") as links:
        try:
            for number, name in enumerate(sorted(names)):
                if (folder / name).is_file():
                    os.symlink((folder / name).absolute(), Path(links) / f"{number:06d}.dcm")
        except OSError:
            raise InputVolumeError(f"{label} cannot be read under its name (it is not UTF-8); "
                                   "rename it with plain characters") from None
        yield links


class _Slice(NamedTuple):
    size: tuple[int, ...]
    origin: np.ndarray
    direction: np.ndarray


def _check_slices(files: Sequence[str], label: str) -> None:
    """The series reader stacks slices as if evenly spaced (a warning at most): a missing,
    duplicated or displaced slice would put every voxel after it at the wrong place."""
    if len(files) < 2:
        return  # one (multi-frame) file: its own header places its frames
    first = _slice_info(files[0], label)
    if first is None or first.size[2] > 1:
        return  # not slices (a series of volumes): ITK's own checks apply
    _check_header(3, 1, (first.size[0], first.size[1], len(files)), label)  # before reading every slice
    slices = [first] + [_slice_info(name, label) for name in files[1:]]
    if any(s is None or s.size[:2] != first.size[:2] for s in slices):
        raise InputVolumeError(f"{label} mixes slices of different sizes; export the series again")
    if any(np.abs(s.direction[:, :2] - first.direction[:, :2]).max() > ORTHONORMAL_TOLERANCE for s in slices):
        raise InputVolumeError(f"{label} mixes slices of different orientations; export the series again")
    normal = np.cross(first.direction[:, 0], first.direction[:, 1])
    positions = np.sort([float(s.origin @ normal) for s in slices])
    steps = np.diff(positions)
    spacing = float(np.median(steps))
    tolerance = MAX_SLICE_DEVIATION * spacing + 1e-4
    if spacing <= tolerance:
        raise InputVolumeError(f"{label} has its {len(files)} slices at {len(set(np.round(positions, 3)))} "
                               "position(s) (duplicated slices); export the series again")
    if np.abs(steps - spacing).max() <= tolerance:
        return
    duplicated, gaps = int((steps <= tolerance).sum()), steps[steps > spacing + tolerance]
    if duplicated:
        problem = f"{duplicated} duplicated slice(s) at the same position"
    elif gaps.size and (gaps >= 1.5 * spacing).all():
        missing = int(np.round(gaps / spacing).sum() - gaps.size)
        problem = f"{missing} missing slice(s): gaps of {_numbers(np.unique(np.round(gaps, 2)))} mm"
    else:
        problem = f"unevenly spaced slices: {steps.min():.3g} to {steps.max():.3g} mm apart"
    raise InputVolumeError(f"{label} has {problem} where the slices are {spacing:.3g} mm apart; "
                           "export the complete series again (or resample it)")


def _slice_info(name: str, label: str) -> _Slice | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputVolumeError(f"DICOM series in {label} cannot be read: {_first_line(error)}") from None
    if reader.GetDimension() != 3:
        return None
    return _Slice(tuple(reader.GetSize()), np.asarray(reader.GetOrigin(), dtype=np.float64),
                  np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3))


# --- Checks on what a header says --------------------------------------------------------------


def _check_header(dimension: int, components: int, size: tuple[int, ...], name: str) -> None:
    if dimension != 3:
        raise InputVolumeError(f"{name} is {dimension}D; a 3D volume is needed")
    if components != 1:
        raise InputVolumeError(f"{name} has {components} components per voxel; a scalar (grey-level) volume is needed")
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputVolumeError(
            f"{name} is {'x'.join(map(str, size))} voxels; at least {MIN_VOXELS_PER_AXIS} along each axis are needed"
        )
    voxels = int(np.prod(size, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise InputVolumeError(
            f"{name} has {voxels:,} voxels, over the limit of {MAX_VOXELS:,}; resample it to a coarser grid first"
        )


def _check_geometry(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float],
                    size: Sequence[int], name: str) -> None:
    """Geometry no scan has, refused before registration would spend hours on it, and a
    direction that the NIfTI outputs cannot hold (they would lie off the input's grid)."""
    origin, spacing = np.asarray(origin, dtype=np.float64), np.asarray(spacing, dtype=np.float64)
    if not np.isfinite(origin).all() or np.abs(origin).max() > MAX_COORDINATE_MM:
        why = "not finite" if not np.isfinite(origin).all() else f"beyond {MAX_COORDINATE_MM:g} mm"
        raise InputVolumeError(f"{name} has its origin at ({_numbers(origin)}) mm, {why}; "
                               "its header is corrupt: fix the origin")
    extent = spacing * np.asarray(size, dtype=np.float64)
    if not np.isfinite(spacing).all():
        why = "not finite"
    elif spacing.min() < MIN_SPACING_MM:
        why = f"under {MIN_SPACING_MM:g} mm"
    elif extent.max() > MAX_COORDINATE_MM:
        why = f"spanning {extent.max():.3g} mm"
    else:
        why = ""
    if why:
        raise InputVolumeError(f"{name} has a voxel spacing of ({_numbers(spacing)}) mm, {why}; "
                               "its header is corrupt: fix the spacing")
    _check_direction(np.asarray(direction, dtype=np.float64).reshape(3, 3), name)


def _check_direction(direction: np.ndarray, name: str) -> None:
    if not np.isfinite(direction).all():
        raise InputVolumeError(f"{name} has a direction matrix that is not finite (NaN or infinite); "
                               "its header is corrupt")
    determinant = float(np.linalg.det(direction))
    if abs(determinant) < 1e-6:
        raise InputVolumeError(f"{name} has a singular direction matrix (determinant {determinant:.2g}: "
                               "its axes are zero, parallel or unreadable); its header is corrupt")
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > ORTHONORMAL_TOLERANCE:
        raise InputVolumeError(f"{name} has a direction matrix that is not orthonormal (sheared or scaled, "
                               f"off by {deviation:.3g}); resample it onto an orthogonal grid first")


def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{float(value):.4g}" for value in values)


def validate_volume(image: sitk.Image, *, name: str = "input") -> sitk.Image:
    """Check an in-memory image (e.g. from Slicer) and return it as float32."""
    _check_header(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), name)
    _check_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetSize(), name)
    image = sitk.Cast(image, sitk.sitkFloat32)
    voxels = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(voxels)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise InputVolumeError(f"{name} has {bad:,} NaN or infinite voxels; fix or mask them first")
    low, high = float(voxels.min()), float(voxels.max())
    if low == high:
        what = "empty (all zero)" if high == 0 else f"constant (every voxel is {high:g})"
        raise InputVolumeError(f"{name} is {what}; there is no image to analyse")
    labels = _label_values(voxels)
    if labels is not None:
        raise InputVolumeError(f"{name} looks like a label map or mask ({labels} distinct integer values), "
                               "not an MRI; give the scan itself")
    return image


# An MRI has hundreds of grey levels even after 8-bit quantisation; a segmentation or mask a few.
MAX_LABEL_VALUES = 16


def _label_values(voxels: np.ndarray) -> int | None:
    """The number of distinct values if the volume looks like a label map (few integers), else None.
    A sparse sample decides cheaply for almost every MRI before the whole volume is looked at."""
    for values in (voxels.ravel()[::97], voxels):
        if not np.array_equal(values, np.round(values)):
            return None
        distinct = np.unique(values).size
        if distinct > MAX_LABEL_VALUES:
            return None
    return int(distinct)


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """The image's voxel-index -> physical (LPS) 4x4 matrix."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def write_image(image: sitk.Image, path: str | os.PathLike, *, compress: bool = True) -> None:
    """Write ``image`` so that ``path`` holds either the old file or the complete new one."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(handle)
        sitk.WriteImage(image, temporary, useCompression=compress)
        os.replace(temporary, path)
    except (RuntimeError, OSError) as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {_first_line(error)}") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """ITK, GDCM and the NIfTI library print warnings and complaints straight to the process's
    stderr; the checks here and the exception that follows say what matters in one line."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with _native_stderr_silenced():
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Readers in C (the NIfTI library) print their own complaints straight to the process's
    stderr; the exception that follows says the same, so a bad file still ends in one line."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr (some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK messages start with a source location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__
