"""SEG/SR writers: highdicom reads them back, frames land on the right slices, UIDs are stable."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.client import AnalysisOutcome
from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from inference_service.assembly import result_to_pb
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.reference import ReferenceBackend, segment_ct
from inference_service.types import AnalysisResult, AnalysisSpec, Geometry, TaskKind, Volume


def _analyze(vol) -> AnalysisOutcome:  # noqa: ANN001
    """Run the reference backend in-process and shape the outcome as the gRPC client does."""
    backend = ReferenceBackend(ModelConfig("reference", "reference"))
    g = Geometry(vol.voxels.shape, vol.spacing_mm, vol.orientation, vol.position, vol.modality, vol.rescaled)
    item = WorkItem(
        Volume(vol.voxels, g), AnalysisSpec("", (TaskKind.SEGMENT, TaskKind.REPORT, TaskKind.DETECT))
    )
    tasks = [backend.run([item], t)[0] for t in item.spec.tasks]
    masks = {m.segment_number: m.voxels for t in tasks for m in t.masks}
    return AnalysisOutcome(result_to_pb(AnalysisResult(backend.identity, tasks)), masks)


@pytest.fixture(scope="module")
def outputs(small_ct_files: list[Path]):  # noqa: ANN201
    shuffled = list(small_ct_files)
    random.Random(1).shuffle(shuffled)
    vol = read_series(shuffled)
    outcome = _analyze(vol)
    objs = {o.kind: o.dataset for o in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()}
    return vol, outcome, objs


def test_three_objects_in_the_source_study(outputs) -> None:  # noqa: ANN001
    vol, _, objs = outputs
    assert set(objs) == {"seg", "measurements", "narrative"}
    for ds in objs.values():
        assert ds.StudyInstanceUID == vol.sources[0].StudyInstanceUID
        assert ds.PatientID == vol.sources[0].PatientID
    assert objs["measurements"].VerificationFlag == "UNVERIFIED"
    assert objs["narrative"].SpecificCharacterSet == "ISO_IR 192"


def test_seg_frames_land_on_the_right_source_slices(outputs) -> None:  # noqa: ANN001
    vol, _, objs = outputs
    seg = hd.seg.Segmentation.from_dataset(objs["seg"])
    expected = segment_ct(vol.voxels, 2.5 * 0.7 * 0.7 / 1000)
    desc = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
    assert set(desc) == {"Lungs", "Bone", "Soft tissue"}
    uids = [ds.SOPInstanceUID for ds in vol.sources]
    for label, key in (("Lungs", "lungs"), ("Bone", "bone")):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[desc[label]], skip_overlap_checks=True
        )[..., 0].astype(bool)
        np.testing.assert_array_equal(pixels, expected[key])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.sources[0].SeriesInstanceUID
    color = seg.SegmentSequence[0].RecommendedDisplayCIELabValue
    assert len(color) == 3


def test_tid1500_groups_reference_seg_segments(outputs) -> None:  # noqa: ANN001
    _, outcome, objs = outputs
    sr = hd.sr.Comprehensive3DSR.from_dataset(objs["measurements"])
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    seg_uid = objs["seg"].SOPInstanceUID
    for g in groups:
        assert g.tracking_uid and g.tracking_identifier
        assert g.referenced_segment.referenced_sop_instance_uid == seg_uid
        (m,) = g.get_measurements()
        assert m.unit.value == "mL" and m.value > 0
    planar = sr.content.get_planar_roi_measurement_groups()
    assert len(planar) == 2  # the two lung boxes
    region = planar[0].roi
    assert region.GraphicType == "POLYLINE" and len(region.GraphicData) == 10


def test_narrative_has_findings_and_impression(outputs) -> None:  # noqa: ANN001
    _, outcome, objs = outputs
    sr = objs["narrative"]
    texts = []

    def walk(items):  # noqa: ANN001, ANN202
        for it in items:
            if it.ValueType == "TEXT":
                texts.append((it.ConceptNameCodeSequence[0].CodeValue, it.TextValue))
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    codes = {c for c, _ in texts}
    assert {"121071", "121073"} <= codes  # Finding, Impression
    assert any("Body volume" in t for _, t in texts)
    assert any("non-clinical" in t.lower() for _, t in texts)


def test_same_input_same_uids(small_ct_files: list[Path], outputs) -> None:  # noqa: ANN001
    _, _, objs = outputs
    vol = read_series(small_ct_files)
    outcome = _analyze(vol)
    again = {o.kind: o.dataset for o in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()}
    for kind in objs:
        assert again[kind].SOPInstanceUID == objs[kind].SOPInstanceUID
        assert again[kind].SeriesInstanceUID == objs[kind].SeriesInstanceUID


def test_uids_change_with_model_version(small_ct_files: list[Path], outputs) -> None:  # noqa: ANN001
    _, outcome, objs = outputs
    vol = read_series(small_ct_files)
    result = type(outcome.result)()
    result.CopyFrom(outcome.result)
    result.model.version = "2.0.0"
    seg = ResultWriter(vol.sources, result, outcome.masks).build_seg()
    assert seg.SOPInstanceUID != objs["seg"].SOPInstanceUID


def test_chinese_report_round_trips_with_language_and_provenance(
    small_ct_files: list[Path], tmp_path: Path
) -> None:
    from protos.radbridge.v1 import inference_pb2 as pb

    vol = read_series(small_ct_files[:3])
    findings = "双肺纹理清晰，未见明确结节。"
    result = pb.AnalysisResult(
        model=pb.ModelIdentity(name="sunmed", backend="llava", version="r1", weights_sha256="ab" * 32),
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_REPORT,
                report=pb.ReportText(findings=findings, impression="无异常。", language="zh"),
                prompt_id="report-zh-v1",
                raw_output="<raw> " + findings,
            )
        ],
    )
    (obj,) = ResultWriter(vol.sources, result, {}).build_all()
    path = tmp_path / "zh.dcm"
    obj.dataset.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    items = {}

    def walk(seq) -> None:  # noqa: ANN001
        for it in seq:
            name = it.ConceptNameCodeSequence[0].CodeMeaning
            if it.ValueType == "TEXT":
                items.setdefault(name, []).append(it.TextValue)
            elif it.ValueType == "CODE":
                items.setdefault(name, []).append(it.ConceptCodeSequence[0].CodeValue)
            walk(it.get("ContentSequence", []))

    walk(ds.ContentSequence)
    assert items["Finding"] == [findings]
    assert items["Impression"] == ["无异常。"]
    assert items["Language of Content Item and Descendants"] == ["zh"]
    assert items["Model weights SHA-256"] == ["ab" * 32]
    assert items["Prompt identifier"] == ["report-zh-v1"]
    assert items["Raw model output"] == ["<raw> " + findings]
