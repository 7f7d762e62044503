"""Hand-over files: the segmentation (with any manual edits), the maps and the lesion table.

Written by MRML's own storage nodes (what Slicer's Save dialog uses) into a staging folder
next to the destination and moved in at the end; existing files are never replaced unasked.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import slicer

from ..errors import OutputError
from .lesion_table import COLUMNS, read_lesion_table
from .result_nodes import ResultNodes

EXPORT_FILES = ("anomalies.seg.nrrd", "anomaly_map.nii.gz", "pseudo_healthy.nii.gz", "lesions.csv")
UNCERTAINTY_FILE = "uncertainty_map.nii.gz"  # when the result has one


def export_result(nodes: ResultNodes, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    clashes = [name for name in EXPORT_FILES + (UNCERTAINTY_FILE,) if (folder / name).exists()]
    if clashes and not overwrite:
        raise OutputError(f"{folder} already holds {', '.join(clashes)}; choose another folder or allow overwriting")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".normative-anomaly-export-", dir=folder))
    try:
        _write(slicer.vtkMRMLSegmentationStorageNode(), nodes.segmentation, staging / EXPORT_FILES[0])
        _write(slicer.vtkMRMLVolumeArchetypeStorageNode(), nodes.anomaly_map, staging / EXPORT_FILES[1])
        _write(slicer.vtkMRMLVolumeArchetypeStorageNode(), nodes.pseudo_healthy, staging / EXPORT_FILES[2])
        if nodes.uncertainty_map is not None:
            _write(slicer.vtkMRMLVolumeArchetypeStorageNode(), nodes.uncertainty_map, staging / UNCERTAINTY_FILE)
        with open(staging / EXPORT_FILES[3], "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow([f"{name} ({unit})" if unit else name for name, unit, _ in COLUMNS])
            for row in read_lesion_table(nodes.lesion_table):
                writer.writerow([row[name] for name, _, _ in COLUMNS])
        written = [name for name in EXPORT_FILES + (UNCERTAINTY_FILE,) if (staging / name).exists()]
        for name in written:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in written]


def _write(storage_node, node, path: Path) -> None:
    """Write with a standalone storage node, so the node keeps its own storage settings."""
    storage_node.SetFileName(str(path))
    storage_node.SetUseCompression(True)
    if not storage_node.WriteData(node) or not path.exists():
        raise OutputError(f"could not write {path.name} for {node.GetName()!r}")
