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
from ..run_folder import ANOMALY_MAP, LESIONS_CSV, PSEUDO_HEALTHY, SEGMENTATION, UNCERTAINTY_MAP
from .lesion_table import COLUMNS, read_lesion_table
from .result_nodes import ResultNodes

# The run's names, so an export and a run folder hold the same files.
EXPORT_FILES = (SEGMENTATION, ANOMALY_MAP, PSEUDO_HEALTHY, LESIONS_CSV)


def export_clashes(folder: str | os.PathLike) -> list[str]:
    """The hand-over files that an export into ``folder`` would replace (what a GUI asks about)."""
    return [name for name in EXPORT_FILES + (UNCERTAINTY_MAP,) if (Path(folder) / name).exists()]


def export_result(nodes: ResultNodes, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    clashes = export_clashes(folder)
    if clashes and not overwrite:
        raise OutputError(f"{folder} already holds {', '.join(clashes)}; choose another folder or allow overwriting")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".normative-anomaly-export-", dir=folder))
    try:
        written = [path.name for path in (write_export_file(nodes, name, staging)
                                          for name in EXPORT_FILES + (UNCERTAINTY_MAP,)) if path is not None]
        for name in written:
            os.replace(staging / name, folder / name)
        for name in set(clashes) - set(written):  # an earlier export's uncertainty map would not match this one
            (folder / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in written]


def write_export_file(nodes: ResultNodes, name: str, folder: Path) -> Path | None:
    """One of the hand-over files (a name of EXPORT_FILES or UNCERTAINTY_MAP) into ``folder``;
    None for the uncertainty map of a result that has none."""
    path = Path(folder) / name
    volumes = {ANOMALY_MAP: nodes.anomaly_map, PSEUDO_HEALTHY: nodes.pseudo_healthy, UNCERTAINTY_MAP: nodes.uncertainty_map}
    if name == SEGMENTATION:
        _write(slicer.vtkMRMLSegmentationStorageNode(), nodes.segmentation, path)
    elif name in volumes:
        if volumes[name] is None:
            return None
        _write(slicer.vtkMRMLVolumeArchetypeStorageNode(), volumes[name], path)
    elif name == LESIONS_CSV:
        with open(path, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow([f"{column} ({unit})" if unit else column for column, unit, _ in COLUMNS])
            for row in read_lesion_table(nodes.lesion_table):
                writer.writerow([row[column] for column, _, _ in COLUMNS])
    else:
        raise ValueError(f"not a hand-over file: {name!r}")
    return path


def _write(storage_node, node, path: Path) -> None:
    """Write with a standalone storage node, so the node keeps its own storage settings."""
    storage_node.SetFileName(str(path))
    storage_node.SetUseCompression(True)
    if not storage_node.WriteData(node) or not path.exists():
        raise OutputError(f"could not write {path.name} for {node.GetName()!r}")
