"""What a volume file's header declares and makes its reader open: its dimension, components and
size (checked before any voxel is read), the data files named in NRRD and MetaImage headers,
the other half of an Analyze/NIfTI pair, and ITK's plain-name links.

A header could otherwise load any file on the machine as the volume, or block on a pipe; each
such file is listed from the header's own bytes and checked before ITK opens anything.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError, shown
from .nifti_checks import read_nifti_header
from .sitk_guard import is_utf8, quiet

MAX_TEXT_HEADER_BYTES = 2**20  # an NRRD or MetaImage header; attached voxels follow it


class DataFile(NamedTuple):
    written: str  # as the header names it
    path: Path  # the file the reader opens for it
    alias: str | None  # its name next to a renamed header (None: the reader does not join it to the header's folder)


# Readers whose files can name other files that cannot be listed here (HDF5 external links and
# storage, a Stimulate header's data file, Bruker's parameter files two folders up).
UNCHECKED_READERS = {"HDF5ImageIO": "HDF5", "MINCImageIO": "MINC", "StimulateImageIO": "Stimulate",
                     "Bruker2dseqImageIO": "Bruker 2dseq"}


# A 512^3 float32 volume is 0.5 GB; the pipeline holds a few copies. Larger inputs are
# refused rather than risking the host (Slicer shares this process).
MAX_VOXELS = 512**3
MIN_VOXELS_PER_AXIS = 8
ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I|: float32 headers are exact to 1e-6


def check_header(dimension: int, components: int, size: tuple[int, ...], name: str) -> None:
    """What a header declares (dimension, components, size), refused before any voxel is read."""
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


def check_data_files(header: Path, root: Path | None = None, *, label: str | None = None,
                     where: str = "the header's folder") -> list[DataFile]:
    """The data files that reading ``header`` opens (NRRD ``data file``, MetaImage
    ``ElementDataFile``, the image of an Analyze/NIfTI pair), each checked to resolve (links
    followed) inside ``root`` (default: the header's own folder) and to be a regular file: a
    header could otherwise load any file on the machine as the volume. Forms that cannot be
    checked (numbered file patterns, standard input, formats with links) are refused."""
    label = label or shown(header)
    check_regular_file(header, label, label)
    return checked_data_files(header, reader_of(header, label), root, label, where)


def check_regular_file(path: Path, name: str, label: str) -> None:
    """Opening a pipe, device or socket blocks or never ends, and ignores Ctrl-C."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputVolumeError(f"{name} not found: {shown(path)}") from None
    except OSError as error:
        raise InputVolumeError(f"{label} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputVolumeError(f"{label} is not a regular file (a pipe, device or socket); give the volume file")


def checked_data_files(header: Path, reader: str, root: Path | None, label: str, where: str) -> list[DataFile]:
    if reader in UNCHECKED_READERS:
        raise InputVolumeError(f"{label} is in the {UNCHECKED_READERS[reader]} format, whose links to other files "
                               "cannot be checked; convert it to NIfTI (.nii.gz), NRRD or MetaImage first")
    folder = (root or header.absolute().parent).resolve()
    data_files = _data_files(header, reader, label)
    for data in data_files:
        named = f"the data file {shown(data.written)!r}"
        if "\0" in data.written:  # no file system has such a name; the reader would cut it short
            raise InputVolumeError(f"{label} names {named} in its header, which holds a NUL byte; "
                                   "its header is corrupt")
        if not data.path.resolve().is_relative_to(folder):
            raise InputVolumeError(f"{label} names {named} in its header, outside {where}; "
                                   "only data files inside it are read")
        if data.path.exists() and not data.path.is_file():
            raise InputVolumeError(f"{label} names {named} in its header, which is not a regular file "
                                   "(a folder, pipe, device or socket)")
    return data_files


def reader_of(path: Path, label: str) -> str:
    """The ITK reader that will read ``path`` (it decides by name and content), or ''."""
    with itk_file_name(path, [], label) as itk_name, quiet():
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
    nifti = read_nifti_header(header)
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
def itk_file_name(path: Path, data_files: list[DataFile], label: str) -> Iterator[str]:
    """The name to give ITK for ``path``. SimpleITK aborts the whole process on a name that is
    not UTF-8 (bytes from another system's encoding); such a file is read through a link with a
    plain name in a temporary folder, next to links to the data files its header names."""
    if is_utf8(str(path)):
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

