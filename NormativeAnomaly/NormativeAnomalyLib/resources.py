"""Where bundled resources (model packages, templates, sample data) live.

In a source checkout they are in the repository's top-level ``Resources/``; in an
installed Slicer extension CMake copies them next to the module (``<module>/Resources``).
``NORMATIVE_ANOMALY_RESOURCES`` overrides both.

Packages a user installs (``normative-anomaly models install``) go to a per-user folder
instead, since the installed resources may be read-only and are replaced on upgrade.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

_LIB_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    override = os.environ.get("NORMATIVE_ANOMALY_RESOURCES")
    if override:
        return Path(override)
    for candidate in (_LIB_DIR.parent.parent / "Resources", _LIB_DIR.parent / "Resources"):
        if (candidate / "Models").is_dir():
            return candidate
    return _LIB_DIR.parent.parent / "Resources"


def models_dir() -> Path:
    return resources_dir() / "Models"


def templates_dir() -> Path:
    return resources_dir() / "Templates"


def sample_data_dir() -> Path:
    return resources_dir() / "SampleData"


# The bundled demo case's description, written by scripts/build_resources.py beside its files.
DEMO_CASE_FILE = "demo_case.json"


@dataclass(frozen=True)
class DemoCase:
    image: Path  # the input scan
    lesion_mask: Path  # its simulated lesion (what the demo's Dice is measured against)


def demo_case() -> DemoCase:
    """The bundled demo case, as ``demo_case.json`` in the sample data names it."""
    folder = sample_data_dir()
    description = json.loads((folder / DEMO_CASE_FILE).read_text())
    files = [description["image"], description["lesion_mask"]]
    if any(Path(name).name != name for name in files):  # plain names: nothing outside the folder
        raise ValueError(f"{DEMO_CASE_FILE} names a file outside {folder}")
    return DemoCase(folder / files[0], folder / files[1])


def user_models_dir() -> Path:
    """Where installed model packages live: ``NORMATIVE_ANOMALY_MODELS``, else
    ``$XDG_DATA_HOME/normative-anomaly/models`` (``~/.local/share/...`` by default)."""
    override = os.environ.get("NORMATIVE_ANOMALY_MODELS")
    if override:
        return Path(override).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "normative-anomaly" / "models"
