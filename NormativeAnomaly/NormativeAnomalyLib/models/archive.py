"""Installing a model package from a .zip or .tar(.gz) archive, which may come from a stranger.

Nothing in the archive decides where a byte goes, or how much memory reading it takes. Every
member is checked before anything is written: a plain file (no link, device, fifo or sparse
file), a name that cannot leave the package (no ``..``, absolute or Windows-style path), at most
one top-level folder and no deeper one, bounded count, size and compression ratio. What the
archive libraries read whole into memory is bounded before they read it: tar extended headers
(pax, GNU long names) and the zip central directory. Files are then copied one by one, counted as they
are read (a lying header cannot make them larger), into a hidden staging folder inside the
models folder; the package is loaded from there (card schema, SHA-256, safetensors, weights
against the network) and renamed into place whole. On any error the staging folder is removed:
an install leaves a complete, valid package or nothing.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, NoReturn

from ..errors import ModelPackageError, one_line
from .package import MAX_CARD_BYTES, MAX_WEIGHTS_BYTES, load_package
from .registry import bundled_model_names

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_MEMBERS = 64
# tarfile reads an extended header whole into memory, and chains them by recursion: a pax
# header holds a few short records, a GNU long name one path.
MAX_EXTENDED_HEADER_BYTES = 64 << 10
MAX_EXTENDED_HEADERS = 2 * MAX_MEMBERS  # a pax header, or a GNU long name and long link, per member
EXTENDED_HEADER_KINDS = {tarfile.XHDTYPE: "pax extended", tarfile.XGLTYPE: "pax global",
                         tarfile.SOLARIS_XHDTYPE: "Solaris extended", tarfile.GNUTYPE_LONGNAME: "GNU long name",
                         tarfile.GNUTYPE_LONGLINK: "GNU long link"}
# zipfile turns the whole central directory into objects (about 6 times its size) before any
# member can be counted: 4 kB an entry is ample for its name, extra fields and comment.
MAX_ZIP_DIRECTORY_BYTES = MAX_MEMBERS * (4 << 10)
MAX_EXTRA_BYTES = 64 << 20  # loss curves, notes: whatever a package carries besides card and weights
MAX_TOTAL_BYTES = MAX_WEIGHTS_BYTES + MAX_CARD_BYTES + MAX_EXTRA_BYTES
MAX_RATIO = 100  # deflate reaches about 1000:1 on a bomb; weights compress about 1.1:1, cards 5:1
RATIO_FREE_BYTES = 1 << 20  # small archives cannot be bombs, and tiny files compress well
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
IGNORED_NAMES = ("__MACOSX", ".DS_Store")  # what macOS Finder adds: skipped, never written
CHUNK = 1 << 20
# What a damaged or unsupported archive raises while being read; other OSErrors (a full disk) are not its fault.
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError,
                NotImplementedError)


class _Refused(Exception):
    """An archive refused while the archive library reads it; the message lacks the archive's path."""


@dataclass(frozen=True)
class _Member:
    name: str  # as the archive spells it
    kind: str  # "file", "folder", or what else it is, in words
    size: int  # declared uncompressed size
    handle: Any  # the ZipInfo or TarInfo


def install_package(archive_path: str | os.PathLike, models_root: str | os.PathLike, *,
                    overwrite: bool = False) -> Path:
    """Unpack a package archive into ``models_root/<card name>`` after checking everything;
    returns that folder. ModelPackageError (one line) for anything refused; nothing is left behind."""
    archive_path, models_root = Path(archive_path), Path(models_root)
    if not archive_path.is_file():
        raise ModelPackageError(f"{archive_path}: no such archive file")
    try:
        models_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=models_root))
    except OSError as error:
        raise ModelPackageError(f"cannot write to the models folder {models_root}: {error.strerror}") from None
    try:
        _unpack(archive_path, staging)
        name = _validated_name(staging, archive_path)
        return _move_into_place(staging, models_root / name, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once renamed; otherwise whatever is half-done


def _unpack(archive_path: Path, staging: Path) -> None:
    """Check every member, then copy the package's files flat into ``staging``."""
    try:
        with _open_archive(archive_path) as (members, open_member):
            files = _checked_files(members, archive_path)
            for member, file_name in files:
                with open_member(member) as source, open(staging / file_name, "xb") as target:
                    _copy_counted(source, target, member, archive_path)
    except _Refused as error:
        raise ModelPackageError(f"{archive_path}: {error}") from None
    except _READ_ERRORS as error:
        detail = one_line(error)[:200]
        raise ModelPackageError(f"{archive_path}: not a readable archive ({type(error).__name__}: {detail})") from None


@contextmanager
def _open_archive(archive_path: Path) -> Iterator[tuple[list[_Member], Callable[[_Member], IO[bytes]]]]:
    """The archive's members (checked for count, size and ratio while they are listed) and a
    function opening one of them for reading."""
    lowered = archive_path.name.lower()
    archive_bytes = archive_path.stat().st_size
    if lowered.endswith(".zip"):
        _check_zip_directory(archive_path)
        with zipfile.ZipFile(archive_path) as archive:
            members = [_zip_member(info, archive_path) for info in archive.infolist()]
            _check_totals(members, archive_bytes, archive_path)
            yield members, lambda member: archive.open(member.handle)
    elif lowered.endswith((".tar", ".tar.gz", ".tgz")):
        with _BoundedTarFile.open(archive_path, "r:*") as archive:
            members = _tar_members(archive, archive_bytes, archive_path)
            yield members, lambda member: archive.extractfile(member.handle)
    else:
        raise ModelPackageError(f"{archive_path}: not a {', '.join(ARCHIVE_SUFFIXES)} file")


def _check_zip_directory(archive_path: Path) -> None:
    """Refuse a central directory larger than a package's before zipfile reads it, found with
    zipfile's own end-record reader so that both agree on where it is."""
    with open(archive_path, "rb") as stream:
        end_record = zipfile._EndRecData(stream)
    if end_record and end_record[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY_BYTES:
        raise ModelPackageError(f"{archive_path}: a zip directory of {end_record[zipfile._ECD_SIZE]} bytes; a model "
                                f"package's needs at most {MAX_ZIP_DIRECTORY_BYTES >> 10} kB")


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's own header parsing, with what would make it read without bound refused at the
    point where it decides what to read (``_proc_member``): an extended header it would read
    whole, a chain of them it would follow by recursion, a negative size (a read to the end of
    the stream), and sparse files, whose maps grow with the archive's data."""

    def _proc_member(self, archive: _BoundedTarFile) -> tarfile.TarInfo:
        if self.size < 0:
            raise _Refused(f"refusing a tar header of {self.size} bytes (a negative size) for {self.name!r}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse_refusal(self)
        if self.type in EXTENDED_HEADER_KINDS:
            archive.extended_headers += 1
            if archive.extended_headers > MAX_EXTENDED_HEADERS:
                raise _Refused(f"more than {MAX_EXTENDED_HEADERS} tar extended headers; not a model package")
            if self.size > MAX_EXTENDED_HEADER_BYTES:
                raise _Refused(f"refusing a tar {EXTENDED_HEADER_KINDS[self.type]} header of {self.size} bytes; "
                               f"a model package needs at most {MAX_EXTENDED_HEADER_BYTES >> 10} kB")
        return super()._proc_member(archive)

    def _refuse_pax_sparse(self, member: tarfile.TarInfo, *_: Any) -> NoReturn:
        raise _sparse_refusal(member)

    # The GNU sparse formats a pax header announces (0.0, 0.1, 1.0), before tarfile reads their maps.
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_pax_sparse


def _sparse_refusal(member: tarfile.TarInfo) -> _Refused:
    return _Refused(f"refusing {member.name!r}: a GNU sparse file; a package holds plain files only")


class _BoundedTarFile(tarfile.TarFile):
    tarinfo = _BoundedTarInfo
    extended_headers = 0  # counted by _BoundedTarInfo while reading


def _zip_member(info: zipfile.ZipInfo, archive_path: Path) -> _Member:
    if info.flag_bits & 0x1:
        raise ModelPackageError(f"{archive_path}: {info.filename!r} is encrypted; packages must not be")
    mode = info.external_attr >> 16  # Unix mode when the zip was made on Unix, else 0
    if info.is_dir():
        kind = "folder"
    elif stat.S_IFMT(mode) in (0, stat.S_IFREG):
        kind = "file"
    else:
        kind = _kind_of_mode(mode)
    return _Member(info.filename, kind, info.file_size, info)


def _kind_of_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "special file"


def _tar_members(archive: tarfile.TarFile, archive_bytes: int, archive_path: Path) -> list[_Member]:
    """Headers one at a time, checking totals after each, so a compressed bomb is refused before
    it is decompressed further than the limits allow."""
    members: list[_Member] = []
    for info in archive:
        if info.size < 0:  # a pax "size" record may say so too
            raise ModelPackageError(f"{archive_path}: {info.name!r} has a negative size; not a readable archive")
        members.append(_Member(info.name, _tar_kind(info), info.size if info.isreg() else 0, info))
        _check_totals(members, archive_bytes, archive_path)
    return members


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "folder"
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return "special file"


def _check_totals(members: list[_Member], archive_bytes: int, archive_path: Path) -> None:
    if len(members) > MAX_MEMBERS:
        raise ModelPackageError(f"{archive_path}: more than {MAX_MEMBERS} entries; not a model package")
    total = sum(member.size for member in members)
    if total > MAX_TOTAL_BYTES:
        raise ModelPackageError(f"{archive_path}: unpacks to more than {MAX_TOTAL_BYTES >> 20} MB; "
                                "larger than any model package may be")
    if total > RATIO_FREE_BYTES and total > MAX_RATIO * archive_bytes:
        raise ModelPackageError(f"{archive_path}: unpacks to {total / archive_bytes:.0f} times its size "
                                "(a decompression bomb?); refusing it")


def _checked_files(members: list[_Member], archive_path: Path) -> list[tuple[_Member, str]]:
    """(member, file name in the package) for every file to write; refuses anything that is not a
    plain file, and any layout but the files alone or the files in one folder."""
    files, folders, seen = [], set(), set()
    for member in members:
        parts = _name_parts(member.name, archive_path)
        if any(part in IGNORED_NAMES for part in parts):
            continue
        if member.kind not in ("file", "folder"):
            raise ModelPackageError(f"{archive_path}: {member.name!r} is a {member.kind}; a package holds "
                                    "plain files only")
        for part in parts:
            if not SAFE_NAME.fullmatch(part):
                raise ModelPackageError(f"{archive_path}: refusing {member.name!r}: names may hold only letters, "
                                        "digits, '.', '_' and '-'")
        if member.kind == "file" and not parts:
            raise ModelPackageError(f"{archive_path}: refusing {member.name!r}: a file without a name")
        folder = parts if member.kind == "folder" else parts[:-1]
        if len(folder) > 1:
            raise ModelPackageError(f"{archive_path}: {member.name!r} is in a sub-folder; a package is one "
                                    "folder of files")
        if member.kind == "folder":
            folders.update({folder} if folder else set())  # "./" (the root itself) says nothing
            continue
        folders.add(folder)
        if parts[-1].lower() in seen:  # lower(): on a case-insensitive disk these would overwrite each other
            raise ModelPackageError(f"{archive_path}: {parts[-1]!r} appears twice")
        seen.add(parts[-1].lower())
        files.append((member, parts[-1]))
    if len(folders) > 1:
        raise ModelPackageError(f"{archive_path}: more than one top-level entry; a package archive holds one "
                                "folder, or the package's files")
    return files


def _name_parts(name: str, archive_path: Path) -> tuple[str, ...]:
    """The member name's parts, or ModelPackageError for any name that could land outside the
    staging folder or that a file system would read differently (Windows separators, drives)."""
    if "\\" in name or re.match(r"[A-Za-z]:", name) or name.startswith("/"):
        raise ModelPackageError(f"{archive_path}: refusing {name!r}: an absolute or Windows-style path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ModelPackageError(f"{archive_path}: refusing {name!r}: it points outside the package")
    return parts


def _copy_counted(source: IO[bytes], target: IO[bytes], member: _Member, archive_path: Path) -> None:
    """Copy at most the member's declared size: bytes are counted as they come, so a header that
    understates a member cannot make us write more than the limits checked."""
    written = 0
    while block := source.read(CHUNK):
        written += len(block)
        if written > member.size:
            raise ModelPackageError(f"{archive_path}: {member.name!r} holds more bytes than its header says; "
                                    "refusing it")
        target.write(block)


def _validated_name(staging: Path, archive_path: Path) -> str:
    """The unpacked package's name, once it loads as any package must (card, hash, safetensors)
    and its weights fit its network; errors name the archive, not the hidden staging folder."""
    try:
        package = load_package(staging)
        package.build_network()
    except ModelPackageError as error:
        message = str(error).replace(str(staging) + os.sep, "").replace(str(staging), "the package")
        raise ModelPackageError(f"{archive_path}: {message}") from None
    return package.name


def _move_into_place(staging: Path, destination: Path, overwrite: bool) -> Path:
    """Rename the checked package into place; an existing one is replaced only when asked, and
    only after the new one is complete (renamed aside first, restored if the swap fails)."""
    if destination.name in bundled_model_names():
        raise ModelPackageError(f"'{destination.name}' is the name of a bundled model; rename the package "
                                "(the card's name) to install it")
    exists = destination.exists() or destination.is_symlink()
    if exists and not overwrite:
        raise ModelPackageError(f"a model named '{destination.name}' is already installed in {destination.parent}; "
                                "pass --overwrite to replace it")
    staging.chmod(0o755)  # mkdtemp's 0o700 would hide the package from other users of a shared folder
    if not exists:
        staging.rename(destination)
        return destination
    aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=destination.parent)) / destination.name
    destination.rename(aside)
    try:
        staging.rename(destination)
    except OSError:
        aside.rename(destination)  # the old package back; if even that fails it stays in the hidden folder
        raise
    shutil.rmtree(aside.parent, ignore_errors=True)
    return destination

