"""The lesion table node: one row per connected component, what the panel's table shows."""

from __future__ import annotations

from dataclasses import dataclass

import vtk

from ..lesions import Segmentation

# (column name, unit label, description); the order is the table's.
COLUMNS = (
    ("ID", "", "Lesion number, largest first"),
    ("Volume", "mL", "Lesion volume"),
    ("Max score", "", "Highest anomaly score in the lesion"),
    ("Mean score", "", "Mean anomaly score in the lesion"),
    ("R", "mm", "Centroid, right (RAS)"),
    ("A", "mm", "Centroid, anterior (RAS)"),
    ("S", "mm", "Centroid, superior (RAS)"),
    ("Status", "", "kept, or rejected by the user (left out of the segmentation)"),
)


def write_lesion_table(table_node, segmentation: Segmentation) -> None:
    """Replace the table's rows with the segmentation's lesions (one modified event)."""
    arrays = []
    for name, _, _ in COLUMNS:
        array = vtk.vtkIntArray() if name == "ID" else (vtk.vtkStringArray() if name == "Status"
                                                        else vtk.vtkDoubleArray())
        array.SetName(name)
        array.SetNumberOfValues(len(segmentation.lesions))
        arrays.append(array)
    for row, lesion in enumerate(segmentation.lesions):
        values = (lesion.id, lesion.volume_ml, lesion.max_score, lesion.mean_score, *lesion.centroid_ras,
                  "rejected" if lesion.rejected else "kept")
        for array, value in zip(arrays, values):
            array.SetValue(row, value)
    table = vtk.vtkTable()
    for array in arrays:
        table.AddColumn(array)
    was_modifying = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    # Headers show the column's title (its name when there is none) and "[unit]" (qMRMLTableModel).
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # edited through the module (reject / restore), not by typing in cells
    for name, unit, description in COLUMNS:
        table_node.SetColumnUnitLabel(name, unit)
        table_node.SetColumnDescription(name, description)
    table_node.EndModify(was_modifying)


def read_lesion_table(table_node) -> list[dict]:
    """The table's rows as dicts keyed by column name (for export and tests)."""
    table = table_node.GetTable()
    rows = []
    for row in range(table.GetNumberOfRows()):
        rows.append({table.GetColumnName(c): table.GetValue(row, c).ToString() if table.GetColumnName(c) == "Status"
                     else table.GetValue(row, c).ToDouble() for c in range(table.GetNumberOfColumns())})
    for row in rows:
        row["ID"] = int(row["ID"])
    return rows


@dataclass(frozen=True)
class LesionSummary:
    kept: int
    kept_ml: float
    rejected: int


def summarize(rows: list[dict]) -> LesionSummary:
    """Counts and kept volume of ``read_lesion_table`` rows (the panels' summary line)."""
    kept = [row for row in rows if row.get("Status") != "rejected"]
    return LesionSummary(len(kept), sum(row["Volume"] for row in kept), len(rows) - len(kept))
