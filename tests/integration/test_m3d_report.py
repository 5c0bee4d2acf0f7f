"""M3D-LaMed on a real CT series: forced report -> narrative SR with model provenance, dciodvfy-valid."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest

from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from inference_service.assembly import result_to_pb
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.m3d import M3DBackend
from inference_service.types import AnalysisResult, AnalysisSpec, Geometry, TaskKind, Volume
from radbridge.synth import ct_series, write_series
from tests.peers import assert_valid_dicom_object
from tests.unit.inference_service.tiny_checkpoints import force_output
from tests.unit.inference_service.tiny_m3d import build_m3d

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
]


def test_m3d_report_on_a_ct_series_becomes_a_valid_narrative_sr(tmp_path: Path) -> None:
    backend = M3DBackend(ModelConfig(name="m3d-tiny", backend="m3d", path=build_m3d(tmp_path / "ckpt")))
    backend.load()
    series = read_series(write_series(ct_series(n_slices=24), tmp_path / "ct"))
    g = Geometry(series.voxels.shape, series.spacing_mm, series.orientation, series.position, "CT", True)
    text = "Findings: Bilateral lungs are clear.\nImpression: No acute abnormality."
    force_output(backend, text, "</s>")
    (task,) = backend.run(
        [WorkItem(Volume(series.voxels, g), AnalysisSpec("m3d-tiny", (TaskKind.REPORT,)))], TaskKind.REPORT
    )
    assert task.report is not None and task.report.impression == "No acute abnormality."
    result = result_to_pb(AnalysisResult(backend.identity, [task]))

    objects = {o.kind: o.dataset for o in ResultWriter(series.sources, result, {}).build_all()}
    assert set(objects) == {"narrative"}
    path = tmp_path / "narrative.dcm"
    objects["narrative"].save_as(path, enforce_file_format=True)
    assert_valid_dicom_object(path)
    sr = hd.sr.srread(path)
    body = path.read_bytes()
    assert b"Bilateral lungs are clear." in body and b"No acute abnormality." in body
    assert sr.StudyInstanceUID == series.sources[0].StudyInstanceUID
    assert backend.identity.version.encode() in body  # model provenance: name and version@weights-sha
    assert sr.ManufacturerModelName == "m3d-tiny"
