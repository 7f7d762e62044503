#!/usr/bin/env python3
"""Render a mock-up of the module panel (docs/images/slicer_panel_mockup.png) from the .ui file.

3D Slicer is not needed: the Slicer/CTK custom widgets in Resources/UI/NormativeAnomaly.ui are
swapped for plain Qt stand-ins, the result is loaded with QUiLoader, filled with example values
and grabbed offscreen. PySide6 is deliberately *not* a project dependency; use a throwaway venv:

    python3 -m venv /tmp/qtvenv && /tmp/qtvenv/bin/pip install PySide6-Essentials \
        && /tmp/qtvenv/bin/python scripts/render_panel_mockup.py
"""
from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no display needed

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
W = TypeVar("W", bound=QtWidgets.QWidget)
UI_FILE = ROOT / "NormativeAnomaly" / "Resources" / "UI" / "NormativeAnomaly.ui"
OUTPUT = ROOT / "docs" / "images" / "slicer_panel_mockup.png"
CAPTION = "Mock-up rendered from Resources/UI/NormativeAnomaly.ui with plain Qt widgets (not a Slicer screenshot)"
WIDTH = 420
FONT_PX = 12  # fixed pixel size so the PNG does not depend on the DPI of the machine

# Stand-in classes; properties of the Slicer classes unknown to them are dropped (kept: below).
# A ctkCollapsibleGroupBox is drawn expanded (its "collapsed" property is dropped), as after a click on its title.
STAND_INS = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox", "ctkCollapsibleGroupBox": "QGroupBox",
             "qMRMLNodeComboBox": "QComboBox", "qMRMLTableView": "QTableWidget", "ctkDirectoryButton": "QPushButton"}
KEEP = {"toolTip", "geometry", "minimumSize", "selectionBehavior", "enabled"}
KEEP_FOR = {"ctkCollapsibleGroupBox": {"title"}}  # what a stand-in keeps beyond KEEP
NODE_NAMES = {"inputVolumeSelector": "demo_t1", "brainMaskSelector": "Template brain mask (default)",
              "resultSelector": "demo_t1 anomalies (ddpm-t1)"}
# The diffusion model's settings as its card gives them (the group is shown for diffusion models only).
DIFFUSION = {"noiseLevelSpinBox": 250, "diffusionStepsSpinBox": 10, "samplesSpinBox": 1}
DIFFUSION_NOISE = "coarse"
LESIONS = [  # ID, Volume (mL), Max score, Mean score, R, A, S, Status
    ("1", "7.10", "0.912", "0.384", "-31", "-8", "22", "kept"),
    ("2", "0.21", "0.268", "0.221", "-15", "-25", "35", "rejected"),
    ("3", "0.09", "0.251", "0.218", "-4", "-93", "-14", "rejected"),
]


def _prop(parent: ET.Element, name: str, kind: str, value: str) -> None:
    ET.SubElement(ET.SubElement(parent, "property", name=name), kind).text = value


def _slider_stand_in(w: ET.Element) -> None:
    """ctkSliderWidget -> QWidget holding a QSlider and a QDoubleSpinBox with the .ui's range."""
    props = {p.get("name"): p for p in w.findall("property")}
    name = w.get("name")
    for p in list(w):
        if p.tag == "property" and p.get("name") not in KEEP:
            w.remove(p)
    w.set("class", "QWidget")
    layout = ET.SubElement(w, "layout", {"class": "QHBoxLayout", "name": f"{name}_layout"})
    for side in ("leftMargin", "topMargin", "rightMargin", "bottomMargin"):
        _prop(layout, side, "number", "0")
    slider = ET.SubElement(ET.SubElement(layout, "item"), "widget", {"class": "QSlider", "name": f"{name}_slider"})
    _prop(slider, "orientation", "enum", "Qt::Horizontal")
    _prop(slider, "maximum", "number", "1000")  # position is set proportionally in _set_slider
    spin = ET.SubElement(ET.SubElement(layout, "item"), "widget",
                         {"class": "QDoubleSpinBox", "name": f"{name}_spin"})
    for key in ("decimals", "minimum", "maximum", "singleStep", "suffix", "value"):
        if key in props:
            spin.append(props[key])


def convert_ui(text: str) -> bytes:
    """Swap Slicer/CTK classes for Qt ones and drop the sections QUiLoader cannot resolve."""
    root = ET.fromstring(text)
    for section in ("customwidgets", "connections"):
        for el in root.findall(section):
            root.remove(el)
    for w in list(root.iter("widget")):
        cls = w.get("class")
        if cls == "ctkSliderWidget":
            _slider_stand_in(w)
        elif cls in STAND_INS:
            w.set("class", STAND_INS[cls])
            for p in w.findall("property"):
                if p.get("name") == "text" and cls == "ctkCollapsibleButton":
                    p.set("name", "title")  # the collapsible button's text becomes the group title
                elif (p.get("name") not in KEEP | KEEP_FOR.get(cls, set())
                      and p.get("stdset") != "0"):
                    w.remove(p)
    return ET.tostring(root, encoding="utf-8")


def _set_slider(panel: QtWidgets.QWidget, name: str, value: float) -> None:
    spin = panel.findChild(QtWidgets.QDoubleSpinBox, f"{name}_spin")
    slider = panel.findChild(QtWidgets.QSlider, f"{name}_slider")
    spin.setValue(value)
    span = spin.maximum() - spin.minimum()
    slider.setValue(round(1000 * (value - spin.minimum()) / span) if span else 0)


def fill_example(panel: QtWidgets.QWidget) -> None:
    """Example state: the demo case analysed with a T1 diffusion model (so the diffusion settings are
    shown, at its card's values; one sample, so no uncertainty map), one lesion kept."""
    def find(cls: type[W], name: str) -> W:
        return panel.findChild(cls, name)

    for name, text in NODE_NAMES.items():
        find(QtWidgets.QComboBox, name).addItem(text)
    find(QtWidgets.QComboBox, "modelSelector").addItems(
        ["ddpm-t1 (ddpm, T1)", "dae-t1 (dae, T1)", "intensity-t1 (intensity, T1)"])
    find(QtWidgets.QLabel, "modelCardLabel").setText(
        "<b>Denoising diffusion model</b>, T1w; trained on 200 augmented healthy brains from MNI/ICBM "
        "templates; licence: MNI notice (see README, Data and licences)")
    for name, value in DIFFUSION.items():
        find(QtWidgets.QSpinBox, name).setValue(value)
    find(QtWidgets.QComboBox, "diffusionNoiseComboBox").setCurrentText(DIFFUSION_NOISE)
    find(QtWidgets.QCheckBox, "showUncertaintyCheckBox").setEnabled(False)  # one sample: no uncertainty map
    find(QtWidgets.QLabel, "deviceInfoLabel").setText("Detected: CPU only")
    find(QtWidgets.QFrame, "dependenciesFrame").hide()  # PyTorch and MONAI already installed
    find(QtWidgets.QPushButton, "applyButton").setEnabled(True)
    find(QtWidgets.QProgressBar, "progressBar").setValue(100)
    find(QtWidgets.QLabel, "statusLabel").setText("Done: 1 lesion, 7.1 mL")
    for spin in panel.findChildren(QtWidgets.QDoubleSpinBox):
        spin.setFixedWidth(84)  # equal spin boxes keep the slider ends aligned
    for name, value in (("thresholdSliderWidget", 0.199), ("minLesionSizeSliderWidget", 50),
                        ("overlayOpacitySliderWidget", 0.5), ("fadeSliderWidget", 0.0)):
        _set_slider(panel, name, value)
    find(QtWidgets.QLabel, "fprLabel").setText("Healthy false-positive rate: 1.0 %")
    swatches = "".join(f"<span style='background-color:{c}'>&nbsp;&nbsp;&nbsp;</span>"
                       for c in ("#800000", "#d02000", "#ff7000", "#ffc000", "#ffff60"))
    find(QtWidgets.QLabel, "legendLabel").setText(
        f"Anomaly map: low {swatches} high<br><span style='color:#d8b000'>&#9632;</span> Anomaly segment")
    find(QtWidgets.QLabel, "legendLabel").setTextFormat(QtCore.Qt.TextFormat.RichText)

    table = find(QtWidgets.QTableWidget, "lesionTableView")
    headers = ["ID", "Volume (mL)", "Max score", "Mean score", "R", "A", "S", "Status"]
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels([h.replace(" ", "\n") for h in headers])  # two-line headers fit 420 px
    table.setRowCount(len(LESIONS))
    for r, row in enumerate(LESIONS):
        for c, value in enumerate(row):
            table.setItem(r, c, QtWidgets.QTableWidgetItem(value))
    table.verticalHeader().hide()
    small = QtGui.QFont(table.font())
    small.setPixelSize(FONT_PX - 1)  # eight columns have to fit in a 420 px panel
    table.setFont(small)
    table.horizontalHeader().setFont(small)
    table.setStyleSheet("QHeaderView::section { padding: 2px 3px; }")
    table.resizeColumnsToContents()
    table.resizeRowsToContents()
    table.horizontalHeader().setStretchLastSection(True)
    table.selectRow(0)
    find(QtWidgets.QLabel, "lesionSummaryLabel").setText("1 lesion kept (7.1 mL), 2 rejected")

    folder = find(QtWidgets.QPushButton, "exportDirectoryButton")
    folder.setText("~/NormativeAnomaly/demo_t1")
    folder.setIcon(panel.style().standardIcon(QtWidgets.QStyle.StandardPixmap.SP_DirIcon))
    folder.setStyleSheet("text-align: left; padding: 3px 6px;")  # ctkDirectoryButton shows the path left-aligned


def render(ui_file: Path, output: Path) -> QtCore.QSize:
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app.setStyle("Fusion")  # same look on every platform
    font = QtGui.QFont("DejaVu Sans")
    font.setPixelSize(FONT_PX)
    app.setFont(font)

    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(convert_ui(ui_file.read_text(encoding="utf-8"))))
    buffer.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
    panel = QtUiTools.QUiLoader().load(buffer)
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load {ui_file}")
    fill_example(panel)
    panel.setStyleSheet("QGroupBox { font-weight: bold; }")  # section headers stand out like Slicer's

    window = QtWidgets.QWidget()
    layout = QtWidgets.QVBoxLayout(window)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.setSpacing(0)
    caption = QtWidgets.QLabel(CAPTION)
    caption.setWordWrap(True)
    caption.setStyleSheet("background: #3a3f44; color: white; padding: 6px 8px; font-style: italic;")
    layout.addWidget(caption)
    layout.addWidget(panel)
    window.setFixedWidth(WIDTH)
    window.show()
    app.processEvents()
    # QFormLayout over-allocates height-for-width rows: pin each wrapped label to its real height,
    # then shrink the window to its minimum so the bottom spacer takes no room.
    for label in window.findChildren(QtWidgets.QLabel):
        if label.wordWrap() and label.isVisible():
            label.setFixedHeight(label.heightForWidth(label.width()))
    # The window's minimum size ignores heights for width: a section holding a group box (the
    # diffusion settings) would be squeezed. Pin every section to its height at this width too.
    app.processEvents()
    for box in panel.findChildren(QtWidgets.QGroupBox):
        if box.parentWidget() is panel:
            box.setFixedHeight(box.heightForWidth(box.width()) if box.hasHeightForWidth()
                               else box.sizeHint().height())
    window.resize(WIDTH, window.minimumSizeHint().height())
    app.processEvents()
    image = window.grab()
    output.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(output)):
        raise RuntimeError(f"could not write {output}")
    return image.size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ui", type=Path, default=UI_FILE)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    size = render(args.ui, args.output)
    print(f"wrote {args.output} ({size.width()}x{size.height()})")


if __name__ == "__main__":
    main()
