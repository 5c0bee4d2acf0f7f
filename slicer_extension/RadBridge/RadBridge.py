"""RadBridge: send the selected volume to a RadBridge inference service and import the results.

Slicer's four classes only (Module, Widget, Logic, Test); everything that does not need Slicer
lives in ``RadBridgeLib`` (client, geometry, results, background jobs) and is tested without it.
The GUI never blocks: the analysis runs in a worker thread (``RadBridgeLib.jobs``) and the widget
polls it with ``qt.QTimer.singleShot``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# RadBridgeLib.client imports the generated contract ``protos.radbridge.v1``, which lives at the
# repository root, not inside the extension. When the module runs from a source checkout
# (<repo>/slicer_extension/RadBridge/RadBridge.py), the repository root is two levels up from
# this file: put it on sys.path (only if ``protos/`` is really there) so that
# ``import protos.radbridge.v1`` works inside Slicer. Nothing else is imported from the
# repository, and RadBridgeLib itself is imported lazily, after the grpc/protobuf check.
_REPO_ROOT = Path(__file__).resolve().parents[2]
if (_REPO_ROOT / "protos").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.append(str(_REPO_ROOT))

#: Task name -> the objectName of its checkbox in RadBridge.ui.
TASK_CHECKBOXES = {
    "segment": "segmentCheckBox",
    "detect": "detectCheckBox",
    "classify": "classifyCheckBox",
    "report": "reportCheckBox",
    "vqa": "vqaCheckBox",
}
#: Python module -> pip requirement that the client needs and Slicer does not ship.
DEPENDENCIES = {"grpc": "grpcio", "google.protobuf": "protobuf"}
#: ... and what Save as DICOM / Load RadBridge results need on top (the node's writer, highdicom).
DICOM_DEPENDENCIES = {"highdicom": "highdicom==0.28.*", "scipy": "scipy"}
DEFAULT_ADDRESS = "localhost:50051"


#
# RadBridge
#


class RadBridge(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadBridge"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["RadBridge contributors"]
        self.parent.helpText = (
            "Sends the selected volume to a RadBridge inference service (gRPC) and imports the "
            "segmentation, boxes, findings and report it returns. Not for clinical use."
        )
        self.parent.acknowledgementText = (
            "The background-job design follows SlicerMONAIAuto3DSeg (Andras Lasso and contributors)."
        )


#
# RadBridgeWidget
#


class RadBridgeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: every action goes to the logic inside ``slicer.util.tryWithErrorDisplay``."""

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._polling = False
        self._volumeNode = None
        self._lastResult = None
        self._importedNodes = None
        self._seriesEntries = []
        self._models = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadBridge.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RadBridgeLogic()
        self.ui.serverAddressLineEdit.text = os.environ.get("RADBRIDGE_ADDRESS", DEFAULT_ADDRESS)

        self.ui.connectButton.connect("clicked(bool)", self.onConnectButton)
        self.ui.runButton.connect("clicked(bool)", self.onRunButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.saveDicomButton.connect("clicked(bool)", self.onSaveDicomButton)
        self.ui.refreshDicomButton.connect("clicked(bool)", self.onRefreshDicomButton)
        self.ui.loadSeriesButton.connect("clicked(bool)", self.onLoadSeriesButton)
        self.ui.loadResultsButton.connect("clicked(bool)", self.onLoadResultsButton)
        self.ui.tlsCheckBox.connect("toggled(bool)", self.updateGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.refreshDicomSeries(quiet=True)
        self.updateGUI()

    def cleanup(self):
        self._polling = False
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def onSceneStartClose(self, caller=None, event=None):
        # The imported nodes go away with the scene; a running analysis is cancelled.
        if self.logic is not None:
            self.logic.cancel()
        self._importedNodes = None

    # -- state -------------------------------------------------------------------------------
    def selectedTasks(self):
        return [task for task, name in TASK_CHECKBOXES.items() if getattr(self.ui, name).checked]

    def updateGUI(self, *_):
        if self.ui is None:
            return
        running = self.logic is not None and self.logic.running
        connected = self.logic is not None and self.logic.connected
        tls = bool(self.ui.tlsCheckBox.checked)
        self.ui.caFileLineEdit.enabled = tls
        self.ui.clientCertLineEdit.enabled = tls
        self.ui.clientKeyLineEdit.enabled = tls
        self.ui.connectButton.enabled = not running
        self.ui.runButton.enabled = (
            connected and not running and self.ui.inputVolumeSelector.currentNode() is not None
        )
        self.ui.cancelButton.enabled = running
        self.ui.saveDicomButton.enabled = not running and self._lastResult is not None
        self.ui.loadSeriesButton.enabled = not running and bool(self._seriesEntries)
        self.ui.loadResultsButton.enabled = not running and bool(self._seriesEntries)

    def setStatus(self, text):
        self.ui.statusLabel.setText(text)

    # -- actions -------------------------------------------------------------------------------
    def onConnectButton(self, *_):
        with slicer.util.tryWithErrorDisplay("Could not connect to the RadBridge service.", waitCursor=True):
            address = self.ui.serverAddressLineEdit.text.strip() or DEFAULT_ADDRESS
            self.setStatus(f"Connecting to {address}…")
            models = self.logic.connect(
                address,
                bool(self.ui.tlsCheckBox.checked),
                self.ui.caFileLineEdit.text.strip(),
                self.ui.clientCertLineEdit.text.strip(),
                self.ui.clientKeyLineEdit.text.strip(),
            )
            self._models = list(models)
            self.ui.modelComboBox.clear()
            for model in self._models:
                self.ui.modelComboBox.addItem(model.identity.name)
            self.ui.modelComboBox.setCurrentIndex(0)
            self.onModelChanged()
            self.setStatus(f"Connected to {address}: {len(models)} model(s).")
        self.updateGUI()

    def onModelChanged(self, *_):
        """Shows the chosen model's tasks and modalities; its unsupported tasks are disabled."""
        index = self.ui.modelComboBox.currentIndex
        if not 0 <= index < len(self._models):
            self.ui.modelTasksLabel.setText("")
            for name in TASK_CHECKBOXES.values():
                getattr(self.ui, name).enabled = True
            return
        from RadBridgeLib.client import model_summary

        tasks, line = model_summary(self._models[index])
        self.ui.modelTasksLabel.setText(line)
        for task, name in TASK_CHECKBOXES.items():
            checkbox = getattr(self.ui, name)
            checkbox.enabled = task in tasks
            if task not in tasks:
                checkbox.checked = False

    def onRunButton(self, *_):
        with slicer.util.tryWithErrorDisplay("Could not start the analysis.", waitCursor=True):
            tasks = self.selectedTasks()
            if not tasks:
                raise ValueError("Select at least one task.")
            labels = [s.strip() for s in self.ui.labelsLineEdit.text.split(",") if s.strip()]
            self._volumeNode = self.ui.inputVolumeSelector.currentNode()
            self._lastResult = None
            self.logic.startAnalysis(
                self._volumeNode,
                tasks,
                model=self.ui.modelComboBox.currentText,
                question=self.ui.questionLineEdit.text.strip(),
                labels=labels,
            )
            self.ui.progressBar.setValue(0)
            self.setStatus("Starting the analysis…")
            self._polling = True
            qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)
        self.updateGUI()

    def onCancelButton(self, *_):
        with slicer.util.tryWithErrorDisplay("Could not cancel the analysis."):
            self.logic.cancel()
            self.setStatus("Cancelling…")

    def onSaveDicomButton(self, *_):
        with slicer.util.tryWithErrorDisplay(
            "Could not save the results as DICOM SEG + SR.", waitCursor=True
        ):
            paths = self.logic.saveAsDicom(
                self._lastResult, self._volumeNode, self.ui.outputDirectoryLineEdit.text.strip()
            )
            folder = os.path.dirname(str(paths[0]))
            self.setStatus(
                f"Saved {len(paths)} DICOM object(s) to {folder} and added them to the DICOM database."
            )
            self.refreshDicomSeries(quiet=True)

    # -- Slicer's DICOM database -----------------------------------------------------------------
    def refreshDicomSeries(self, quiet=False):
        """Fills the series list; quiet: a closed database is a status line, not an error box."""
        combo = self.ui.dicomSeriesComboBox
        combo.clear()
        self._seriesEntries = []
        try:
            self._seriesEntries = self.logic.listDicomSeries()
        except ValueError as exc:
            if not quiet:
                raise
            self.setStatus(str(exc))
        for entry in self._seriesEntries:
            combo.addItem(entry.title)
        self.updateGUI()

    def selectedSeries(self):
        index = self.ui.dicomSeriesComboBox.currentIndex
        if not self._seriesEntries or not 0 <= index < len(self._seriesEntries):
            raise ValueError("Choose a series in the DICOM database list first (Refresh fills it).")
        return self._seriesEntries[index]

    def onRefreshDicomButton(self, *_):
        with slicer.util.tryWithErrorDisplay("Could not read Slicer's DICOM database."):
            self.refreshDicomSeries()
            self.setStatus(f"{len(self._seriesEntries)} series in the DICOM database.")

    def onLoadSeriesButton(self, *_):
        with slicer.util.tryWithErrorDisplay("Could not load the series.", waitCursor=True):
            node = self.logic.loadSeries(self.selectedSeries())
            self.ui.inputVolumeSelector.setCurrentNode(node)
            self.setStatus(f"Loaded '{node.GetName()}' as the input volume.")
        self.updateGUI()

    def onLoadResultsButton(self, *_):
        with slicer.util.tryWithErrorDisplay("Could not load RadBridge results.", waitCursor=True):
            loaded = self.logic.loadStoredResults(self.selectedSeries())
            volumeNode, result, nodes = loaded[-1]
            self._volumeNode, self._lastResult, self._importedNodes = volumeNode, result, nodes
            self.ui.inputVolumeSelector.setCurrentNode(volumeNode)
            self.showResults(result)
            models = ", ".join(sorted({r.model_name or "unknown model" for _, r, _ in loaded}))
            self.setStatus(f"Loaded RadBridge results ({models}) onto '{volumeNode.GetName()}'.")
        self.updateGUI()

    # -- polling (main thread) -------------------------------------------------------------------
    def _poll(self):
        if not self._polling:
            return
        from RadBridgeLib.jobs import Cancelled, Done, Failed, Progress

        finished = False
        for event in self.logic.poll():
            if isinstance(event, Progress):
                self.ui.progressBar.setValue(int(round(100 * event.fraction)))
                self.setStatus(event.message or f"{100 * event.fraction:.0f} %")
            elif isinstance(event, Done):
                finished = True
                self.ui.progressBar.setValue(100)
                self.setStatus("Done.")
                self.onAnalysisDone(event.result)
            elif isinstance(event, Failed):
                finished = True
                self.setStatus(f"Failed: {event.message}")
                slicer.util.errorDisplay(f"The analysis failed: {event.message}")
            elif isinstance(event, Cancelled):
                finished = True
                self.setStatus("Cancelled.")
        if finished:
            self._polling = False
            self.updateGUI()
        else:
            qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)

    def onAnalysisDone(self, result):
        self._lastResult = result
        with slicer.util.tryWithErrorDisplay("Could not import the results.", waitCursor=True):
            self.showResults(result)
            self._importedNodes = self.logic.importResults(result, self._volumeNode)

    def showResults(self, result):
        """The report text (and VQA answer) and the findings table of the panel."""
        from RadBridgeLib.results import findings_table

        text = result.report_text
        if result.answer:
            text = f"{text}\n\nAnswer: {result.answer}" if text else f"Answer: {result.answer}"
        self.ui.reportTextBrowser.setPlainText(text)
        rows = findings_table(result)
        table = self.ui.findingsTableWidget
        table.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for column, value in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(value))


#
# RadBridgeLogic
#


class RadBridgeLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget (from the Python console or a test).

    ``clientFactory(address, tls=..., ca_file=...[, cert_file=..., key_file=...])`` builds the
    client; the default is
    ``RadBridgeLib.RadBridgeClient``.
    """

    def __init__(self, clientFactory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.clientFactory = clientFactory
        self.client = None
        self.job = None

    @property
    def connected(self):
        return self.client is not None

    @property
    def running(self):
        return self.job is not None and self.job.running

    def ensureDependencies(self, dependencies=None):
        """Installs what is missing into Slicer's Python on first use (never at import time).

        ``dependencies`` maps module -> pip requirement; default: the gRPC client's.
        """
        import importlib

        missing = []
        for module, requirement in (dependencies or DEPENDENCIES).items():
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(requirement)
        if not missing:
            return False
        message = f"RadBridge needs {', '.join(missing)}; installing into Slicer's Python…"
        logging.info(message)
        slicer.util.showStatusMessage(message)
        slicer.util.pip_install(" ".join(missing))
        return True

    def connect(self, address, tls=False, caFile="", certFile="", keyFile=""):
        """Opens a channel and returns the models the service has loaded (raises if unreachable).

        ``certFile``/``keyFile``: our client certificate, for a service requiring mutual TLS.
        """
        self.ensureDependencies()
        factory = self.clientFactory
        if factory is None:
            from RadBridgeLib.client import RadBridgeClient

            factory = RadBridgeClient
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()
        self.client = None
        if certFile or keyFile:
            client = factory(
                address,
                tls=bool(tls),
                ca_file=caFile or None,
                cert_file=certFile or None,
                key_file=keyFile or None,
            )
        else:
            client = factory(address, tls=bool(tls), ca_file=caFile or None)
        models = client.list_models()
        self.client = client
        return models

    def listModels(self):
        if self.client is None:
            raise ValueError("Connect to a RadBridge service first.")
        return self.client.list_models()

    def startAnalysis(self, volumeNode, tasks, model="", question="", labels=()):
        """Starts the analysis in a worker thread and returns at once; follow it with poll()."""
        from RadBridgeLib.jobs import BackgroundAnalysis

        if self.client is None:
            raise ValueError("Connect to a RadBridge service first.")
        if volumeNode is None:
            raise ValueError("Select an input volume.")
        if self.running:
            raise RuntimeError("An analysis is already running; cancel it first.")
        # Copies, so that the worker never reads a volume the user edits meanwhile.
        voxels = slicer.util.arrayFromVolume(volumeNode).copy()
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
        client = self.client
        tasks, labels = list(tasks), list(labels)

        def work(onProgress, cancelEvent):
            return client.analyze(
                voxels,
                ijkToRas,
                tasks,
                model=model or "",
                question=question or "",
                labels=labels,
                on_progress=onProgress,
                cancel_event=cancelEvent,
            )

        self.job = BackgroundAnalysis(work).start()
        return self.job

    def poll(self):
        """Events since the last call (Progress…, then one of Done/Failed/Cancelled); never blocks."""
        return self.job.poll() if self.job is not None else []

    def cancel(self):
        if self.job is not None:
            self.job.cancel()

    def importResults(self, result, volumeNode):
        """One segmentation node (a segment per mask) and one closed-curve markup per box.

        Returns ``{"segmentation": node or None, "markups": [nodes]}``.
        """
        from RadBridgeLib.results import box_markups, segment_specs

        nodes = {"segmentation": None, "markups": []}
        specs = segment_specs(result)
        baseName = volumeNode.GetName() if volumeNode is not None else "RadBridge"
        if specs:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{baseName} RadBridge segmentation"
            )
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentation = segmentationNode.GetSegmentation()
            for spec in specs:
                segmentId = segmentation.AddEmptySegment(
                    f"segment_{spec.segment_number}", spec.name, list(spec.color_rgb)
                )
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    spec.mask.astype("uint8"), segmentationNode, segmentId, volumeNode
                )
                entry = _terminologyEntry(spec)
                if entry:
                    segmentation.GetSegment(segmentId).SetTag("TerminologyEntry", entry)
            nodes["segmentation"] = segmentationNode
        if result.boxes:
            matrix = vtk.vtkMatrix4x4()
            volumeNode.GetIJKToRASMatrix(matrix)
            for box in box_markups(result, slicer.util.arrayFromVTKMatrix(matrix)):
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", box.label)
                slicer.util.updateMarkupsControlPointsFromArray(node, box.corners_ras)
                score = "" if box.score is None else f", score {box.score:.2f}"
                node.SetDescription(f"slice {box.slice_index}{score}")
                nodes["markups"].append(node)
        return nodes

    # -- DICOM ------------------------------------------------------------------------------------
    def dicomDatabase(self):
        database = getattr(slicer, "dicomDatabase", None)
        if database is None or not database.isOpen:
            raise ValueError("Slicer's DICOM database is not open; open the DICOM module once to create it.")
        return database

    def listDicomSeries(self):
        """The database's series (``RadBridgeLib.database.SeriesEntry``), RadBridge outputs marked."""
        from RadBridgeLib.database import list_series

        return list_series(self.dicomDatabase())

    def loadSeries(self, entry):
        """Loads an image series with Slicer's DICOM plugins and returns its scalar volume node."""
        if entry.radbridge_kind is not None:
            raise ValueError(
                "This is a RadBridge result series; choose an image series, or use Load RadBridge results."
            )
        return self._loadVolume(entry.series_uid, f"the series '{entry.title}'")

    def _loadVolume(self, seriesUID, what):
        from DICOMLib import DICOMUtils

        for nodeID in DICOMUtils.loadSeriesByUID([seriesUID]):
            node = slicer.mrmlScene.GetNodeByID(nodeID)
            if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
                return node
        raise ValueError(f"Slicer loaded no image volume from {what}.")

    def findOrLoadVolume(self, seriesUID):
        """The scene's volume of that series (same instances), else the series loaded now."""
        instances = set(self.dicomDatabase().instancesForSeries(seriesUID))
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
            if uids and set(uids) == instances:
                return node
        return self._loadVolume(seriesUID, "the source series of the RadBridge results")

    def sourceHeaders(self, volumeNode):
        """The DICOM headers (no pixels) of the images Slicer loaded the volume from."""
        import pydicom

        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids:
            raise ValueError(
                f"'{volumeNode.GetName()}' was not loaded from Slicer's DICOM database, so its source "
                "images are unknown: load the series with 'Load as input' (or the DICOM module) and run "
                "the analysis on it."
            )
        database = self.dicomDatabase()
        headers = []
        for uid in uids:
            path = database.fileForInstance(uid)
            if not path:
                raise ValueError(f"An image of '{volumeNode.GetName()}' is no longer in the DICOM database.")
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        return headers

    def _grid(self, volumeNode):
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix), slicer.util.arrayFromVolume(volumeNode).shape

    def saveAsDicom(self, result, volumeNode, outputDir=""):
        """Writes SEG + SRs with the node's writer and adds them to the DICOM database; returns paths."""
        if result is None:
            raise ValueError("Run an analysis first.")
        if volumeNode is None:
            raise ValueError("The analysed volume is no longer in the scene.")
        self.ensureDependencies(DICOM_DEPENDENCIES)
        from RadBridgeLib.dicom_objects import save_results

        headers = self.sourceHeaders(volumeNode)
        ijkToRas, shape = self._grid(volumeNode)
        folder = outputDir or os.path.join(
            slicer.app.temporaryPath, "RadBridge", str(headers[0].SeriesInstanceUID)
        )
        paths = save_results(result, headers, ijkToRas, shape, Path(folder))
        from DICOMLib import DICOMUtils

        DICOMUtils.importDicom(folder)
        return paths

    def loadStoredResults(self, entry):
        """Loads RadBridge's SEG/SR for the entry's series (or, for a RadBridge series, its source).

        Returns ``[(volumeNode, AnalysisResult, imported nodes)]``, one per source series and model.
        """
        self.ensureDependencies(DICOM_DEPENDENCIES)
        import pydicom
        from RadBridgeLib.database import list_series, stored_results
        from RadBridgeLib.dicom_objects import read_results

        groups = stored_results(list_series(self.dicomDatabase()), entry)
        if not groups:
            raise ValueError(f"There is no RadBridge SEG or SR for '{entry.title}' in its study.")
        loaded = []
        for group in groups:
            volumeNode = self.findOrLoadVolume(group.source_series_uid)
            ijkToRas, shape = self._grid(volumeNode)
            datasets = [pydicom.dcmread(path) for path in group.paths]
            result = read_results(datasets, self.sourceHeaders(volumeNode), ijkToRas, shape)
            loaded.append((volumeNode, result, self.importResults(result, volumeNode)))
        return loaded


def _terminologyEntry(spec):
    """Slicer's TerminologyEntry tag from the spec's (value, scheme, meaning) codes, or ''."""
    category, typ = tuple(spec.category), tuple(spec.type)
    if not category[0] or not typ[0]:
        return ""

    def fmt(code):
        value, scheme, meaning = code
        return f"{scheme}^{value}^{meaning}"

    return (
        "Segmentation category and type - DICOM master list"
        f"~{fmt(category)}~{fmt(typ)}~^^~Anatomic codes - DICOM master list~^^~^^"
    )


#
# RadBridgeTest
#


class RadBridgeTest(ScriptedLoadableModuleTest):
    """Smoke test against a running service: set RADBRIDGE_TEST_ADDRESS (e.g. localhost:50051)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RadBridgeSmoke()

    def test_RadBridgeSmoke(self):
        import time

        import numpy as np

        address = os.environ.get("RADBRIDGE_TEST_ADDRESS", "")
        if not address:
            self.delayDisplay(
                "RadBridge smoke test skipped: set RADBRIDGE_TEST_ADDRESS to a running service."
            )
            return
        self.delayDisplay(f"Connecting to {address}")
        logic = RadBridgeLogic()
        models = logic.connect(address)
        self.assertTrue(models, "the service lists no model")

        k, j, i = np.mgrid[0:24, 0:48, 0:48]
        sphere = ((i - 24) ** 2 + (j - 24) ** 2 + ((k - 12) * 2) ** 2) < 12**2
        voxels = np.where(sphere, 60, -1000).astype(np.int16)
        volumeNode = slicer.util.addVolumeFromArray(voxels, name="RadBridgePhantom")
        volumeNode.SetSpacing(0.8, 0.8, 2.0)

        job = logic.startAnalysis(volumeNode, ["segment"])
        events = []
        deadline = time.monotonic() + 300
        while job.running or not events or type(events[-1]).__name__ == "Progress":
            slicer.app.processEvents()
            events.extend(logic.poll())
            self.assertLess(time.monotonic(), deadline, "no result within 300 s")
            time.sleep(0.05)
        events.extend(logic.poll())
        last = events[-1]
        self.assertEqual(type(last).__name__, "Done", f"the analysis ended with {last}")
        nodes = logic.importResults(last.result, volumeNode)
        self.assertIsNotNone(nodes["segmentation"])
        self.assertGreater(nodes["segmentation"].GetSegmentation().GetNumberOfSegments(), 0)
        self.delayDisplay("RadBridge smoke test passed")
