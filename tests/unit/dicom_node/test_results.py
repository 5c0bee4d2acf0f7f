"""SEG/SR writers: highdicom reads them back, frames land on the right slices, UIDs are stable."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage
from scipy.spatial import cKDTree

from dicom_node._contours import major_components, polygon_area
from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from inference_service.backends.reference import segment_ct
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import cr_chest_path
from tests.reference_run import analyze_reference

LUNG = pb.Code(value="39607008", scheme="SCT", meaning="Lung")
NODULE = pb.Code(value="27925004", scheme="SCT", meaning="Nodule")
EFFUSION = pb.Code(value="60046008", scheme="SCT", meaning="Pleural effusion")
ANATOMY = pb.Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
ABNORMAL = pb.Code(value="49755003", scheme="SCT", meaning="Morphologically Abnormal Structure")
MODEL = pb.ModelIdentity(name="unit-model", backend="test", version="0.1")


@pytest.fixture(scope="module")
def outputs(small_ct_files: list[Path]):  # noqa: ANN201
    shuffled = list(small_ct_files)
    random.Random(1).shuffle(shuffled)
    vol = read_series(shuffled)
    outcome = analyze_reference(vol)
    objs = {o.kind: o.dataset for o in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()}
    return vol, outcome, objs


def test_four_objects_in_the_source_study(outputs) -> None:  # noqa: ANN001
    vol, _, objs = outputs
    assert set(objs) == {"seg", "measurements", "keyslices", "narrative"}
    assert len({ds.SeriesInstanceUID for ds in objs.values()}) == 4
    for ds in objs.values():
        assert ds.StudyInstanceUID == vol.sources[0].StudyInstanceUID
        assert ds.PatientID == vol.sources[0].PatientID
    assert objs["measurements"].VerificationFlag == "UNVERIFIED"
    assert objs["keyslices"].VerificationFlag == "UNVERIFIED"
    assert objs["keyslices"].SeriesNumber == 9704
    assert objs["keyslices"].SeriesDescription == "Key slices by reference (non-clinical)"
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
    outcome = analyze_reference(vol)
    again = {o.kind: o.dataset for o in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()}
    assert set(again) == set(objs)
    for kind in objs:
        assert again[kind].SOPInstanceUID == objs[kind].SOPInstanceUID
        assert again[kind].SeriesInstanceUID == objs[kind].SeriesInstanceUID
    assert _tracking_uids(again["keyslices"]) == _tracking_uids(objs["keyslices"])


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


# -- key slices: the TID 1500 SR that OHIF can load -----------------------------------
def _keyslice_groups(ds: Dataset) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Read back through highdicom; check what OHIF needs of every measurement group."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    content = sr.content
    assert not content.get_volumetric_roi_measurement_groups()
    assert not content.get_image_measurement_groups()
    groups = content.get_planar_roi_measurement_groups()
    raw = ds.ContentSequence[-1].ContentSequence  # Imaging Measurements -> Measurement Groups
    assert len(raw) == len(groups) > 0
    sources = {
        ref.ReferencedSOPInstanceUID
        for ev in ds.CurrentRequestedProcedureEvidenceSequence
        for series in ev.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    for group in raw:
        names = [it.ConceptNameCodeSequence[0].CodeValue for it in group.ContentSequence]
        assert names.count("112039") == 1 and names.count("112040") == 1  # Tracking Identifier + UID
        scoords = [it for it in group.ContentSequence if it.ValueType == "SCOORD"]
        assert len(scoords) == 1
        (image,) = scoords[0].ContentSequence
        assert image.ValueType == "IMAGE"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sources
        sites = [it for it in group.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "363698007"]
        assert len(sites) == 1  # Finding Site: OHIF's label
    for g in groups:
        assert g.tracking_identifier and g.tracking_uid
        assert g.roi.GraphicType == "POLYLINE"
        points = g.roi.value
        np.testing.assert_array_equal(points[0], points[-1])  # closed
        assert len(points) <= 201
    return groups


def _tracking_uids(ds: Dataset) -> dict[str, str]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = (
        sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    )
    return {g.tracking_identifier: g.tracking_uid for g in groups}


def _image_uid(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> str:
    return group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID


def _area(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> float | None:
    areas = [m for m in group.get_measurements() if m.name.value == "42798000"]
    assert len(areas) <= 1
    return float(areas[0].value) if areas else None


def test_keyslices_outline_every_ct_segment_and_box(outputs) -> None:  # noqa: ANN001
    vol, outcome, objs = outputs
    groups = _keyslice_groups(objs["keyslices"])
    by_label = {g.tracking_identifier: g for g in groups}
    expected = []
    for info in sorted((m for t in outcome.result.tasks for m in t.masks), key=lambda m: m.segment_number):
        mask = outcome.masks[info.segment_number]
        parts = len(major_components(mask[int(mask.sum(axis=(1, 2)).argmax())]))
        expected += [info.label] + [f"{info.label} ({p + 1})" for p in range(1, parts)]
    assert [g.tracking_identifier for g in groups] == [*expected, "Lung", "Lung"]
    assert "Lungs (2)" in expected  # both lungs are outlined, not only the larger one
    uids = [ds.SOPInstanceUID for ds in vol.sources]
    spacing = [float(v) for v in vol.sources[0].PixelSpacing]
    for info in (m for t in outcome.result.tasks for m in t.masks):
        group = by_label[info.label]
        mask = outcome.masks[info.segment_number]
        k = int(mask.sum(axis=(1, 2)).argmax())
        assert _image_uid(group) == uids[k]
        assert group.finding_type.value == info.type.value
        (site,) = group.finding_sites
        assert site.value.value == info.type.value
        assert [m.name.value for m in group.get_measurements()] == ["42798000"]  # Area only, no volume
        labels, _ = ndimage.label(mask[k])
        largest = np.bincount(labels.ravel())[1:].max()
        assert _area(group) == pytest.approx(largest * spacing[0] * spacing[1], rel=1e-3)
    # The boxes are the same "Bounded by" polylines as in the measurements SR, with a finding site.
    planar = hd.sr.Comprehensive3DSR.from_dataset(objs["measurements"]).content
    boxes = planar.get_planar_roi_measurement_groups()
    for box in boxes:
        twin = next(g for g in groups if g.tracking_uid == box.tracking_uid)
        np.testing.assert_array_equal(twin.roi.value, box.roi.value)
        assert twin.finding_sites[0].value.value == box.finding_type.value
    # Each outline has the Tracking UID of that segment's volume group in "measurements".
    for volume in planar.get_volumetric_roi_measurement_groups():
        assert by_label[volume.tracking_identifier].tracking_uid == volume.tracking_uid
    # Only the key images are evidence.
    (series,) = objs["keyslices"].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence} == {
        _image_uid(g) for g in groups
    }


def _one_segment(label: str = "Nodule") -> pb.AnalysisResult:
    return pb.AnalysisResult(
        model=MODEL,
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_SEGMENT,
                masks=[pb.MaskInfo(segment_number=1, label=label, category=ABNORMAL, type=NODULE)],
            )
        ],
    )


def test_key_slice_is_the_slice_of_largest_area_and_the_outline_follows_the_mask(
    small_ct_files: list[Path],
) -> None:
    vol = read_series(small_ct_files)
    n, rows, cols = len(vol.sources), int(vol.sources[0].Rows), int(vol.sources[0].Columns)
    yy, xx = np.mgrid[:rows, :cols]
    mask = np.zeros((n, rows, cols), dtype=bool)
    for k, (ry, rx) in {5: (40, 30), 11: (90, 70), 12: (85, 65), 17: (20, 20)}.items():
        mask[k] = ((yy - 260) / ry) ** 2 + ((xx - 300) / rx) ** 2 < 1
    mask[11, 40:50, 40:50] = True  # a second, smaller component on the key slice
    writer = ResultWriter(vol.sources, _one_segment(), {1: mask})
    assert writer.key_slice(1) == 11
    objs = {o.kind: o.dataset for o in writer.build_all()}
    assert set(objs) == {"seg", "keyslices"}  # no measurement, no text: no other SR
    (group,) = _keyslice_groups(objs["keyslices"])
    assert _image_uid(group) == vol.sources[11].SOPInstanceUID
    assert group.tracking_identifier == "Nodule"
    assert group.finding_sites[0].value.value == NODULE.value

    points = np.asarray(group.roi.value, dtype=np.float64)  # (column, row)
    component = mask[11].copy()
    component[40:50, 40:50] = False
    centres = np.argwhere(component)[:, ::-1] + 0.5  # (column, row) of pixel centres
    distance, _ = cKDTree(centres).query(points)
    assert distance.max() <= 1.0  # every vertex on the mask boundary
    assert polygon_area(points) == pytest.approx(component.sum(), rel=0.10)
    row_mm, col_mm = (float(v) for v in vol.sources[11].PixelSpacing)
    assert _area(group) == pytest.approx(component.sum() * row_mm * col_mm, rel=0.10)


def test_keyslices_on_a_cr_box_without_pixel_spacing() -> None:
    vol = read_series([cr_chest_path()])
    mask = np.zeros((1, int(vol.sources[0].Rows), int(vol.sources[0].Columns)), dtype=bool)
    mask[0, 700:1200, 300:900] = True
    result = pb.AnalysisResult(
        model=MODEL,
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_CLASSIFY,
                findings=[pb.Finding(finding=EFFUSION, score=0.8, present=True, label="effusion")],
            ),
            pb.TaskResult(
                task=pb.TASK_KIND_DETECT,
                boxes=[
                    pb.Box(
                        slice_index=0,
                        row_min=900,
                        column_min=200,
                        row_max=1400,
                        column_max=800,
                        finding=EFFUSION,
                        label="effusion",
                        score=0.7,
                    )
                ],
            ),
            pb.TaskResult(
                task=pb.TASK_KIND_SEGMENT,
                masks=[pb.MaskInfo(segment_number=1, label="Right lung", category=ANATOMY, type=LUNG)],
            ),
        ],
    )
    objs = {o.kind: o.dataset for o in ResultWriter(vol.sources, result, {1: mask}).build_all()}
    assert set(objs) == {"seg", "measurements", "keyslices"}
    lung, box = _keyslice_groups(objs["keyslices"])
    assert lung.tracking_identifier == "Right lung"
    assert _area(lung) is None  # PixelSpacing 0\0 and no ImagerPixelSpacing: no area
    np.testing.assert_array_equal(
        lung.roi.value, [[300, 700], [900, 700], [900, 1200], [300, 1200], [300, 700]]
    )
    assert box.tracking_identifier == "effusion"
    assert box.roi.value.tolist() == [[200, 900], [800, 900], [800, 1400], [200, 1400], [200, 900]]
    assert box.finding_sites[0].value.value == EFFUSION.value
    assert [round(m.value, 3) for m in box.get_measurements()] == [0.7]  # the score, kept
    for g in (lung, box):
        assert _image_uid(g) == vol.sources[0].SOPInstanceUID
    # The qualitative finding has no image location: measurements SR only.
    measurements = hd.sr.Comprehensive3DSR.from_dataset(objs["measurements"]).content
    (finding,) = measurements.get_image_measurement_groups()
    assert finding.tracking_identifier == "effusion"
    assert finding.tracking_uid not in _tracking_uids(objs["keyslices"]).values()


def test_no_keyslices_without_a_mask_or_box(small_ct_files: list[Path]) -> None:
    vol = read_series(small_ct_files[:2])
    result = pb.AnalysisResult(
        model=MODEL,
        tasks=[pb.TaskResult(task=pb.TASK_KIND_CLASSIFY, findings=[pb.Finding(finding=NODULE, score=0.1)])],
    )
    assert [o.kind for o in ResultWriter(vol.sources, result, {}).build_all()] == ["measurements"]
    empty = {1: np.zeros((2, int(vol.sources[0].Rows), int(vol.sources[0].Columns)), dtype=bool)}
    assert [o.kind for o in ResultWriter(vol.sources, _one_segment(), empty).build_all()] == ["seg"]
