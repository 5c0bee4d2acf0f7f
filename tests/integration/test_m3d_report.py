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


def test_m3d_seg_token_becomes_a_valid_dicom_seg_on_the_source_series(tmp_path: Path) -> None:
    import numpy as np

    from tests.unit.inference_service.tiny_m3d import set_constant_mask_logits

    backend = M3DBackend(ModelConfig(name="m3d-tiny", backend="m3d", path=build_m3d(tmp_path / "ckpt")))
    backend.load()
    set_constant_mask_logits(backend.model)  # the head says "everything": the mask is the foreground crop
    series = read_series(write_series(ct_series(n_slices=24), tmp_path / "ct"))
    g = Geometry(series.voxels.shape, series.spacing_mm, series.orientation, series.position, "CT", True)
    force_output(backend, "It is [SEG].", "</s>")
    spec = AnalysisSpec("m3d-tiny", (TaskKind.SEGMENT,), labels=("body",))
    (task,) = backend.run([WorkItem(Volume(series.voxels, g), spec)], TaskKind.SEGMENT)
    (mask,) = task.masks
    body = series.voxels > -500
    boxes = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    expected = np.zeros(body.shape, bool)
    expected[tuple(slice(b[0], b[-1] + 1) for b in boxes)] = True
    assert np.array_equal(mask.voxels, expected)

    result = result_to_pb(AnalysisResult(backend.identity, [task]))
    objects = {o.kind: o.dataset for o in ResultWriter(series.sources, result, {1: mask.voxels}).build_all()}
    assert "seg" in objects
    for kind, ds in objects.items():
        path = tmp_path / f"m3d-{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
    seg = hd.seg.segread(tmp_path / "m3d-seg.dcm")
    assert seg.get_segment_description(1).segment_label == "body"
    uids = [s.SOPInstanceUID for s in series.sources]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0].astype(bool)
    assert np.array_equal(pixels, expected)
