"""What the CLI child process needs in Slicer's Python, and which of it is missing.

No Qt and no running Slicer here (only ``packaging``, which Slicer ships), so the decisions are
tested outside Slicer; ``dependencies`` probes the child and installs.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from packaging.requirements import InvalidRequirement, Requirement

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "slicer-requirements.txt"
# Packages the probe imports in the child: installed metadata is not enough (a broken torch build
# is installed but does not import).
IMPORT_CHECKED = ("torch", "monai")

ProbeResult = dict[str, Any]  # torch, monai (versions or missing), cuda (device name), mps; or error


def requirement_lines(path: Path = REQUIREMENTS_FILE) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def torch_requirement() -> str:
    """torch's line: installed first and on its own (light-the-torch picks the CUDA build)."""
    return next(line for line in requirement_lines() if Requirement(line).name == "torch")


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_packages(probe: Optional[ProbeResult],
                     version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """The requirement lines not satisfied. torch and monai must import in the child in a version
    that satisfies the line: without an answer from the probe (none yet, or it failed) they count
    as missing. The others are judged from the installed packages' metadata (nothing imported)."""
    known = probe is not None and "error" not in probe
    missing = []
    for line in requirement_lines():
        requirement = Requirement(line)
        if requirement.name in IMPORT_CHECKED:
            version = probe.get(requirement.name) if known else None
        else:
            version = version_of(requirement.name)
        if not satisfies(requirement, version):
            missing.append(line)
    return missing


def satisfies(requirement: Requirement | str, version: Optional[str]) -> bool:
    if isinstance(requirement, str):
        try:
            requirement = Requirement(requirement)
        except InvalidRequirement:
            return False
    return bool(version) and requirement.specifier.contains(str(version), prereleases=True)
