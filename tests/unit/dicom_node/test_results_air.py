"""IHE AI Results (AIR) content the SEG and SRs carry (the README's AIR conformance table).

Each test is one row of that table: the algorithm named (TID 4019 in every measurement group, the
SEG's algorithm identification, Contributing Equipment), the device observer, tracking identifiers
and UIDs, coded qualitative findings, references to the source images, the unverified status.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from protos.radbridge.v1 import inference_pb2 as pb
from tests.reference_run import analyze_reference

LUNG = pb.Code(value="39607008", scheme="SCT", meaning="Lung")


@pytest.fixture(scope="module")
def air(small_ct_files: list[Path]):  # noqa: ANN201
    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    task = outcome.result.tasks.add(task=pb.TASK_KIND_CLASSIFY)
    task.findings.add(finding=LUNG, score=0.9, present=True, label="lung")
    objs = {o.kind: o.dataset for o in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()}
    return vol, outcome.result.model, objs


def _items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return f"{seq[0].CodingSchemeDesignator}:{seq[0].CodeValue}" if seq else ""


def _groups(sr: Dataset) -> list[Dataset]:
    """The TID 1500 measurement groups (DCM 125007)."""
    return [i for i in _items(sr) if _concept(i) == "DCM:125007"]


def test_ai_named_as_processing_equipment_in_every_object(air) -> None:  # noqa: ANN001
    _, model, objs = air
    for kind, ds in objs.items():
        ours = [e for e in ds.ContributingEquipmentSequence if e.get("ManufacturerModelName") == model.name]
        assert len(ours) == 1, kind
        assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102", kind
        assert ours[0].SoftwareVersions == model.version, kind
        assert ds.ManufacturerModelName == model.name and ds.SoftwareVersions == model.version, kind


@pytest.mark.parametrize("kind", ["measurements", "keyslices"])
def test_every_measurement_group_names_the_algorithm_and_is_tracked(air, kind: str) -> None:  # noqa: ANN001
    _, model, objs = air
    groups = _groups(objs[kind])
    assert groups
    uids = set()
    for group in groups:
        by_concept = {_concept(i): i for i in group.ContentSequence}
        assert by_concept["DCM:111001"].TextValue == model.name  # TID 4019 Algorithm Name
        assert by_concept["DCM:111003"].TextValue == model.version  # Algorithm Version
        assert by_concept["DCM:112039"].TextValue  # Tracking Identifier
        uids.add(by_concept["DCM:112040"].UID)  # Tracking Unique Identifier
    assert len(uids) == len(groups)


def test_device_observer_context(air) -> None:  # noqa: ANN001
    _, model, objs = air
    for kind in ("measurements", "keyslices", "narrative"):
        items = {_concept(i): i for i in objs[kind].ContentSequence}
        assert items["DCM:121005"].ConceptCodeSequence[0].CodeValue == "121007", kind  # Observer Type: Device
        assert items["DCM:121012"].UID, kind  # Device Observer UID
        assert items["DCM:121013"].TextValue == model.name, kind  # Device Observer Name


def test_qualitative_finding_is_coded_present_with_probability(air) -> None:  # noqa: ANN001
    _, _, objs = air
    evaluations = [
        i
        for i in _items(objs["measurements"])
        if _concept(i) == "SCT:39607008" and "ConceptCodeSequence" in i
    ]
    assert evaluations and evaluations[0].ConceptCodeSequence[0].CodeValue == "52101004"  # Present
    probabilities = [i for i in _items(objs["measurements"]) if _concept(i) == "UMLS:C0033204"]
    assert probabilities and float(probabilities[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        0.9
    )


def test_source_images_referenced_and_unverified(air) -> None:  # noqa: ANN001
    vol, _, objs = air
    sources = {str(ds.SOPInstanceUID) for ds in vol.sources}
    for kind in ("measurements", "narrative"):
        sr = objs[kind]
        referenced = {
            str(ref.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert sources <= referenced, kind
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE", kind
    seg = objs["seg"]
    seg_refs = {
        str(r.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert seg_refs == sources


def test_seg_segments_identify_algorithm_and_tracking(air) -> None:  # noqa: ANN001
    _, model, objs = air
    for segment in objs["seg"].SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == model.name
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == model.name and algorithm.AlgorithmVersion == model.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert segment.TrackingUID and segment.TrackingID


def test_a_segment_has_one_tracking_uid_in_seg_and_both_srs(air) -> None:  # noqa: ANN001
    _, _, objs = air
    seg_uids = {str(s.TrackingUID) for s in objs["seg"].SegmentSequence}
    for kind in ("measurements", "keyslices"):
        sr_uids = {
            str(i.UID) for g in _groups(objs[kind]) for i in g.ContentSequence if _concept(i) == "DCM:112040"
        }
        assert seg_uids <= sr_uids, kind
