"""RadBridge.py (Module/Widget/Logic/Test) with fake slicer/qt/ctk/vtk; the module's own code is real.

Also checks the build files: the .ui holds every objectName the widget uses, CMakeLists lists
every RadBridgeLib file, and the catalog entry has the keys of schema v1.0.2.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from RadBridgeLib.client import AnalysisResult, RadBridgeServerError
from RadBridgeLib.jobs import Cancelled, Done, Failed, Progress

from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import ct_series, write_series
from tests.unit.slicer_extension import fake_slicer
from tests.unit.slicer_extension.conftest import EXTENSION_DIR

MODULE_FILE = EXTENSION_DIR / "RadBridge.py"
UI_FILE = EXTENSION_DIR / "Resources" / "UI" / "RadBridge.ui"
IJK_TO_RAS = np.array(
    [[-0.8, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, 20.0], [0.0, 0.0, 2.0, -30.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPE = (4, 6, 8)  # (k, j, i)


@pytest.fixture
def env(monkeypatch):
    """(RadBridge module imported against the fakes, recorder); the fakes leave with the test."""
    slicer, rec = fake_slicer.install(monkeypatch, EXTENSION_DIR / "Resources")
    sys.modules.pop("RadBridge", None)
    module = importlib.import_module("RadBridge")
    yield module, rec
    sys.modules.pop("RadBridge", None)


class FakeClient:
    """analyze() blocks on `release`, honours the cancel event, and reports progress like the real one."""

    def __init__(self, result=None, error: Exception | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.result = result if result is not None else make_result()
        self.error = error
        self.calls: list[dict] = []
        self.closed = False

    def list_models(self):
        return [
            pb.ModelInfo(
                identity=pb.ModelIdentity(name="reference-ct", non_clinical=True),
                tasks=[pb.TASK_KIND_REPORT, pb.TASK_KIND_CLASSIFY, pb.TASK_KIND_SEGMENT],
                modalities=["CT"],
            ),
            pb.ModelInfo(
                identity=pb.ModelIdentity(name="medgemma-4b"),
                tasks=[pb.TASK_KIND_REPORT, pb.TASK_KIND_VQA],
                modalities=["CR", "DX", "CT"],
            ),
        ]

    def close(self) -> None:
        self.closed = True

    def analyze(
        self,
        voxels,
        ijk_to_ras,
        tasks,
        model="",
        question="",
        labels=(),
        on_progress=None,
        cancel_event=None,
        **kw,
    ):
        from RadBridgeLib.client import RadBridgeCancelled

        self.calls.append(
            {
                "voxels": voxels,
                "ijk_to_ras": ijk_to_ras,
                "tasks": tasks,
                "model": model,
                "question": question,
                "labels": labels,
            }
        )
        on_progress(0.1, "receiving")
        self.started.set()
        while not self.release.wait(0.005):
            if cancel_event.is_set():
                raise RadBridgeCancelled("The analysis was cancelled.")
        if self.error is not None:
            raise self.error
        on_progress(0.55, "running")
        on_progress(1.0, "done")
        return self.result


def make_result() -> AnalysisResult:
    liver = np.zeros(SHAPE, bool)
    liver[1:3, 2:4, 2:5] = True
    spleen = np.zeros(SHAPE, bool)
    spleen[2, 1, 6] = True
    anatomy = pb.Code(value="123037004", scheme="SCT", meaning="Anatomical Structure")
    segments = {
        1: pb.MaskInfo(
            segment_number=1,
            label="Liver",
            category=anatomy,
            type=pb.Code(value="10200004", scheme="SCT", meaning="Liver"),
        ),
        2: pb.MaskInfo(
            segment_number=2,
            label="",
            category=anatomy,
            type=pb.Code(value="78961009", scheme="SCT", meaning="Spleen"),
        ),
    }
    return AnalysisResult(
        result=pb.AnalysisResult(),
        masks={1: liver, 2: spleen},
        segments=segments,
        boxes=[
            pb.Box(slice_index=2, row_min=1, column_min=2, row_max=4, column_max=6, label="Nodule", score=0.8)
        ],
        findings=[
            pb.Finding(
                finding=pb.Code(value="60046008", scheme="SCT", meaning="Pleural effusion"),
                score=0.9,
                present=True,
            )
        ],
        report_text="Findings: no acute abnormality.",
        answer="No.",
    )


def volume():
    voxels = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    return fake_slicer.FakeVolumeNode(voxels, IJK_TO_RAS, name="Chest CT")


def connected_logic(module, client):
    logic = module.RadBridgeLogic(clientFactory=lambda address, tls, ca_file: client)
    assert [m.identity.name for m in logic.connect("localhost:1")] == ["reference-ct", "medgemma-4b"]
    return logic


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- Logic ------------------------------------------------------------------------------------


def test_start_analysis_returns_before_the_client_finishes_then_progress_then_done(env) -> None:
    module, _ = env
    client = FakeClient()
    logic = connected_logic(module, client)
    node = volume()
    job = logic.startAnalysis(
        node, ["segment", "report"], model="reference-ct", question="", labels=["liver"]
    )
    assert logic.running
    assert client.started.wait(5)
    assert not job.wait(0.05)  # still blocked in analyze: the call did not wait for it
    release_and_wait(client, job)
    events = logic.poll()
    assert events == [
        Progress(0.1, "receiving"),
        Progress(0.55, "running"),
        Progress(1.0, "done"),
        Done(client.result),
    ]
    assert not logic.running
    call = client.calls[0]
    assert (
        call["tasks"] == ["segment", "report"]
        and call["labels"] == ["liver"]
        and call["model"] == "reference-ct"
    )
    assert np.array_equal(call["voxels"], node.array) and call["voxels"] is not node.array  # a copy
    assert np.array_equal(call["ijk_to_ras"], IJK_TO_RAS)


def release_and_wait(client: FakeClient, job) -> None:
    client.release.set()
    assert job.wait(5)


def test_cancel_makes_the_client_raise_and_the_logic_report_cancelled(env) -> None:
    module, _ = env
    client = FakeClient()
    logic = connected_logic(module, client)
    job = logic.startAnalysis(volume(), ["segment"])
    assert client.started.wait(5)
    logic.cancel()
    assert job.wait(5)
    assert logic.poll() == [Progress(0.1, "receiving"), Cancelled()]


def test_server_error_becomes_failed_with_the_message(env) -> None:
    module, _ = env
    message = "The RadBridge inference service at localhost:1 refused the request (INVALID_ARGUMENT: no CT)."
    client = FakeClient(error=RadBridgeServerError(message))
    logic = connected_logic(module, client)
    job = logic.startAnalysis(volume(), ["classify"])
    release_and_wait(client, job)
    assert logic.poll() == [Progress(0.1, "receiving"), Failed(message)]


def test_start_refused_without_connection_volume_or_while_running(env) -> None:
    module, _ = env
    with pytest.raises(ValueError, match="Connect"):
        module.RadBridgeLogic().startAnalysis(volume(), ["segment"])
    client = FakeClient()
    logic = connected_logic(module, client)
    with pytest.raises(ValueError, match="input volume"):
        logic.startAnalysis(None, ["segment"])
    job = logic.startAnalysis(volume(), ["segment"])
    with pytest.raises(RuntimeError, match="already running"):
        logic.startAnalysis(volume(), ["segment"])
    logic.cancel()
    assert job.wait(5)


def test_ensure_dependencies_installs_only_what_is_missing(env, monkeypatch) -> None:
    module, rec = env
    logic = module.RadBridgeLogic()
    assert logic.ensureDependencies() is False and rec.pip == []  # grpc + protobuf are in this venv
    real = importlib.import_module

    def no_grpc(name, *args):
        if name == "grpc":
            raise ImportError("No module named 'grpc'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_grpc)
    assert logic.ensureDependencies() is True
    assert rec.pip == ["grpcio"]
    assert rec.status and "grpcio" in rec.status[0]


def test_import_results_makes_one_segment_per_spec_and_a_curve_per_box(env) -> None:
    module, rec = env
    result = make_result()
    node = volume()
    nodes = module.RadBridgeLogic().importResults(result, node)
    seg = nodes["segmentation"]
    assert seg.class_name == "vtkMRMLSegmentationNode" and seg.reference is node and seg.display_nodes
    assert [s.name for s in seg.segmentation.segments.values()] == ["Liver", "Spleen"]
    assert len(rec.labelmaps) == 2
    for (segment_id, array, seg_node, ref), number in zip(rec.labelmaps, (1, 2), strict=True):
        assert seg_node is seg and ref is node
        assert np.array_equal(array.astype(bool), result.masks[number])
        assert seg.segmentation.GetSegment(segment_id).tags["TerminologyEntry"].count("SCT^") == 2
    liver_tag = seg.segmentation.GetSegment(rec.labelmaps[0][0]).tags["TerminologyEntry"]
    assert "SCT^123037004^Anatomical Structure~SCT^10200004^Liver" in liver_tag
    (markup,) = nodes["markups"]
    assert markup.class_name == "vtkMRMLMarkupsClosedCurveNode" and markup.name == "Nodule"
    ((curve, points),) = rec.control_points
    assert curve is markup and points.shape == (4, 3)
    # the corners results.box_markups computes with this volume's IJKToRAS matrix, unchanged
    from RadBridgeLib.results import box_markups

    assert np.allclose(points, box_markups(result, IJK_TO_RAS)[0].corners_ras)
    assert markup.description == "slice 2, score 0.80"


def test_import_results_with_fake_specs(env, monkeypatch) -> None:
    """importResults only needs results.segment_specs/box_markups' documented fields."""
    module, rec = env
    mask = np.ones(SHAPE, bool)
    fake = types.ModuleType("RadBridgeLib.results")
    fake.segment_specs = lambda result: [
        types.SimpleNamespace(
            segment_number=n,
            name=name,
            color_rgb=(1.0, 0.0, 0.0),
            category=("", "", ""),
            type=("", "", ""),
            mask=mask,
        )
        for n, name in ((1, "Lung"), (2, "Heart"), (3, "Aorta"))
    ]
    fake.box_markups = lambda result, m: []
    monkeypatch.setitem(sys.modules, "RadBridgeLib.results", fake)
    result = types.SimpleNamespace(boxes=[])
    nodes = module.RadBridgeLogic().importResults(result, volume())
    assert [s.name for s in nodes["segmentation"].segmentation.segments.values()] == [
        "Lung",
        "Heart",
        "Aorta",
    ]
    assert len(rec.labelmaps) == 3 and nodes["markups"] == []
    assert all(not s.tags for s in nodes["segmentation"].segmentation.segments.values())


# -- Widget -----------------------------------------------------------------------------------


def make_widget(module, client):
    widget = module.RadBridgeWidget()
    widget.setup()
    widget.logic.clientFactory = lambda address, tls, ca_file: client
    return widget


def test_widget_run_polls_with_qtimer_and_updates_progress_and_status(env) -> None:
    module, rec = env
    client = FakeClient()
    widget = make_widget(module, client)
    ui = widget.ui
    assert not ui.runButton.enabled  # not connected yet
    ui.serverAddressLineEdit.text = "localhost:1"
    ui.connectButton.click()
    assert rec.errors == [] and ui.modelComboBox.items == ["reference-ct", "medgemma-4b"]
    node = volume()
    ui.inputVolumeSelector.setCurrentNode(node)
    ui.inputVolumeSelector.emit("currentNodeChanged(vtkMRMLNode*)", node)
    assert ui.runButton.enabled
    ui.labelsLineEdit.text = "liver, spleen ,"
    ui.runButton.click()
    assert rec.errors == []
    assert [msec for msec, _ in rec.timers] == [module.RadBridgeWidget.POLL_INTERVAL_MS]
    assert ui.progressBar.values == [0] and ui.cancelButton.enabled and not ui.runButton.enabled
    assert client.started.wait(5)
    rec.run_timers(limit=1)  # first poll: the first Progress, and the timer is re-armed
    assert ui.progressBar.values == [0, 10] and ui.statusLabel.text == "receiving"
    assert len(rec.timers) == 1
    release_and_wait(client, widget.logic.job)
    rec.run_timers()
    assert ui.progressBar.values == [0, 10, 55, 100, 100]
    assert ui.statusLabel.texts[-4:] == ["receiving", "running", "done", "Done."]
    assert rec.timers == []  # polling stopped after the terminal event
    assert client.calls[0]["labels"] == ["liver", "spleen"] and client.calls[0]["tasks"] == ["segment"]
    assert ui.reportTextBrowser.plainText == "Findings: no acute abnormality.\n\nAnswer: No."
    assert ui.findingsTableWidget.rowCount == 1
    assert ui.findingsTableWidget.cells[(0, 0)].text == "Pleural effusion"
    assert len(rec.labelmaps) == 2 and widget._importedNodes["segmentation"] is not None
    assert ui.runButton.enabled and not ui.cancelButton.enabled and ui.saveDicomButton.enabled
    assert rec.errors == []


def test_widget_shows_each_models_tasks_and_disables_the_others(env) -> None:
    module, rec = env
    widget = make_widget(module, FakeClient())
    ui = widget.ui
    ui.vqaCheckBox.checked = ui.detectCheckBox.checked = True
    ui.connectButton.click()
    assert rec.errors == []
    assert ui.modelTasksLabel.text == "Tasks: report, classify, segment · modalities: CT · non-clinical"
    enabled = {task: getattr(ui, name).enabled for task, name in module.TASK_CHECKBOXES.items()}
    assert enabled == {"segment": True, "detect": False, "classify": True, "report": True, "vqa": False}
    assert not ui.vqaCheckBox.checked and not ui.detectCheckBox.checked  # unsupported: unticked
    ui.reportCheckBox.checked = True
    ui.modelComboBox.setCurrentIndex(1)
    ui.modelComboBox.emit("currentIndexChanged(int)", 1)
    assert ui.modelTasksLabel.text == "Tasks: report, vqa · modalities: CR, DX, CT"
    assert widget.selectedTasks() == ["report"]  # segment was ticked; medgemma-4b cannot segment
    assert ui.vqaCheckBox.enabled and not ui.segmentCheckBox.enabled


def test_widget_cancel_button_calls_logic_cancel(env) -> None:
    module, rec = env
    client = FakeClient()
    widget = make_widget(module, client)
    widget.ui.connectButton.click()
    widget.ui.inputVolumeSelector.setCurrentNode(volume())
    widget.ui.runButton.click()
    calls = []
    real_cancel = widget.logic.cancel
    widget.logic.cancel = lambda: (calls.append(1), real_cancel())
    assert client.started.wait(5)
    widget.ui.cancelButton.click()
    assert calls == [1] and widget.ui.statusLabel.text == "Cancelling…"
    assert widget.logic.job.wait(5)
    rec.run_timers()
    assert widget.ui.statusLabel.text == "Cancelled." and rec.errors == []


def test_widget_shows_a_failure_in_words(env) -> None:
    module, rec = env
    client = FakeClient(error=RadBridgeServerError("Cannot reach the RadBridge inference service at x:1."))
    widget = make_widget(module, client)
    widget.ui.connectButton.click()
    widget.ui.inputVolumeSelector.setCurrentNode(volume())
    widget.ui.runButton.click()
    release_and_wait(client, widget.logic.job)
    rec.run_timers()
    assert widget.ui.statusLabel.text == "Failed: Cannot reach the RadBridge inference service at x:1."
    assert rec.errors == ["The analysis failed: Cannot reach the RadBridge inference service at x:1."]


def test_widget_run_errors_go_through_try_with_error_display(env) -> None:
    module, rec = env
    widget = make_widget(module, FakeClient())
    widget.ui.runButton.click()  # not connected
    assert rec.errors and "Connect to a RadBridge service first." in rec.errors[0]
    assert rec.timers == []
    for name in module.TASK_CHECKBOXES.values():
        getattr(widget.ui, name).checked = False
    widget.ui.runButton.click()
    assert "Select at least one task." in rec.errors[-1]


# -- Slicer's DICOM database: load a series, save as DICOM, load RadBridge results ------------


@pytest.fixture
def dicom_env(monkeypatch, tmp_path):
    """The module against the fakes, with a 6-slice CT series in the fake DICOM database."""
    slicer, rec = fake_slicer.install(monkeypatch, EXTENSION_DIR / "Resources", tmp_path / "slicer-tmp")
    paths = write_series(ct_series(n_slices=6, seed=5), tmp_path / "ct")
    slicer.dicomDatabase.add(paths)
    sys.modules.pop("RadBridge", None)
    module = importlib.import_module("RadBridge")
    yield module, rec, slicer
    sys.modules.pop("RadBridge", None)


def contract_result(shape) -> AnalysisResult:
    """A result as the client returns it: the contract message plus its masks on ``shape``."""
    mask = np.zeros(shape, bool)
    mask[2:4, 200:260, 180:300] = True
    liver = pb.MaskInfo(
        segment_number=1,
        label="Liver",
        category=pb.Code(value="123037004", scheme="SCT", meaning="Anatomical Structure"),
        type=pb.Code(value="10200004", scheme="SCT", meaning="Liver"),
        cielab=[40000, 45000, 30000],
        voxel_count=int(mask.sum()),
    )
    nodule = pb.Code(value="27925004", scheme="SCT", meaning="Nodule")
    box = pb.Box(
        slice_index=3, row_min=100, column_min=120, row_max=130, column_max=170, finding=nodule, score=0.7
    )
    result = pb.AnalysisResult(
        model=pb.ModelIdentity(name="reference", backend="reference", version="1.0", non_clinical=True),
        tasks=[
            pb.TaskResult(task=pb.TASK_KIND_SEGMENT, masks=[liver]),
            pb.TaskResult(task=pb.TASK_KIND_DETECT, boxes=[box]),
            pb.TaskResult(
                task=pb.TASK_KIND_REPORT,
                report=pb.ReportText(findings="Liver outlined.", impression="Normal."),
            ),
        ],
    )
    return AnalysisResult(
        result=result,
        masks={1: mask},
        segments={1: liver},
        boxes=[box],
        report_text="Findings: Liver outlined.\n\nImpression: Normal.",
    )


def test_widget_lists_the_database_loads_a_series_saves_and_loads_results(dicom_env) -> None:
    module, rec, slicer = dicom_env
    widget = make_widget(module, FakeClient())
    ui = widget.ui
    assert ui.dicomSeriesComboBox.items == ["CT CHEST (synthetic phantom) · 2 Axial 2.5mm · CT · 6 images"]
    ui.loadSeriesButton.click()
    assert rec.errors == []
    node = ui.inputVolumeSelector.currentNode()
    assert node is not None and node.GetName() == "2: Axial 2.5mm" and node.array.shape == (6, 512, 512)
    assert ui.statusLabel.text == "Loaded '2: Axial 2.5mm' as the input volume."

    widget._volumeNode = node
    widget.onAnalysisDone(contract_result(node.array.shape))
    widget.updateGUI()  # as _poll does after the terminal event
    assert ui.saveDicomButton.enabled
    ui.saveDicomButton.click()
    assert rec.errors == []
    series_uid = widget._seriesEntries[0].series_uid  # before saving: the image series only
    folder = Path(slicer.app.temporaryPath) / "RadBridge" / str(series_uid)
    assert rec.imported_folders == [str(folder)]
    assert sorted(p.name.split("-")[0] for p in folder.iterdir()) == [
        "keyslices",
        "measurements",
        "narrative",
        "seg",
    ]
    assert ui.statusLabel.text.startswith(f"Saved 4 DICOM object(s) to {folder}")
    # The list now shows the image series and RadBridge's four series, marked as such.
    assert [t.rsplit("· ", 1)[-1] for t in ui.dicomSeriesComboBox.items] == [
        "6 images",
        "RadBridge SEG",
        "RadBridge SR",
        "RadBridge report SR",
        "RadBridge key-slice SR",
    ]

    # Load them back from the SEG's entry: the volume in the scene is reused, not loaded again.
    loads_before = list(rec.loaded_series)
    labelmaps_before = len(rec.labelmaps)
    ui.reportTextBrowser.setPlainText("")
    ui.dicomSeriesComboBox.setCurrentIndex(1)
    ui.loadResultsButton.click()
    assert rec.errors == []
    assert rec.loaded_series == loads_before
    # The narrative SR adds the non-clinical notice of a reference model to the impression.
    assert ui.reportTextBrowser.plainText == (
        "Findings: Liver outlined.\n\nImpression: Normal.\n"
        "Non-clinical reference output; not for diagnostic use."
    )
    assert ui.statusLabel.text == "Loaded RadBridge results (reference) onto '2: Axial 2.5mm'."
    segment_id, array, _, reference = rec.labelmaps[labelmaps_before]
    assert reference is node and segment_id == "segment_1"
    np.testing.assert_array_equal(array.astype(bool), contract_result(node.array.shape).masks[1])
    assert widget._importedNodes["segmentation"].GetSegmentation().GetSegment("segment_1").name == "Liver"
    assert [n.name for n in widget._importedNodes["markups"]] == ["Nodule"]


def test_results_load_into_a_fresh_scene_by_loading_the_source_series(dicom_env, tmp_path) -> None:
    module, rec, slicer = dicom_env
    logic = module.RadBridgeLogic()
    entry = logic.listDicomSeries()[0]
    node = logic.loadSeries(entry)
    logic.saveAsDicom(contract_result(node.array.shape), node, str(tmp_path / "out"))
    assert rec.imported_folders == [str(tmp_path / "out")]
    slicer.mrmlScene.Clear()
    [(loaded_node, result, nodes)] = logic.loadStoredResults(entry)
    assert rec.loaded_series == [entry.series_uid, entry.series_uid]
    assert loaded_node is not node and loaded_node.GetName() == "2: Axial 2.5mm"
    assert result.model_name == "reference" and [b.slice_index for b in result.boxes] == [3]
    assert nodes["segmentation"] is not None


def test_dicom_errors_are_said_in_words(dicom_env) -> None:
    module, rec, slicer = dicom_env
    logic = module.RadBridgeLogic()
    entry = logic.listDicomSeries()[0]
    # A volume that did not come from the DICOM database has no source images to reference.
    with pytest.raises(ValueError, match="was not loaded from Slicer's DICOM database"):
        logic.saveAsDicom(contract_result(SHAPE), volume())
    with pytest.raises(ValueError, match="Run an analysis first"):
        logic.saveAsDicom(None, volume())
    with pytest.raises(ValueError, match="There is no RadBridge SEG or SR"):
        logic.loadStoredResults(entry)
    output = dataclasses.replace(entry, radbridge_kind="seg")
    with pytest.raises(ValueError, match="This is a RadBridge result series"):
        logic.loadSeries(output)
    # The widget: a closed database is a status line at setup, an error box on Refresh.
    slicer.dicomDatabase.isOpen = False
    widget = make_widget(module, FakeClient())
    assert widget.ui.dicomSeriesComboBox.items == [] and rec.errors == []
    assert "DICOM database is not open" in widget.ui.statusLabel.text
    assert not widget.ui.loadSeriesButton.enabled and not widget.ui.loadResultsButton.enabled
    widget.ui.refreshDicomButton.click()
    assert "Slicer's DICOM database is not open" in rec.errors[-1]
    widget.ui.loadResultsButton.click()
    assert "Choose a series in the DICOM database list first" in rec.errors[-1]


def test_save_installs_highdicom_first_when_missing(dicom_env, monkeypatch, tmp_path) -> None:
    module, rec, _ = dicom_env
    logic = module.RadBridgeLogic()
    node = logic.loadSeries(logic.listDicomSeries()[0])
    real = importlib.import_module

    def without_highdicom(name, *args):
        if name == "highdicom":  # as in a fresh Slicer; pip_install is faked, the real one is used
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_highdicom)
    paths = logic.saveAsDicom(contract_result(node.array.shape), node, str(tmp_path / "out"))
    assert rec.pip == ["highdicom==0.28.*"] and "installing into Slicer's Python" in rec.status[-1]
    assert len(paths) == 4


def test_module_metadata_and_repo_root_on_sys_path(env) -> None:
    module, _ = env
    parent = types.SimpleNamespace()
    module.RadBridge(parent)
    assert parent.title == "RadBridge" and parent.categories == ["Segmentation"]
    assert str(EXTENSION_DIR.parents[1]) in sys.path


def test_slicer_test_class_skips_without_address(env, monkeypatch) -> None:
    module, _ = env
    monkeypatch.delenv("RADBRIDGE_TEST_ADDRESS", raising=False)
    shown = []
    test = module.RadBridgeTest()
    test.delayDisplay = lambda message, msec=1000: shown.append(message)
    test.runTest()
    assert shown and "skipped" in shown[0]


# -- build files ------------------------------------------------------------------------------


def test_ui_parses_and_holds_every_object_name_the_widget_uses() -> None:
    root = ET.parse(UI_FILE).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    names = {w.get("name") for w in root.iter("widget")}
    source = MODULE_FILE.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source)) | set(re.findall(r'"(\w+CheckBox)"', source))
    assert used, "the widget uses no ui names?"
    assert used <= names, f"missing in RadBridge.ui: {sorted(used - names)}"
    assert root.find(".//widget[@name='inputVolumeSelector']").get("class") == "qMRMLNodeComboBox"
    assert "vtkMRMLScalarVolumeNode" in ET.tostring(
        root.find(".//widget[@name='inputVolumeSelector']"), "unicode"
    )


def test_cmakelists_list_every_library_file_and_resource() -> None:
    cmake = (EXTENSION_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    for path in sorted((EXTENSION_DIR / "RadBridgeLib").glob("*.py")):
        assert f"RadBridgeLib/{path.name}" in cmake, path.name
    for listed in re.findall(r"(RadBridgeLib/\w+\.py|Resources/\S+)", cmake):
        resolved = listed.replace("${MODULE_NAME}", "RadBridge")
        assert (EXTENSION_DIR / resolved).exists(), listed
    top = (EXTENSION_DIR.parent / "CMakeLists.txt").read_text()
    for needle in (
        "EXTENSION_HOMEPAGE",
        'EXTENSION_CATEGORY "Segmentation"',
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        'EXTENSION_DEPENDS "NA"',
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(RadBridge)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert needle in top, needle


def test_catalog_entry_has_the_schema_keys() -> None:
    entry = json.loads((EXTENSION_DIR.parent / "RadBridge.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json")
    for key in (
        "category",
        "scm_url",
        "scm_revision",
        "build_dependencies",
        "build_subdirectory",
        "enabled",
        "tier",
    ):
        assert key in entry, key
    assert (
        entry["category"] == "Segmentation" and entry["build_dependencies"] == [] and entry["enabled"] is True
    )
    # the extension's top-level CMakeLists.txt sits in build_subdirectory of the repository
    assert (EXTENSION_DIR.parents[1] / entry["build_subdirectory"] / "CMakeLists.txt").is_file()


def test_icon_is_a_128_png() -> None:
    from PIL import Image

    with Image.open(EXTENSION_DIR / "Resources" / "Icons" / "RadBridge.png") as img:
        assert img.format == "PNG" and img.size == (128, 128)
