"""The bundled demo case in the Sample Data module."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from NormativeAnomalyLib.resources import demo_case

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    _ = str

CATEGORY = "NormativeAnomaly"
SAMPLE_NAME = "NormativeAnomalyDemoT1"
# The copy in Slicer's shared download cache is named with this prefix, so that no other
# extension's file of the same name is taken for ours (the checksum would then force a copy at
# every load).
CACHE_PREFIX = "NormativeAnomaly-"
ICON = Path(__file__).resolve().parent.parent / "Resources" / "Icons" / "NormativeAnomaly.png"


def demoPath() -> Path:
    return demo_case().image


def registerSampleData() -> None:
    """Add the demo case to the Sample Data module (called on the application's startupCompleted())."""
    import SampleData

    path = demoPath()
    if not path.is_file():
        logging.warning(f"NormativeAnomaly: demo case not found ({path}); not added to Sample Data")
        return
    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer >= 5.12
        logic.registerCustomSampleDataCategory(CATEGORY, title=_("Normative Anomaly"))
    logic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(ICON),
        # The case is bundled with the extension: SampleData "downloads" with urllib, which reads
        # file:// URIs, so the file is copied into Slicer's cache and loaded from there.
        uris=path.as_uri(),
        fileNames=CACHE_PREFIX + path.name,
        # A stale copy in the cache (from an older version of the extension) is replaced.
        checksums="SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest(),
        nodeNames=path.name.split(".")[0],
        loadFileType="VolumeFile",  # Slicer >= 5.8 calls it loadFileTypes but still accepts this spelling
    )
