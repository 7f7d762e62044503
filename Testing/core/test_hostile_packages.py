"""Model packages from strangers: hostile package folders and archives are refused with one line,
nothing in them runs, and installing never writes outside the models folder or leaves anything
half-done. Built from the smallest bundled package (ae3d-t1), so no training is needed."""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from NormativeAnomalyLib.cli import main
from NormativeAnomalyLib.errors import ModelPackageError
from NormativeAnomalyLib.models import installed_model_names, load_package, model_summaries, read_card, resolve_model
from NormativeAnomalyLib.models.archive import MAX_MEMBERS, MAX_TOTAL_BYTES, _copy_counted, _Member, install_package
from NormativeAnomalyLib.models.package import MAX_CARD_BYTES, validate_card
from NormativeAnomalyLib.resources import user_models_dir
from NormativeAnomalyLib.templates import sha256_of

pytestmark = pytest.mark.reliability

BUNDLED = Path(__file__).resolve().parents[2] / "Resources" / "Models"
NAME = "mine-ae3d"  # the test package: ae3d-t1's card and weights under a name no bundled model has
AREA, ARCHIVE_AREA = "model package", "model package archive"


# --- helpers -----------------------------------------------------------------------------------

def package_files() -> dict[str, bytes]:
    """model.json and weights.safetensors of a valid package named NAME."""
    card = json.loads((BUNDLED / "ae3d-t1" / "model.json").read_text())
    card["name"] = NAME
    weights = (BUNDLED / "ae3d-t1" / "weights.safetensors").read_bytes()
    return {"model.json": json.dumps(card).encode(), "weights.safetensors": weights}


@pytest.fixture
def package_dir(tmp_path) -> Path:
    folder = tmp_path / "package"
    folder.mkdir()
    for name, data in package_files().items():
        (folder / name).write_bytes(data)
    return folder


def edit_card(folder: Path, edit) -> None:
    card = json.loads((folder / "model.json").read_text())
    edit(card)
    (folder / "model.json").write_text(json.dumps(card))


def write_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # "Duplicate name": duplicates are what some tests are about
        for name, data in members:
            archive.writestr(name, data)
    return path


def tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def packaged(folder: str = f"{NAME}/") -> list[tuple[str, bytes]]:
    return [(folder + name, data) for name, data in package_files().items()]


def tree(root: Path) -> dict[str, bytes | str]:
    """Everything under root: file contents, link targets, folders."""
    return {str(path.relative_to(root)): (path.readlink().as_posix() if path.is_symlink() else
                                          path.read_bytes() if path.is_file() else "folder")
            for path in sorted(root.rglob("*"))}


def refused_install(archive: Path, models_root: Path, match: str, **options) -> str:
    """Install, expecting a refusal; checks that nothing changed anywhere (but for the models folder
    itself being created, empty) and returns the message."""
    sandbox = archive.parent
    before = tree(sandbox)
    with pytest.raises(ModelPackageError, match=match) as error:
        install_package(archive, models_root, **options)
    after = tree(sandbox)
    assert {key: after.get(key) for key in before} == before
    may_be_created = {str(folder.relative_to(sandbox)) for folder in (models_root, *models_root.parents)
                      if sandbox in folder.parents}
    assert {key for key in after if key not in before} <= may_be_created
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def models_root(tmp_path) -> Path:
    return tmp_path / "home" / "models"


# --- installing archives: what works -------------------------------------------------------------

@pytest.mark.parametrize("archive_name, folder", [("pkg.zip", f"{NAME}/"), ("pkg.tar.gz", ""), ("pkg.tgz", "./"),
                                                  ("pkg.tar", "any-folder-name/")])
def test_an_archived_package_installs_and_resolves_by_name(tmp_path, models_root, monkeypatch, archive_name, folder):
    path = tmp_path / archive_name
    if archive_name.endswith(".zip"):
        write_zip(path, packaged(folder))
    else:
        write_tar(path, [tar_member(name, data) for name, data in packaged(folder)])
    installed = install_package(path, models_root)
    assert installed == models_root / NAME
    assert sorted(p.name for p in models_root.iterdir()) == [NAME]  # no staging folder left
    monkeypatch.setenv("NORMATIVE_ANOMALY_MODELS", str(models_root))
    assert resolve_model(NAME).name == NAME


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_tar_with_extended_headers_installs(tmp_path, models_root, tar_format):
    """What tar writes for long names, and pax headers (global and per member), stay within the limits."""
    folder = "long-folder-name-" + "x" * 100  # over the 100 characters of a plain tar header's name
    with tarfile.open(tmp_path / "pkg.tar.gz", "w:gz", format=tar_format, pax_headers={"comment": "global"}) as archive:
        for name, data in packaged(f"{folder}/"):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), {"comment": "a member's own pax header"}
            archive.addfile(info, io.BytesIO(data))
    assert install_package(tmp_path / "pkg.tar.gz", models_root) == models_root / NAME


def test_user_models_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMATIVE_ANOMALY_MODELS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert user_models_dir() == tmp_path / "data" / "normative-anomaly" / "models"
    monkeypatch.setenv("NORMATIVE_ANOMALY_MODELS", str(tmp_path / "mine"))
    assert user_models_dir() == tmp_path / "mine"


def test_cli_models_install(tmp_path, models_root, capsys):
    archive = write_zip(tmp_path / "pkg.zip", packaged())
    assert main(["models", "install", str(archive), "--models-dir", str(models_root)]) == 0
    assert str(models_root / NAME) in capsys.readouterr().out
    assert main(["models", "install", str(archive), "--models-dir", str(models_root)]) == 1
    assert "already installed" in capsys.readouterr().err
    assert main(["models", "install", str(archive), "--models-dir", str(models_root), "--overwrite"]) == 0


# --- installing archives: what is refused --------------------------------------------------------

@pytest.mark.parametrize("member, match", [
    ("../evil.json", "outside the package"),
    (f"{NAME}/../../evil.json", "outside the package"),
    ("/tmp/evil.json", "absolute or Windows-style"),
    ("C:/evil.json", "absolute or Windows-style"),
    ("C:evil.json", "absolute or Windows-style"),
    (f"{NAME}\\..\\..\\evil.json", "absolute or Windows-style"),
    ("\\\\server\\share\\evil.json", "absolute or Windows-style"),
])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_path_traversal_is_refused(tmp_path, models_root, reliability_case, member, match, kind):
    members = packaged() + [(member, b"{}")]
    archive = (write_zip(tmp_path / "evil.zip", members) if kind == "zip" else
               write_tar(tmp_path / "evil.tar", [tar_member(name, data) for name, data in members]))
    message = refused_install(archive, models_root, match)
    reliability_case(ARCHIVE_AREA, f"{kind} member named {member!r}", message)


@pytest.mark.parametrize("kind, link, what", [
    (tarfile.SYMTYPE, "/etc/passwd", "symbolic link"),
    (tarfile.LNKTYPE, "/etc/passwd", "hard link"),
    (tarfile.CHRTYPE, "", "device"),
    (tarfile.FIFOTYPE, "", "fifo"),
])
def test_links_devices_and_fifos_in_a_tar_are_refused(tmp_path, models_root, reliability_case, kind, link, what):
    members = [tar_member(f"{NAME}/model.json", package_files()["model.json"]),
               tar_member(f"{NAME}/weights.safetensors", kind=kind, link=link)]
    message = refused_install(write_tar(tmp_path / "evil.tar.gz", members), models_root, what)
    reliability_case(ARCHIVE_AREA, f"tar member that is a {what}", message)


def tar_header(name: str, kind: bytes, size: int = 0, pax_headers: dict[str, str] | None = None,
               patch: dict[int, bytes] | None = None) -> bytes:
    """The header block(s) of one tar member, as a hostile archiver may write them: any size (negative
    ones too, in GNU base-256), raw bytes patched in at offsets, the checksum recomputed."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.pax_headers = kind, size, pax_headers or {}
    blocks = bytearray(info.tobuf(tarfile.PAX_FORMAT if pax_headers else tarfile.GNU_FORMAT))
    header = len(blocks) - tarfile.BLOCKSIZE  # the member's own block comes last
    for offset, data in (patch or {}).items():
        blocks[header + offset:header + offset + len(data)] = data
    blocks[header + 148:header + 156] = b" " * 8
    blocks[header + 148:header + 156] = b"%06o\0 " % sum(blocks[header:header + tarfile.BLOCKSIZE])
    return bytes(blocks)


def package_tar_blocks() -> bytes:
    """The test package's members and the end-of-archive blocks, uncompressed."""
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in packaged():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return stream.getvalue()


def write_tar_with_a_huge_header(path: Path, kind: bytes, size: int, filler_bytes: int) -> Path:
    """A .tar.gz starting with a ``kind`` header that announces ``size`` bytes, then ``filler_bytes``
    of 'a' and the package. Written as concatenated gzip members (one valid gzip stream), so that
    hundreds of MB of header data take a few hundred kB and no time to write."""
    chunk = gzip.compress(b"a" * (1 << 20), compresslevel=9)
    with open(path, "wb") as stream:
        stream.write(gzip.compress(tar_header("././@LongLink", kind, size)))
        for _ in range(filler_bytes >> 20):
            stream.write(chunk)
        stream.write(gzip.compress(package_tar_blocks()))
    return path


# A child process that installs each archive under a memory limit of what it already uses plus
# HEADROOM: an archive library that reads a huge header or directory into memory fails with MemoryError.
MEMORY_LIMITED_INSTALL = """
import resource, sys, tarfile, gzip, zipfile
from NormativeAnomalyLib.errors import ModelPackageError
from NormativeAnomalyLib.models.archive import install_package

used = next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_AS)[1]))
for archive in sys.argv[3:]:
    try:
        install_package(archive, sys.argv[2])
        print("installed")
    except ModelPackageError as error:
        print(error)
    except MemoryError:
        print("MemoryError")
"""
HEADROOM = 300 << 20
HUGE_HEADER = 600 << 20  # what the tester's 0.6 MB archive announced


def memory_limited_install(archives: list[Path], models_root: Path) -> list[str]:
    """The one-line outcome of installing each archive in a child process limited to the memory it
    already uses plus HEADROOM (a refusal's message, "installed" or "MemoryError")."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "NormativeAnomaly"))
    result = subprocess.run([sys.executable, "-c", MEMORY_LIMITED_INSTALL, str(HEADROOM), str(models_root),
                             *map(str, archives)], capture_output=True, text=True, env=env, timeout=600)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == len(archives), result.stderr[-2000:]
    assert not models_root.exists() or not list(models_root.iterdir())
    return lines


@pytest.mark.skipif(sys.platform != "linux", reason="measures memory with RLIMIT_AS and /proc")
def test_a_huge_tar_extended_header_is_refused_before_it_is_read(tmp_path, models_root, reliability_case):
    kinds = {"600 MB pax extended header": (tarfile.XHDTYPE, HUGE_HEADER),
             "600 MB pax global header": (tarfile.XGLTYPE, HUGE_HEADER),
             "600 MB GNU long name header": (tarfile.GNUTYPE_LONGNAME, HUGE_HEADER),
             "600 MB GNU long link header": (tarfile.GNUTYPE_LONGLINK, HUGE_HEADER),
             "pax extended header of -600 MB (a read to the end), then 600 MB": (tarfile.XHDTYPE, -HUGE_HEADER)}
    archives = [write_tar_with_a_huge_header(tmp_path / f"huge{i}.tar.gz", kind, size, HUGE_HEADER)
                for i, (kind, size) in enumerate(kinds.values())]
    assert all(archive.stat().st_size < 1 << 20 for archive in archives)
    lines = memory_limited_install(archives, models_root)
    for case, line, archive in zip(kinds, lines, archives):
        assert line.startswith(f"{archive}: refusing a tar") and "header of" in line, line
        reliability_case(ARCHIVE_AREA, f"0.6 MB .tar.gz announcing a {case}", line)


@pytest.mark.skipif(sys.platform != "linux", reason="measures memory with RLIMIT_AS and /proc")
def test_a_huge_zip_directory_is_refused_before_it_is_read(tmp_path, models_root, reliability_case):
    entries = 1_200_000  # 56 MB of 47-byte entries: zipfile would make about 600 MB of objects of them
    entry = struct.pack(zipfile.structCentralDir, zipfile.stringCentralDir, 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0,
                        0, 0, 0, 0, 0) + b"a"
    end = struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, 0xFFFF, 0xFFFF,
                      entries * len(entry), 0, 0)
    archive = tmp_path / "directory.zip"
    archive.write_bytes(entry * entries + end)
    [line] = memory_limited_install([archive], models_root)
    assert line.startswith(f"{archive}: a zip directory of"), line
    reliability_case(ARCHIVE_AREA, "zip whose central directory lists 1.2 million entries (56 MB)", line)


@pytest.mark.parametrize("case, blocks, match", [
    ("old GNU sparse member with extension blocks",
     tar_header(f"{NAME}/notes.txt", tarfile.GNUTYPE_SPARSE, 512, patch={482: b"\x01"}), "sparse"),
    ("pax GNU sparse 1.0 member whose map never ends",
     tar_header(f"{NAME}/notes.txt", tarfile.REGTYPE, 1024, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                            "GNU.sparse.name": f"{NAME}/notes.txt",
                                                            "GNU.sparse.realsize": "10"})
     + b"99999999999\n1\n" + bytes(1024 - 15), "sparse"),
    ("pax GNU sparse 0.1 member",
     tar_header(f"{NAME}/notes.txt", tarfile.REGTYPE, 512, {"GNU.sparse.map": "0,10", "GNU.sparse.size": "10",
                                                           "GNU.sparse.name": f"{NAME}/notes.txt"})
     + bytes(512), "sparse"),
    ("1000 pax headers in a row (deeper than Python's recursion limit)",
     b"".join(tar_header("././@PaxHeader", tarfile.XHDTYPE, 9) + b"9 a=bcde\n".ljust(512, b"\0")
              for _ in range(1000)), "extended headers"),
    ("pax header with a negative size", tar_header("././@PaxHeader", tarfile.XHDTYPE, -1024), "negative size"),
])
def test_tar_headers_that_grow_without_bound_are_refused(tmp_path, models_root, reliability_case, case, blocks,
                                                         match):
    archive = tmp_path / "odd.tar.gz"
    archive.write_bytes(gzip.compress(blocks + package_tar_blocks()))
    message = refused_install(archive, models_root, match)
    reliability_case(ARCHIVE_AREA, case, message)


def test_a_symlink_in_a_zip_is_refused(tmp_path, models_root, reliability_case):
    link = zipfile.ZipInfo(f"{NAME}/weights.safetensors")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16  # how Info-ZIP stores a symlink: its target as the data
    card = package_files()["model.json"]
    archive = write_zip(tmp_path / "evil.zip", [(f"{NAME}/model.json", card), (link, b"/etc/passwd")])
    message = refused_install(archive, models_root, "symbolic link")
    reliability_case(ARCHIVE_AREA, "zip member that is a symbolic link", message)


@pytest.mark.parametrize("members, match, case", [
    ([(f"{NAME}/sub/model.json", b"{}")], "sub-folder", "file in a nested folder"),
    ([(f"{NAME}/sub/", b"")], "sub-folder", "nested folder"),
    ([("other/x.json", b"{}")], "more than one top-level", "a second top-level folder"),
    ([("x.json", b"{}")], "more than one top-level", "a file beside the package folder"),
    ([(f"{NAME}/MODEL.JSON", b"{}")], "appears twice", "two names that differ only in case"),
    ([(f"{NAME}/.hidden", b"{}")], "names may hold only", "a hidden file"),
    ([(f"{NAME}/a b\nc", b"{}")], "names may hold only", "a name with a space and a newline"),
])
def test_anything_but_one_folder_of_plain_files_is_refused(tmp_path, models_root, reliability_case, members, match,
                                                           case):
    message = refused_install(write_zip(tmp_path / "odd.zip", packaged() + members), models_root, match)
    reliability_case(ARCHIVE_AREA, case, message)


def test_too_many_members_are_refused(tmp_path, models_root, reliability_case):
    members = packaged() + [(f"{NAME}/note{i}.txt", b"") for i in range(MAX_MEMBERS)]
    message = refused_install(write_zip(tmp_path / "many.zip", members), models_root, "more than")
    reliability_case(ARCHIVE_AREA, f"more than {MAX_MEMBERS} members", message)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_decompression_bomb_is_refused(tmp_path, models_root, reliability_case, kind):
    members = packaged()[:1] + [(f"{NAME}/zeros.bin", bytes(30 << 20))]  # 30 MB that compress to ~30 kB
    archive = (write_zip(tmp_path / "bomb.zip", members) if kind == "zip" else
               write_tar(tmp_path / "bomb.tar.gz", [tar_member(name, data) for name, data in members]))
    message = refused_install(archive, models_root, "times its size")
    reliability_case(ARCHIVE_AREA, f"{kind} decompression bomb (1000:1)", message)


ZIP_FIELDS = {"flags": ("<H", 6, 8), "size": ("<I", 22, 24)}  # format, offset in the local and the central header


def patch_zip(path: Path, member: str, field: str, value: int) -> None:
    """Rewrite what the zip's local and central headers say about ``member`` (as a hostile archiver could)."""
    data, encoded = bytearray(path.read_bytes()), member.encode()
    layout, local_offset, central_offset = ZIP_FIELDS[field]
    for signature, offset, name_offset in ((b"PK\x03\x04", local_offset, 30), (b"PK\x01\x02", central_offset, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_offset:start + name_offset + len(encoded)] == encoded:
                struct.pack_into(layout, data, start + offset, value)
            start += 4
    path.write_bytes(bytes(data))


def test_a_header_declaring_a_huge_member_is_refused(tmp_path, models_root, reliability_case):
    archive = write_zip(tmp_path / "huge.zip", packaged() + [(f"{NAME}/big.bin", b"x")])
    patch_zip(archive, f"{NAME}/big.bin", "size", 0xFFFFFFFE)
    assert MAX_TOTAL_BYTES < 0xFFFFFFFE
    message = refused_install(archive, models_root, "unpacks to more than")
    reliability_case(ARCHIVE_AREA, "zip header declaring a 4 GB member", message)


def test_a_header_understating_a_member_cannot_make_it_write_more(tmp_path, models_root, reliability_case):
    archive = write_zip(tmp_path / "liar.zip", packaged() + [(f"{NAME}/notes.txt", b"y" * (1 << 20))])
    patch_zip(archive, f"{NAME}/notes.txt", "size", 10)
    message = refused_install(archive, models_root, "not a readable archive")
    # The copy counts bytes itself, whatever the archive library does with the header.
    with pytest.raises(ModelPackageError, match="more bytes than its header says"):
        _copy_counted(io.BytesIO(b"y" * 100), io.BytesIO(), _Member("notes.txt", "file", 10, None), archive)
    reliability_case(ARCHIVE_AREA, "zip header understating a member's size", message)


def test_a_password_protected_member_is_refused(tmp_path, models_root, reliability_case):
    archive = write_zip(tmp_path / "locked.zip", packaged())
    patch_zip(archive, f"{NAME}/model.json", "flags", 0x1)
    message = refused_install(archive, models_root, "'mine-ae3d/model.json' is encrypted")
    reliability_case(ARCHIVE_AREA, "encrypted zip member", message)


@pytest.mark.parametrize("file_name, data, match", [
    ("pkg.zip", b"PK\x03\x04 truncated", "not a readable archive"),
    ("pkg.tar.gz", b"\x1f\x8b\x08\x00garbage", "not a readable archive"),
    ("pkg.rar", b"Rar!", "not a .zip"),
])
def test_a_broken_or_unknown_archive_is_refused(tmp_path, models_root, reliability_case, file_name, data, match):
    (tmp_path / file_name).write_bytes(data)
    message = refused_install(tmp_path / file_name, models_root, match)
    reliability_case(ARCHIVE_AREA, f"{file_name}: not a readable archive", message)


def test_a_package_that_does_not_load_is_not_installed(tmp_path, models_root, reliability_case):
    members = packaged()
    members[1] = (members[1][0], members[1][1][:-1] + b"!")  # the weights no longer match the card's SHA-256
    message = refused_install(write_zip(tmp_path / "tampered.zip", members), models_root, "SHA-256")
    assert message.startswith(str(tmp_path / "tampered.zip")) and ".installing-" not in message
    reliability_case(ARCHIVE_AREA, "archived package whose weights fail the SHA-256", message)


def test_an_installed_package_is_replaced_only_when_asked(tmp_path, models_root, reliability_case):
    install_package(write_zip(tmp_path / "v1.zip", packaged()), models_root)
    (models_root / NAME / "notes.txt").write_text("the user's own note")
    update = write_zip(tmp_path / "v2.zip", packaged())
    message = refused_install(update, models_root, "already installed")
    install_package(update, models_root, overwrite=True)
    assert not (models_root / NAME / "notes.txt").exists()
    assert sorted(p.name for p in models_root.iterdir()) == [NAME]
    reliability_case(ARCHIVE_AREA, "a package of the same name is already installed", message)


def test_a_bundled_models_name_is_refused(tmp_path, models_root, reliability_case):
    members = [(f"dae-t1/{name}", data) for name, data in package_files().items()]
    card = json.loads(members[0][1])
    card["name"] = "dae-t1"
    members[0] = (members[0][0], json.dumps(card).encode())
    message = refused_install(write_zip(tmp_path / "shadow.zip", members), models_root, "bundled model")
    reliability_case(ARCHIVE_AREA, "package named like a bundled model (would be shadowed)", message)


def card_named(name: str) -> list[tuple[str, bytes]]:
    """The test package's archive members, its card renamed."""
    members = packaged()
    card = json.loads(members[0][1])
    card["name"] = name
    members[0] = (members[0][0], json.dumps(card).encode())
    return members


@pytest.mark.parametrize("name", ["dae-t1\n", f"{NAME}\n", "DAE-T1", "dae\u2010t1", f"{NAME} ", "\uff41e3d-t1",
                                  f"{NAME}.", "nul", "com1.mine"])
def test_a_card_name_that_is_not_a_plain_lowercase_name_is_refused(tmp_path, models_root, reliability_case, name):
    archive = write_zip(tmp_path / "odd.zip", card_named(name))
    message = refused_install(archive, models_root, "is not a valid model card: name: ")
    reliability_case(ARCHIVE_AREA, f"card named {name!r}", message)


def test_an_installed_folder_is_used_only_under_its_cards_name(tmp_path, package_dir, reliability_case):
    root = tmp_path / "home" / "models"
    shutil.copytree(package_dir, root / "other")  # its card says NAME
    shutil.copytree(package_dir, root / f"{NAME}\n")  # left by an install that did not check names
    shutil.copytree(package_dir, root / "dae-t1")  # copied by hand under a bundled name
    edit_card(root / "dae-t1", lambda card: card.update(name="dae-t1"))
    assert installed_model_names(root) == ["other"]
    summaries = model_summaries(user_root=root)
    assert [summary["name"] for summary in summaries].count("dae-t1") == 1
    other = next(summary for summary in summaries if summary["name"] == "other")
    assert "error" in other and "\n" not in other["error"]
    with pytest.raises(ModelPackageError, match=f"holds the package '{NAME}'") as error:
        resolve_model("other", user_root=root)
    assert "\n" not in str(error.value)
    assert resolve_model("dae-t1", user_root=root).path == BUNDLED / "dae-t1"
    reliability_case(AREA, "installed folder whose card names another model", str(error.value))


@pytest.fixture
def cwd_with_a_dae_t1_folder(tmp_path, monkeypatch) -> Path:
    """A working directory holding ./dae-t1: a copy of the intensity baseline, renamed dae-t1."""
    folder = tmp_path / "work" / "dae-t1"
    shutil.copytree(BUNDLED / "intensity-t1", folder)
    edit_card(folder, lambda card: card.update(name="dae-t1"))
    monkeypatch.chdir(folder.parent)
    return folder


@pytest.mark.parametrize("model", [None, "dae-t1", "./dae-t1"])
def test_a_folder_in_the_working_directory_is_used_only_when_given_as_a_path(cwd_with_a_dae_t1_folder, tmp_path,
                                                                           template_t1_path, reliability_case, model):
    out = tmp_path / "out"
    options = [] if model is None else ["--model", model]
    assert main(["run", str(template_t1_path), "--registered", "--out", str(out), "--quiet", *options]) == 0
    used = json.loads((out / "run.json").read_text())["model"]
    expected = cwd_with_a_dae_t1_folder if model == "./dae-t1" else BUNDLED / "dae-t1"
    assert Path(used["path"]).is_absolute() and Path(used["path"]).resolve() == expected.resolve()
    assert used["family"] == ("intensity" if model == "./dae-t1" else "dae")
    option = "no --model" if model is None else f"--model {model}"
    reliability_case(AREA, f"./dae-t1 in the working directory (another package, renamed), {option}",
                     f"runs {'that folder' if model == './dae-t1' else 'the bundled dae-t1'} (run.json names it)")


def test_a_bare_name_never_means_a_folder_in_the_working_directory(cwd_with_a_dae_t1_folder, tmp_path, monkeypatch,
                                                                 template_t1_path, capsys, reliability_case):
    work = cwd_with_a_dae_t1_folder.parent
    shutil.copytree(cwd_with_a_dae_t1_folder, work / "mine")
    edit_card(work / "mine", lambda card: card.update(name="mine"))
    monkeypatch.setenv("NORMATIVE_ANOMALY_MODELS", str(tmp_path / "no-models"))
    before = tree(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(template_t1_path), "--registered", "--out", str(out), "--model", "mine"]) == 1
    message = capsys.readouterr().err.strip()
    assert "unknown model 'mine'" in message and "'./mine'" in message and "\n" not in message
    assert {key: value for key, value in tree(tmp_path).items() if not key.startswith(".out.")} == before
    assert resolve_model("./mine").name == resolve_model(str(work / "mine")).name == "mine"
    monkeypatch.setenv("HOME", str(work))
    assert resolve_model("~/mine").name == "mine"
    reliability_case(AREA, "--model NAME where NAME is only a package folder in the working directory", message)


# --- loading package folders ---------------------------------------------------------------------

def test_weights_linked_from_outside_the_package_are_refused(package_dir, tmp_path, reliability_case):
    outside = tmp_path / "elsewhere" / "weights.safetensors"
    outside.parent.mkdir()
    (package_dir / "weights.safetensors").rename(outside)  # the real weights, hash matching the card
    (package_dir / "weights.safetensors").symlink_to(outside)
    with pytest.raises(ModelPackageError, match="outside its package folder") as error:
        load_package(package_dir)
    assert outside.read_bytes() == package_files()["weights.safetensors"]
    reliability_case(AREA, "weights.safetensors is a symlink out of the package folder", str(error.value))


def test_a_card_linked_from_outside_the_package_is_refused(package_dir, tmp_path, reliability_case):
    outside = tmp_path / "model.json"
    (package_dir / "model.json").rename(outside)
    (package_dir / "model.json").symlink_to(outside)
    with pytest.raises(ModelPackageError, match="outside its package folder") as error:
        read_card(package_dir)
    reliability_case(AREA, "model.json is a symlink out of the package folder", str(error.value))


@pytest.mark.parametrize("weights_file", ["../outside.safetensors", "/etc/passwd.safetensors", "sub/w.safetensors",
                                          "sub\\w.safetensors", "weights.pt"])
def test_a_card_naming_a_weights_path_is_refused_by_the_schema(package_dir, reliability_case, weights_file):
    edit_card(package_dir, lambda card: card["weights"].update(file=weights_file))
    with pytest.raises(ModelPackageError, match="weights/file") as error:
        load_package(package_dir)
    reliability_case(AREA, f"card weights.file {weights_file!r}", str(error.value))


class _Exploit:
    """Unpickling it would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_posing_as_weights_is_refused_without_running_it(package_dir, tmp_path, reliability_case, writer):
    marker = tmp_path / "pwned"
    payload = {"encoder.weight": _Exploit(marker)}
    weights = package_dir / "weights.safetensors"
    if writer == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload))
    # The stranger wrote the card too, so its SHA-256 matches the pickle.
    edit_card(package_dir, lambda card: card["weights"].update(sha256=sha256_of(weights)))
    with pytest.raises(ModelPackageError, match="not a safetensors file") as error:
        load_package(package_dir)
    assert not marker.exists()
    reliability_case(AREA, f"{writer} pickle posing as weights.safetensors (hash matches)", str(error.value),
                     ran_no_code=not marker.exists())


def test_weights_of_the_wrong_shape_are_refused(package_dir, reliability_case):
    edit_card(package_dir, lambda card: card["network"]["args"].update(channels=[8, 16, 32, 32]))
    package = load_package(package_dir)
    with pytest.raises(ModelPackageError, match="do not fit") as error:
        package.build_network()
    reliability_case(AREA, "weights of the wrong tensor shapes for the card's network", str(error.value))


@pytest.mark.parametrize("args, case", [
    ({"channels": [1 << 20, 1 << 20, 1 << 20, 1 << 20]}, "a network of 10^13 parameters (memory bomb)"),
    ({"spatial_dims": 7}, "arguments its constructor fails on (IndexError)"),
    ({"channels": [8, -16, 32, 16]}, "a negative channel count"),
])
def test_network_arguments_are_checked_before_memory_is_spent(package_dir, reliability_case, args, case):
    edit_card(package_dir, lambda card: card["network"]["args"].update(args))
    package = load_package(package_dir)
    with pytest.raises(ModelPackageError) as error:
        package.build_network()
    assert "\n" not in str(error.value)
    reliability_case(AREA, f"card network arguments: {case}", str(error.value))


def test_wrong_hash_is_refused(package_dir, reliability_case):
    weights = bytearray((package_dir / "weights.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (package_dir / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ModelPackageError, match="SHA-256") as error:
        load_package(package_dir)
    reliability_case(AREA, "one flipped bit in the weights (SHA-256 mismatch)", str(error.value))


def test_missing_card_and_unknown_model_name(tmp_path, reliability_case):
    with pytest.raises(ModelPackageError, match="not a model package") as error:
        load_package(tmp_path)
    reliability_case(AREA, "folder without model.json", str(error.value))
    with pytest.raises(ModelPackageError, match="unknown model 'no-such-model'") as error:
        resolve_model("no-such-model", user_root=tmp_path)
    reliability_case(AREA, "unknown model name", str(error.value))


@pytest.mark.parametrize("content, match, case", [
    (b"{not json", "not valid JSON", "card that is not JSON"),
    (b"\xff\xfe{}", "not valid JSON", "card that is not UTF-8"),
    (b" " * (MAX_CARD_BYTES + 1), "too large", "card over 1 MB"),
    (b"[" * 100_000 + b"]" * 100_000, "nested", "card nested 100000 levels deep (RecursionError)"),
    (b'{"training": ' + b"[" * 100 + b"]" * 100 + b"}", "nested", "card nested 100 levels deep"),
    (b"[]", "not a valid model card", "card that is a JSON array"),
])
def test_an_unreadable_card_is_refused(package_dir, reliability_case, content, match, case):
    (package_dir / "model.json").write_bytes(content)
    with pytest.raises(ModelPackageError, match=match) as error:
        load_package(package_dir)
    assert "\n" not in str(error.value)
    reliability_case(AREA, case, str(error.value))


@pytest.mark.parametrize("edit, match, case", [
    (lambda card: card.update(family="foo"), "family", "unknown family"),
    (lambda card: card.update(network={"name": "os.system", "args": {}}), "network", "card naming an unknown network"),
    (lambda card: card.update(template={"name": "../../etc"}), "template/name", "template name with a path"),
    (lambda card: card.update(format_version=2), "format_version", "future format version"),
    (lambda card: card.update(version="0.1.0\n"), "version", "version with a trailing newline"),
    (lambda card: card["weights"].update(file="weights.safetensors\n"), "weights/file",
     "weights file name with a trailing newline"),
    (lambda card: card.update(unexpected=1), "Additional properties", "unknown top-level field"),
    (lambda card: card["calibration"]["threshold"].__setitem__(0, float("nan")), "not a finite number",
     "NaN in the calibration (passes every schema bound)"),
    (lambda card: card["scoring"].update(default_fpr=float("inf")), "not a finite number", "Infinity as a setting"),
    (lambda card: card["scoring"].update(residual="absolute", input_weight=1.0), "input_weight",
     "input intensity added to an unsigned residual"),
    (lambda card: card["scoring"].update(residual="positive", scan_normalisation="median"), "scan_normalisation",
     "a one-signed residual divided by its median (0) with no location statistics"),
])
def test_schema_violations_are_refused_with_the_field_named(package_dir, reliability_case, edit, match, case):
    edit_card(package_dir, edit)
    with pytest.raises(ModelPackageError, match=match) as error:
        load_package(package_dir)
    assert "\n" not in str(error.value)
    reliability_case(AREA, case, str(error.value))


# --- properties ----------------------------------------------------------------------------------

BUNDLED_CARDS = [json.loads(path.read_text()) for path in sorted(BUNDLED.glob("*/model.json"))]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


@st.composite
def mutated_cards(draw) -> dict:
    """A bundled card with one to three random edits: a value replaced, a key or item removed or added."""
    card = copy.deepcopy(draw(st.sampled_from(BUNDLED_CARDS)))
    for _ in range(draw(st.integers(1, 3))):
        node = card
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(node[key], (dict, list)) and node[key] and draw(st.booleans()):
                node = node[key]
                continue
            action = draw(st.sampled_from(["replace", "remove", "add"]))
            if action == "replace":
                node[key] = draw(json_values)
            elif action == "remove":
                del node[key]
            elif isinstance(node, dict):
                node[draw(st.text(max_size=12))] = draw(json_values)
            else:
                node.append(draw(json_values))
            break
    return card


def _card_or_refusal(check) -> None:
    try:
        assert isinstance(check(), dict)
    except ModelPackageError as error:
        assert "\n" not in str(error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values | mutated_cards())
def test_validate_card_returns_a_card_or_refuses(value):
    _card_or_refusal(lambda: validate_card(value))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | mutated_cards().map(lambda card: json.dumps(card).encode()))
def test_read_card_returns_a_card_or_refuses(tmp_path_factory, content):
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    (folder / "model.json").write_bytes(content)
    _card_or_refusal(lambda: read_card(folder))
    shutil.rmtree(folder)


member_names = st.one_of(
    st.sampled_from(["model.json", "weights.safetensors", f"{NAME}/model.json", f"{NAME}/weights.safetensors",
                     "../model.json", "/model.json", "C:model.json", "..\\model.json", f"{NAME}/", "./", "__MACOSX/x"]),
    st.lists(st.sampled_from(["..", ".", "", NAME, "model.json", "weights.safetensors", "C:", "a\\..", "..\\..",
                              "x y"]), min_size=1, max_size=4).map("/".join).filter(bool),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=24),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(member_names, max_size=4), with_package=st.booleans(), kind=st.sampled_from(["zip", "tar"]))
def test_installing_never_writes_outside_the_models_folder(tmp_path_factory, names, with_package, kind):
    files = package_files()
    names = [f"{NAME}/model.json", f"{NAME}/weights.safetensors"] * with_package + names  # a real package, plus
    members = [(name, files.get(name.rsplit("/", 1)[-1], b"data")) for name in names]
    sandbox = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    models_root = sandbox / "a" / "b" / "models"
    archive = sandbox / f"archive.{kind}"
    if kind == "zip":
        write_zip(archive, members)
    else:
        write_tar(archive, [tar_member(name, data) for name, data in members])
    try:
        install_package(archive, models_root)
        event("installed")
    except ModelPackageError as error:
        assert "\n" not in str(error)
        event(f"refused: {str(error).split(': ', 1)[1].split(':')[0][:40]}")
    outside = {path for path in sandbox.rglob("*") if models_root not in (path, *path.parents)}
    assert outside == {archive, sandbox / "a", sandbox / "a" / "b"}
    installed = list(models_root.iterdir())
    assert installed in ([], [models_root / NAME])
    assert not any(path.is_symlink() for path in models_root.rglob("*"))
    shutil.rmtree(sandbox)
