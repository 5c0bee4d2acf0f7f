"""Render a picture of the RadBridge Slicer panel from RadBridge.ui, without Slicer.

The README shows the panel, but Slicer cannot be installed on the development machines. This
script loads the real ``RadBridge/Resources/UI/RadBridge.ui`` with PySide6 (offscreen), maps
Slicer's custom widgets to plain Qt ones, fills illustrative values and saves a PNG with a
caption saying so. It is reproducible: run it again whenever the .ui changes.

    pip install -e ".[docs]"
    python slicer_extension/tools/render_panel.py [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TypeVar

try:
    from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets
except ImportError:  # pragma: no cover - depends on the environment
    raise SystemExit('render_panel needs PySide6: pip install -e ".[docs]"') from None

W = TypeVar("W", bound=QtWidgets.QWidget)

EXTENSION = Path(__file__).resolve().parents[1]
UI_FILE = EXTENSION / "RadBridge" / "Resources" / "UI" / "RadBridge.ui"
DEFAULT_OUT = EXTENSION / "Screenshots" / "RadBridge.png"

WIDTH, HEIGHT = 420, 900
CAPTION = "RadBridge.ui rendered with Qt outside Slicer (illustrative values)"

#: Slicer/CTK widget class -> the plain Qt class drawn in its place.
CLASS_MAP = {"ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox", "qMRMLWidget": "QWidget"}
#: Properties of qMRMLNodeComboBox that QComboBox does not have.
MRML_ONLY_PROPERTIES = {"nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled"}

MODEL_TASKS = "Tasks: report, detect, segment · modalities: CT, CR, DX · non-clinical"
SERIES = [
    "CT chest · 3 Axial 1.0 mm · CT · 120 images",
    "CT chest · 2 Scout · CT · 2 images",
    "CT chest · 9701 RadBridge SEG · SEG · 1 image  [RadBridge]",
]
REPORT = (
    "Findings: Threshold analysis of 120 slices. Body volume 21840 mL; aerated lung (< -400 HU) "
    "4310 mL; bone (> 250 HU) 1720 mL; soft tissue 14960 mL.\n\n"
    "Impression: Illustrative output of the weight-free reference backend (fixed thresholds, "
    "no trained model); no diagnostic interpretation is made."
)
FINDINGS = [("Aerated lung", "present", "—"), ("Bone", "present", "—"), ("Soft tissue", "present", "—")]


def slicer_free_ui(path: Path) -> bytes:
    """The .ui XML with Slicer's custom widgets replaced by Qt ones and Slicer-only blocks removed."""
    root = ET.parse(path).getroot()
    for block in ("customwidgets", "connections"):
        for element in root.findall(block):
            root.remove(element)
    for widget in root.iter("widget"):
        slicer_class = widget.get("class", "")
        if slicer_class not in CLASS_MAP:
            continue
        widget.set("class", CLASS_MAP[slicer_class])
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if slicer_class == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
            elif slicer_class == "qMRMLNodeComboBox" and name in MRML_ONLY_PROPERTIES:
                widget.remove(prop)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def fill(panel: QtWidgets.QWidget) -> None:
    """Puts an illustrative state into the panel's widgets, found by objectName."""

    def child(cls: type[W], name: str) -> W:
        widget = panel.findChild(cls, name)
        if widget is None:
            raise SystemExit(f"render_panel: {name} ({cls.__name__}) is not in {UI_FILE.name}")
        return widget

    child(QtWidgets.QLineEdit, "serverAddressLineEdit").setText("localhost:50051")
    child(QtWidgets.QComboBox, "modelComboBox").addItem("reference")
    child(QtWidgets.QComboBox, "dicomSeriesComboBox").addItems(SERIES)
    child(QtWidgets.QComboBox, "inputVolumeSelector").addItem("3: Axial 1.0 mm")
    # As after Connect: the reference model's tasks enabled, the others disabled.
    child(QtWidgets.QLabel, "modelTasksLabel").setText(MODEL_TASKS)
    for name, checked, enabled in [
        ("segmentCheckBox", True, True),
        ("detectCheckBox", False, True),
        ("classifyCheckBox", False, False),
        ("reportCheckBox", True, True),
        ("vqaCheckBox", False, False),
    ]:
        child(QtWidgets.QCheckBox, name).setChecked(checked)
        child(QtWidgets.QCheckBox, name).setEnabled(enabled)
    child(QtWidgets.QProgressBar, "progressBar").setValue(100)
    child(QtWidgets.QLabel, "statusLabel").setText("Done.")
    child(QtWidgets.QTextBrowser, "reportTextBrowser").setPlainText(REPORT)

    table = child(QtWidgets.QTableWidget, "findingsTableWidget")
    table.setRowCount(len(FINDINGS))
    for row, values in enumerate(FINDINGS):
        for column, value in enumerate(values):
            table.setItem(row, column, QtWidgets.QTableWidgetItem(value))
    header = table.horizontalHeader()
    header.setSectionResizeMode(0, QtWidgets.QHeaderView.ResizeMode.Stretch)
    for column in (1, 2):
        header.setSectionResizeMode(column, QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
    table.verticalHeader().setVisible(False)

    child(QtWidgets.QLineEdit, "outputDirectoryLineEdit").clear()


def render(out: Path) -> Path:
    os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before the QApplication: no display needed
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([sys.argv[0]])
    app.setStyle("Fusion")
    app.setFont(QtGui.QFont("DejaVu Sans", 9))

    data = QtCore.QByteArray(slicer_free_ui(UI_FILE))
    buffer = QtCore.QBuffer(data)
    buffer.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
    panel = QtUiTools.QUiLoader().load(buffer)
    buffer.close()
    if panel is None:
        raise SystemExit(f"render_panel: QUiLoader could not load {UI_FILE}")

    fill(panel)
    panel.resize(WIDTH, HEIGHT)
    panel.show()
    app.processEvents()
    focused = app.focusWidget()
    if focused is not None:  # no text cursor or focus frame in the picture
        focused.clearFocus()
        app.processEvents()

    picture = panel.grab().toImage()  # offscreen: device pixel ratio 1
    strip = 24
    image = QtGui.QImage(picture.width(), picture.height() + strip, QtGui.QImage.Format.Format_RGB32)
    painter = QtGui.QPainter(image)
    painter.drawImage(0, 0, picture)
    band = QtCore.QRect(0, picture.height(), picture.width(), strip)
    painter.fillRect(band, QtGui.QColor("#3b3b3b"))
    painter.setPen(QtGui.QColor("white"))
    painter.setFont(QtGui.QFont("DejaVu Sans", 8))
    painter.drawText(band, QtCore.Qt.AlignmentFlag.AlignCenter, CAPTION)
    painter.end()

    out.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(out), "PNG"):
        raise SystemExit(f"render_panel: could not write {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    out = render(args.out)
    print(f"{out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
