"""The SRs that ResultWriter builds equal, byte for byte, the SRs of the path it replaced.

The oracle is ``ResultWriter`` with highdicom given all the evidence (``_new_sr_highdicom``) and
outlines traced on the whole plane (``_contours.outline``), as before the SR build was made
faster. Only the attributes that highdicom stamps from the clock are set alike before comparing.
"""

from __future__ import annotations

import copy
import random
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node._contours import outline
from dicom_node.masks import PackedMask
from dicom_node.results import MAX_OUTLINE_POINTS, ResultWriter, _outline_in_box
from dicom_node.slices import SliceRef
from dicom_node.volume import read_series
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import cr_chest_path, ct_series, write_series
from tests.reference_run import analyze_reference
from tests.unit.dicom_node.test_volume_geometry import _temporal, legacy_enhanced, save

EFFUSION = pb.Code(value="60046008", scheme="SCT", meaning="Pleural effusion")
NODULE = pb.Code(value="27925004", scheme="SCT", meaning="Nodule")
LUNG = pb.Code(value="39607008", scheme="SCT", meaning="Lung")
ANATOMY = pb.Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
VOLUME = pb.Code(value="118565006", scheme="SCT", meaning="Volume")
MM3 = pb.Code(value="mm3", scheme="UCUM", meaning="mm3")
#: Set by highdicom from datetime.now(): the only values two builds may not share.
CLOCK = {
    *("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"),
    *("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),  # the key images
}
SR_KINDS = ("measurements", "keyslices", "narrative")


class HighdicomSRs(ResultWriter):
    """The SR build as it was: highdicom collects all the evidence; outlines on the whole plane."""

    _new_sr = ResultWriter._new_sr_highdicom

    @staticmethod
    def _outline(component: np.ndarray) -> np.ndarray:
        return outline(component, MAX_OUTLINE_POINTS)


def _unclocked(ds: Dataset) -> Dataset:
    out = copy.deepcopy(ds)
    pending = [out]
    while pending:
        item = pending.pop()
        for element in item:
            if element.keyword in CLOCK:
                assert element.value, f"{element.keyword} is empty"
                element.value = {"DA": "20000101", "TM": "000000", "DT": "20000101000000"}[element.VR]
            elif element.VR == "SQ":
                pending.extend(element.value)
    return out


def _encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    _unclocked(ds).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _assert_same(new: Dataset, old: Dataset) -> None:
    assert type(new) is type(old)
    a, b = _unclocked(new), _unclocked(old)
    assert a == b and a.file_meta == b.file_meta
    assert _encoded(new) == _encoded(old)


def _assert_same_objects(make_writer, key_images: bool = False) -> dict[str, Dataset]:  # noqa: ANN001
    new = {o.kind: o.dataset for o in make_writer(ResultWriter).build_all(key_images=key_images)}
    old = {o.kind: o.dataset for o in make_writer(HighdicomSRs).build_all(key_images=key_images)}
    assert list(new) == list(old)
    for kind in new:
        _assert_same(new[kind], old[kind])
    return new


def _evidence_uids(sr: Dataset, keyword: str = "CurrentRequestedProcedureEvidenceSequence") -> list[str]:
    return [
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.get(keyword, [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]


def _packed(masks: dict[int, np.ndarray]) -> dict[int, PackedMask]:
    """As the node holds returned masks."""
    return {
        n: PackedMask(np.packbits(np.asarray(m, dtype=bool)).tobytes(), m.shape) for n, m in masks.items()
    }


def _add_boxes_findings_measurements(result: pb.AnalysisResult, n_slices: int) -> None:
    detect = result.tasks.add(task=pb.TASK_KIND_DETECT)
    for k, label in ((2, "nodule a"), (n_slices - 3, "nodule b"), (2, "nodule c")):  # two on one image
        detect.boxes.add(
            slice_index=k, row_min=100, column_min=120, row_max=140, column_max=170, score=0.6,
            finding=NODULE, label=label,
        )  # fmt: skip
    classify = result.tasks.add(task=pb.TASK_KIND_CLASSIFY, prompt_id="yes-no-v1", raw_output="yes")
    classify.findings.add(finding=EFFUSION, score=0.8, present=True, label="effusion")
    classify.findings.add(finding=NODULE, score=-1, present=False)
    classify.measurements.add(concept=VOLUME, value=12.5, unit=MM3)  # loose: names no segment


def test_reference_ct_with_boxes_findings_and_key_images(small_ct_files: list[Path]) -> None:
    shuffled = list(small_ct_files)
    random.Random(3).shuffle(shuffled)
    vol = read_series(shuffled)
    outcome = analyze_reference(vol)
    _add_boxes_findings_measurements(outcome.result, len(vol.sources))
    masks = _packed(outcome.masks)
    objs = _assert_same_objects(lambda cls: cls(vol.sources, outcome.result, masks), key_images=True)
    assert set(objs) >= {"seg", *SR_KINDS, "keyimages"}
    sources = [str(ds.SOPInstanceUID) for ds in vol.sources]
    assert _evidence_uids(objs["measurements"]) == [*sources, str(objs["seg"].SOPInstanceUID)]
    assert _evidence_uids(objs["narrative"]) == sources
    assert 1 < len(_evidence_uids(objs["keyslices"])) < len(sources)
    # A re-run names the first run's objects as predecessors.
    previous = {kind: [objs[kind]] for kind in SR_KINDS}
    again = _assert_same_objects(lambda cls: cls(vol.sources, outcome.result, masks, previous=previous))
    assert all("PredecessorDocumentsSequence" in again[kind] for kind in SR_KINDS)


def test_cr_with_a_mask_a_box_findings_and_a_bilingual_report() -> None:
    vol = read_series([cr_chest_path()])
    rows, cols = int(vol.sources[0].Rows), int(vol.sources[0].Columns)
    mask = np.zeros((1, rows, cols), dtype=bool)
    mask[0, 700:1200, 300:900] = True
    mask[0, 800:900, 400:500] = False  # a hole: filled in the outline
    mask[0, 700:1000, 1300:1700] = True  # a second major component
    result = pb.AnalysisResult(
        model=pb.ModelIdentity(name="vlm", backend="medgemma", version="1.5", weights_sha256="0f" * 32)
    )
    result.tasks.add(task=pb.TASK_KIND_SEGMENT).masks.add(
        segment_number=1, label="Lungs", category=ANATOMY, type=LUNG, cielab=[50000, 30000, 40000]
    )
    result.tasks.add(task=pb.TASK_KIND_REPORT).report.CopyFrom(
        pb.ReportText(findings="右侧少量胸腔积液。", impression="胸腔积液。", language="zh")
    )
    result.tasks.add(task=pb.TASK_KIND_VQA, answer="Yes, a small right effusion.", raw_output="Yes")
    _add_boxes_findings_measurements(result, 5)
    for box in result.tasks[-2].boxes:
        box.slice_index = 0
    objs = _assert_same_objects(lambda cls: cls(vol.sources, result, {1: mask}, geometry_note="one image"))
    assert set(objs) == {"seg", *SR_KINDS}
    assert _evidence_uids(objs["keyslices"]) == [str(vol.sources[0].SOPInstanceUID)]


def test_enhanced_image_with_two_time_points(tmp_path: Path) -> None:
    source = _temporal(legacy_enhanced(ct_series(n_slices=6)), True)  # frames 4..6 repeat 1..3's positions
    vol = read_series([save(source, tmp_path / "mf.dcm")])
    outcome = analyze_reference(vol)
    _add_boxes_findings_measurements(outcome.result, len(vol.slices))
    objs = _assert_same_objects(
        lambda cls: cls(vol.sources, outcome.result, outcome.masks, slices=vol.slices, geometry_note=vol.note)
    )
    assert set(objs) == {"seg", *SR_KINDS}


def test_resampled_series_with_a_box_on_the_interpolated_slice(tmp_path: Path) -> None:
    paths = write_series(ct_series(n_slices=8), tmp_path / "ct")
    vol = read_series(paths[:3] + paths[4:])
    assert any(ref.source is None for ref in vol.slices)
    outcome = analyze_reference(vol)
    _add_boxes_findings_measurements(outcome.result, len(vol.slices))
    outcome.result.tasks[-2].boxes[0].slice_index = next(
        k for k, r in enumerate(vol.slices) if r.source is None
    )
    _assert_same_objects(
        lambda cls: cls(
            vol.sources, outcome.result, _packed(outcome.masks), slices=vol.slices, geometry_note=vol.note
        )
    )


def test_evidence_from_another_study_and_a_repeated_source(small_ct_files: list[Path]) -> None:
    """highdicom's grouping: one item per instance, same-study evidence by series in order of first
    appearance, other studies' in the Pertinent Other Evidence Sequence."""
    sources = read_series(small_ct_files[:4]).sources
    other = copy.deepcopy(sources[3])
    other.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    other.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.999.1"
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.999.1.1"
    evidence = [sources[0], sources[1], other, sources[1], sources[2]]
    result = pb.AnalysisResult(model=pb.ModelIdentity(name="m", version="1"))
    result.tasks.add(task=pb.TASK_KIND_REPORT).report.findings = "Clear lungs."
    new, old = ResultWriter(evidence, result, {}).build_all(), HighdicomSRs(evidence, result, {}).build_all()
    assert [o.kind for o in new] == [o.kind for o in old] == ["narrative"]
    _assert_same(new[0].dataset, old[0].dataset)
    narrative = new[0].dataset
    assert _evidence_uids(narrative) == [str(sources[k].SOPInstanceUID) for k in (0, 1, 2)]
    assert _evidence_uids(narrative, "PertinentOtherEvidenceSequence") == [str(other.SOPInstanceUID)]


def test_content_naming_an_image_outside_the_evidence_is_still_refused(small_ct_files: list[Path]) -> None:
    """highdicom still checks the content against the evidence it is given."""
    vol = read_series(small_ct_files[:3])
    result = pb.AnalysisResult(model=pb.ModelIdentity(name="m", version="1"))
    result.tasks.add(task=pb.TASK_KIND_DETECT).boxes.add(
        slice_index=2, row_min=1, column_min=1, row_max=5, column_max=5, finding=NODULE, score=0.5
    )
    writer = ResultWriter(vol.sources, result, {})
    report = hd.sr.MeasurementReport(
        observation_context=writer._observation_context(),
        procedure_reported=hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging procedure"),
        imaging_measurements=[writer._box_group(0, 0, result.tasks[0].boxes[0], with_site=True)],
    )
    with pytest.raises(ValueError, match="No evidence was provided"):
        writer._new_sr(
            hd.sr.Comprehensive3DSR, vol.sources[:2], report, writer._sr_identity("keyslices", "x")
        )
    with pytest.raises(ValueError, match="No evidence was provided"):
        writer._new_sr(hd.sr.Comprehensive3DSR, [], report, writer._sr_identity("keyslices", "x"))


@pytest.mark.parametrize("seed", range(6))
def test_outline_on_the_bounding_box_is_the_outline_on_the_plane(seed: int) -> None:
    rng = np.random.default_rng(seed)
    plane = np.zeros((64, 80), dtype=bool)
    for _ in range(4):  # overlapping rectangles, some on the border, some with holes
        r, c = rng.integers(-5, 60), rng.integers(-5, 75)
        plane[max(r, 0) : r + rng.integers(3, 30), max(c, 0) : c + rng.integers(3, 30)] = True
        plane[rng.integers(0, 64), rng.integers(0, 80)] = False
    plane |= rng.random(plane.shape) < 0.02  # specks
    for points in (8, MAX_OUTLINE_POINTS):
        got, want = _outline_in_box(plane, points), outline(plane, points)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="empty mask"):
        _outline_in_box(np.zeros((4, 4), dtype=bool), 8)


def test_slice_refs_naming_interpolated_slices_build_the_same_key_slices(small_ct_files: list[Path]) -> None:
    """Key slices are found once per writer and stay those of the uncached search."""
    vol = read_series(small_ct_files[:6])
    outcome = analyze_reference(vol)
    slices = [SliceRef(0), SliceRef(None), SliceRef(2), SliceRef(3), SliceRef(None), SliceRef(5)]
    writer = ResultWriter(vol.sources, outcome.result, _packed(outcome.masks), slices=slices)
    for number in outcome.masks:
        first = writer.key_slice(number)
        assert first == writer._find_key_slice(number) == writer.key_slice(number)
        assert first is None or slices[first].source is not None
