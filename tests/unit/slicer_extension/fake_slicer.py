"""Small fakes of ``slicer``, ``qt``, ``ctk`` and ``vtk`` so that RadBridge.py runs without Slicer.

Only what the module touches is faked, and every fake records what it was asked to do. The fake
``slicer.util.loadUI`` parses the real ``RadBridge.ui`` and makes one fake widget per objectName,
so the widget code fails here (AttributeError) when it uses a name the .ui file lacks.
"""

from __future__ import annotations

import contextlib
import types
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np


class FakeWidget:
    """A Qt widget/property bag: records setValue/setText calls and signal connections."""

    def __init__(self, name: str = "", cls: str = "QWidget") -> None:
        self.objectName = name
        self.className = cls
        self.text = ""
        self.checked = False
        self.enabled = True
        self.value = 0
        self.values: list[int] = []
        self.texts: list[str] = []
        self.plainText = ""
        self.items: list[str] = []
        self.cells: dict[tuple[int, int], object] = {}
        self.rowCount = 0
        self.slots: dict[str, list] = defaultdict(list)
        self._currentNode = None
        self.scene = None
        self.currentIndex = 0

    # signals
    def connect(self, signal: str, slot) -> None:
        self.slots[signal].append(slot)

    def emit(self, signal: str, *args) -> None:
        for slot in list(self.slots[signal]):
            slot(*args)

    def click(self) -> None:
        self.emit("clicked(bool)", False)

    # QProgressBar / QLabel / QTextBrowser
    def setValue(self, value: int) -> None:
        self.value = value
        self.values.append(value)

    def setText(self, text: str) -> None:
        self.text = text
        self.texts.append(text)

    def setPlainText(self, text: str) -> None:
        self.plainText = text

    # QComboBox
    def clear(self) -> None:
        self.items.clear()

    def addItem(self, text: str) -> None:
        self.items.append(text)

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex] if 0 <= self.currentIndex < len(self.items) else ""

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    # QTableWidget
    def setRowCount(self, n: int) -> None:
        self.rowCount = n

    def setItem(self, row: int, column: int, item: object) -> None:
        self.cells[(row, column)] = item

    # qMRMLNodeComboBox / qMRMLWidget
    def currentNode(self):
        return self._currentNode

    def setCurrentNode(self, node) -> None:
        self._currentNode = node

    def setMRMLScene(self, scene) -> None:
        self.scene = scene


class FakeUI(FakeWidget):
    def __init__(self, path: str) -> None:
        super().__init__(Path(path).stem, "qMRMLWidget")
        self.path = path
        root = ET.parse(path).getroot()
        self.children = {}
        for w in root.iter("widget"):
            widget = FakeWidget(w.get("name"), w.get("class"))
            # the .ui's initial `checked` and `text` properties, as Qt would set them
            for prop in w.findall("property"):
                if prop.get("name") == "checked":
                    widget.checked = prop.findtext("bool") == "true"
                elif prop.get("name") == "text":
                    widget.text = prop.findtext("string") or ""
            self.children[w.get("name")] = widget


class FakeLayout:
    def __init__(self) -> None:
        self.widgets: list[object] = []

    def addWidget(self, widget: object) -> None:
        self.widgets.append(widget)

    def addStretch(self, *_: object) -> None:
        pass


class FakeMatrix4x4:
    def __init__(self) -> None:
        self.array = np.eye(4)

    def GetElement(self, r: int, c: int) -> float:
        return float(self.array[r, c])

    def SetElement(self, r: int, c: int, v: float) -> None:
        self.array[r, c] = v


class FakeVolumeNode:
    def __init__(self, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "CT") -> None:
        self.array = array
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
        self.name = name
        self.attributes: dict[str, str] = {}
        self.node_id = ""

    def GetName(self) -> str:
        return self.name

    def GetID(self) -> str:
        return self.node_id

    def IsA(self, class_name: str) -> bool:
        return class_name in ("vtkMRMLScalarVolumeNode", "vtkMRMLVolumeNode", "vtkMRMLNode")

    def GetAttribute(self, key: str) -> str | None:
        return self.attributes.get(key)

    def SetAttribute(self, key: str, value: str) -> None:
        self.attributes[key] = value

    def GetIJKToRASMatrix(self, matrix: FakeMatrix4x4) -> None:
        matrix.array = self.ijk_to_ras.copy()


class FakeSegment:
    def __init__(self, name: str, color: list[float]) -> None:
        self.name = name
        self.color = color
        self.tags: dict[str, str] = {}

    def SetTag(self, key: str, value: str) -> None:
        self.tags[key] = value


class FakeSegmentation:
    def __init__(self) -> None:
        self.segments: dict[str, FakeSegment] = {}

    def AddEmptySegment(self, segment_id: str, name: str, color: list[float]) -> str:
        self.segments[segment_id] = FakeSegment(name, color)
        return segment_id

    def GetSegment(self, segment_id: str) -> FakeSegment:
        return self.segments[segment_id]

    def GetNumberOfSegments(self) -> int:
        return len(self.segments)


class FakeNode:
    def __init__(self, class_name: str, name: str) -> None:
        self.class_name = class_name
        self.name = name
        self.description = ""
        self.reference = None
        self.display_nodes = False
        self.segmentation = FakeSegmentation()

    def GetName(self) -> str:
        return self.name

    def CreateDefaultDisplayNodes(self) -> None:
        self.display_nodes = True

    def SetReferenceImageGeometryParameterFromVolumeNode(self, node: object) -> None:
        self.reference = node

    def GetSegmentation(self) -> FakeSegmentation:
        return self.segmentation

    def SetDescription(self, text: str) -> None:
        self.description = text


class FakeScene:
    StartCloseEvent = 66000

    def __init__(self) -> None:
        self.nodes: list[FakeNode] = []
        self.volumes: dict[str, FakeVolumeNode] = {}

    def AddNewNodeByClass(self, class_name: str, name: str = "") -> FakeNode:
        node = FakeNode(class_name, name)
        self.nodes.append(node)
        return node

    def add_volume(self, node: FakeVolumeNode) -> str:
        node.node_id = f"vtkMRMLScalarVolumeNode{len(self.volumes) + 1}"
        self.volumes[node.node_id] = node
        return node.node_id

    def GetNodeByID(self, node_id: str) -> FakeVolumeNode | None:
        return self.volumes.get(node_id)

    def Clear(self) -> None:
        self.nodes.clear()
        self.volumes.clear()


class FolderDatabase:
    """The ctkDICOMDatabase methods the module uses, over real files read with pydicom."""

    def __init__(self, paths: list[Path] = ()) -> None:
        self.isOpen = True
        self.headers: dict[str, object] = {}
        self.asked: list[str] = []
        self.add(paths)

    def add(self, paths) -> None:
        import pydicom

        for p in paths:
            self.headers[str(p)] = pydicom.dcmread(p, stop_before_pixels=True)

    def patients(self) -> list[str]:
        return sorted({str(ds.PatientID) for ds in self.headers.values()})

    def studiesForPatient(self, patient: str) -> list[str]:
        return sorted({str(ds.StudyInstanceUID) for ds in self.headers.values() if ds.PatientID == patient})

    def seriesForStudy(self, study: str) -> list[str]:
        return sorted(
            {str(ds.SeriesInstanceUID) for ds in self.headers.values() if ds.StudyInstanceUID == study}
        )

    def filesForSeries(self, series: str) -> list[str]:
        return sorted(p for p, ds in self.headers.items() if ds.SeriesInstanceUID == series)

    def instancesForSeries(self, series: str) -> list[str]:
        return [str(self.headers[p].SOPInstanceUID) for p in self.filesForSeries(series)]

    def fileForInstance(self, uid: str) -> str:
        return next((p for p, ds in self.headers.items() if ds.SOPInstanceUID == uid), "")

    def fileValue(self, path: str, tag: str) -> str:
        self.asked.append(tag)
        group, element = (int(x, 16) for x in tag.split(","))
        value = self.headers[path].get((group, element))
        return "" if value is None else str(value.value)


def slicer_volume(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """What Slicer's DICOM scalar-volume loader makes of a single-frame series.

    Returns the (k, j, i) array in modality units, IJKToRAS and the SOP Instance UIDs in k order:
    slices sorted along the normal, i = DICOM column index, j = row index, RAS = LPS with x and y
    negated, k spacing from the first and last positions.
    """
    import pydicom

    full = [pydicom.dcmread(p) for p in paths]
    iop = np.array([float(v) for v in full[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    full.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    voxels = np.stack(
        [ds.pixel_array.astype(np.int16) * int(ds.RescaleSlope) + int(ds.RescaleIntercept) for ds in full]
    ).astype(np.int16)
    first = np.array([float(v) for v in full[0].ImagePositionPatient])
    last = np.array([float(v) for v in full[-1].ImagePositionPatient])
    row_mm, column_mm = (float(v) for v in full[0].PixelSpacing)
    m_lps = np.eye(4)
    m_lps[:3, 0] = iop[:3] * column_mm
    m_lps[:3, 1] = iop[3:] * row_mm
    m_lps[:3, 2] = (last - first) / max(len(full) - 1, 1) if len(full) > 1 else normal
    m_lps[:3, 3] = first
    return voxels, np.diag([-1.0, -1.0, 1.0, 1.0]) @ m_lps, [str(ds.SOPInstanceUID) for ds in full]


class VTKObservationMixin:
    def __init__(self) -> None:
        self.observations: list[tuple] = []

    def addObserver(self, obj, event, method) -> None:
        self.observations.append((obj, event, method))

    def removeObservers(self, *_: object) -> None:
        self.observations.clear()


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    resourceDir: Path = Path()

    def __init__(self, parent=None) -> None:
        self.parent = parent
        self.layout = FakeLayout()

    def setup(self) -> None:
        pass

    def resourcePath(self, filename: str) -> str:
        return str(self.resourceDir / filename)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class ScriptedLoadableModuleTest:
    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        pass


class Recorder:
    """Everything the fake slicer.util and qt were asked to do."""

    def __init__(self) -> None:
        self.timers: list[tuple[int, object]] = []
        self.errors: list[str] = []
        self.status: list[str] = []
        self.pip: list[str] = []
        self.labelmaps: list[tuple] = []
        self.control_points: list[tuple] = []
        self.caught: list[BaseException] = []
        self.loaded_series: list[str] = []
        self.imported_folders: list[str] = []

    def run_timers(self, limit: int = 1000) -> int:
        """Fires the pending QTimer.singleShot callbacks (and those they arm); returns how many ran."""
        ran = 0
        while self.timers and ran < limit:
            _, callback = self.timers.pop(0)
            callback()
            ran += 1
        return ran


def install(
    monkeypatch, resource_dir: Path, temporary_path: Path | None = None
) -> tuple[types.ModuleType, Recorder]:
    """Puts the fakes into sys.modules (undone by monkeypatch) and returns (slicer, recorder)."""
    import sys

    rec = Recorder()

    qt = types.ModuleType("qt")

    class QTimer:
        @staticmethod
        def singleShot(msec: int, callback) -> None:
            rec.timers.append((msec, callback))

    class QTableWidgetItem:
        def __init__(self, text: str = "") -> None:
            self.text = text

    qt.QTimer = QTimer
    qt.QTableWidgetItem = QTableWidgetItem

    ctk = types.ModuleType("ctk")
    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4 = FakeMatrix4x4

    slicer = types.ModuleType("slicer")
    slicer.__path__ = []  # a package, so that `import slicer.util` works
    slicer.mrmlScene = FakeScene()
    slicer.app = types.SimpleNamespace(processEvents=lambda: None, temporaryPath=str(temporary_path or ""))
    slicer.dicomDatabase = FolderDatabase()

    util = types.ModuleType("slicer.util")

    def loadUI(path: str) -> FakeUI:
        return FakeUI(path)

    def childWidgetVariables(ui: FakeUI) -> types.SimpleNamespace:
        return types.SimpleNamespace(**ui.children)

    @contextlib.contextmanager
    def tryWithErrorDisplay(message: str = "", show: bool = True, waitCursor: bool = False):
        try:
            yield
        except Exception as exc:
            rec.caught.append(exc)
            rec.errors.append(f"{message}\n{exc}" if message else str(exc))

    def errorDisplay(text: str, *_, **__) -> None:
        rec.errors.append(text)

    def updateSegmentBinaryLabelmapFromArray(
        array, segmentationNode, segmentId, referenceVolumeNode=None
    ) -> None:
        rec.labelmaps.append((segmentId, np.array(array), segmentationNode, referenceVolumeNode))

    def updateMarkupsControlPointsFromArray(node, points) -> None:
        rec.control_points.append((node, np.array(points)))

    util.loadUI = loadUI
    util.childWidgetVariables = childWidgetVariables
    util.tryWithErrorDisplay = tryWithErrorDisplay
    util.errorDisplay = errorDisplay
    util.showStatusMessage = lambda text, *_: rec.status.append(text)
    util.pip_install = lambda requirements: rec.pip.append(requirements)
    util.arrayFromVolume = lambda node: node.array
    util.arrayFromVTKMatrix = lambda matrix: matrix.array.copy()
    util.updateSegmentBinaryLabelmapFromArray = updateSegmentBinaryLabelmapFromArray
    util.updateMarkupsControlPointsFromArray = updateMarkupsControlPointsFromArray
    util.VTKObservationMixin = VTKObservationMixin
    util.getNodesByClass = lambda class_name: [
        n for n in slicer.mrmlScene.volumes.values() if n.IsA(class_name)
    ]
    slicer.util = util

    dicomlib = types.ModuleType("DICOMLib")
    dicom_utils = types.ModuleType("DICOMLib.DICOMUtils")

    def loadSeriesByUID(series_uids: list[str]) -> list[str]:
        ids = []
        for uid in series_uids:
            rec.loaded_series.append(uid)
            files = slicer.dicomDatabase.filesForSeries(uid)
            if not files:
                continue
            first = slicer.dicomDatabase.headers[files[0]]
            if first.Modality in ("SEG", "SR"):
                continue  # the fake loads image series only
            voxels, ijk_to_ras, uids = slicer_volume([Path(f) for f in files])
            node = FakeVolumeNode(voxels, ijk_to_ras, name=f"{first.SeriesNumber}: {first.SeriesDescription}")
            node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
            ids.append(slicer.mrmlScene.add_volume(node))
        return ids

    def importDicom(folder: str, dicomDatabase=None, copyFiles: bool = False) -> None:
        rec.imported_folders.append(str(folder))
        slicer.dicomDatabase.add(sorted(Path(folder).glob("*.dcm")))

    dicom_utils.loadSeriesByUID = loadSeriesByUID
    dicom_utils.importDicom = importDicom
    dicomlib.DICOMUtils = dicom_utils

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    slicer.ScriptedLoadableModule = slm

    ScriptedLoadableModuleWidget.resourceDir = resource_dir
    for name, module in {
        "qt": qt,
        "ctk": ctk,
        "vtk": vtk,
        "slicer": slicer,
        "slicer.util": util,
        "slicer.ScriptedLoadableModule": slm,
        "DICOMLib": dicomlib,
        "DICOMLib.DICOMUtils": dicom_utils,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return slicer, rec
