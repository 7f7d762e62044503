"""NIfTI and Analyze files, checked where ITK's NIfTI reader is lenient or costly.

The header is judged from its first bytes before ITK or nibabel read it (extensions are read
whole, a non-finite origin becomes 0), and the voxels are read again strictly after ITK (it
pads a truncated file with zeros and turns NaN/Inf into 0 without a word).
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np

from .errors import InputVolumeError, one_line

# NIfTI extensions (DICOM fields, JSON sidecars) are kilobytes; the NIfTI library reads them whole.
MAX_NIFTI_EXTENSION_BYTES = 64 * 2**20
NIFTI_HEADER_BYTES = 544  # a NIfTI-2 header (540) and its extension flag; NIfTI-1 and Analyze are shorter


def check_nifti_header(path: Path, label: str) -> None:
    """Extensions are read whole by the NIfTI library and nibabel (a 3 MB .nii.gz can hold a
    1 GiB one), and ITK turns a non-finite origin into 0 with a warning: both are checked
    from the header's first bytes."""
    header_path = _pair_header(path)
    header = read_nifti_header(header_path)
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


def read_nifti_header(path: Path):
    """nibabel's view of the NIfTI-1/2 or Analyze header at the start of ``path`` (gzipped or
    not; no extensions read), or None."""
    return _nifti_header(_leading_bytes(path, NIFTI_HEADER_BYTES))


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


def check_nifti_data(path: Path, name: str) -> None:
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
