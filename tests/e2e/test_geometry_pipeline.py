"""Input geometry through the whole loop: dcmtk storescu -> `radbridge serve` -> Orthanc.

Two studies go in: the synthetic CT as one Legacy Converted Enhanced CT instance (highdicom's
conversion, frames shuffled), and the same kind of series with one slice removed. Both come back
as SEG + SRs that pass dciodvfy; the enhanced image's SEG frames name the source frames at their
plane positions, the gapped series' SEG covers the received images only, and the gap is written
in the narrative SR and in the study history of `radbridge status`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.volume import read_series
from inference_service.backends.reference import segment_ct
from radbridge.synth import SyntheticPatient, ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _wait_for_outputs, study_status
from tests.peers import OrthancServer, assert_valid_dicom_object, free_port, storescu

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]
N = 16
LABELS = (("Lungs", "lungs"), ("Bone", "bone"), ("Soft tissue", "soft"))


@pytest.fixture
def node(tmp_path: Path, orthanc: OrthancServer) -> Iterator[tuple[Path, OrthancServer, int]]:
    port = free_port()
    cfg = _config(tmp_path, port, orthanc)
    serve = Serve(cfg, tmp_path / "serve.log")
    yield cfg, orthanc, port
    serve.stop()


def _items(item: Dataset, value_type: str) -> Iterator[Dataset]:
    """Every content item of that value type in an SR's tree."""
    for child in item.get("ContentSequence", []):
        if child.ValueType == value_type:
            yield child
        yield from _items(child, value_type)


def _texts(sr: Dataset) -> Iterator[str]:
    return (str(item.TextValue) for item in _items(sr, "TEXT"))


def _frame_ipp(ds: Dataset, frame: int) -> list[float]:
    return [
        float(v)
        for v in ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
    ]


def _download(orthanc: OrthancServer, objs: dict[str, list[dict]], tmp_path: Path) -> dict[str, Dataset]:
    """Every SEG and SR of a study, checked with dciodvfy (and dsrdump), by kind (SERIES number)."""
    kinds = {9701: "seg", 9702: "measurements", 9703: "narrative", 9704: "keyslices"}
    out = {}
    for modality in ("SEG", "SR"):
        for obj in objs[modality]:
            path = tmp_path / f"{obj['sop']}.dcm"
            path.write_bytes(orthanc.instance_file(obj["id"]))
            assert_valid_dicom_object(path)
            ds = pydicom.dcmread(path)
            out[kinds[int(ds.SeriesNumber)]] = ds
    return out


def test_enhanced_ct_and_gapped_series_round_trip(node, tmp_path: Path) -> None:  # noqa: ANN001
    cfg, orthanc, port = node
    patient = SyntheticPatient(name="GEOMETRY^TEST", patient_id="GEO-1", accession="GEOACC1")
    legacy = ct_series(n_slices=N, patient=patient, seed=21)
    random.Random(2).shuffle(legacy)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy,
        series_instance_uid=generate_uid(),
        series_number=4,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    mf_path = tmp_path / "enhanced.dcm"
    enhanced.save_as(mf_path, enforce_file_format=True)
    gapped_all = write_series(ct_series(n_slices=N, patient=patient, seed=22), tmp_path / "gapped")
    gapped = gapped_all[:6] + gapped_all[7:]  # slice 6 (z = -15 mm) never sent

    result = storescu([mf_path, *gapped], "127.0.0.1", port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors, result.stderr

    # -- the enhanced image: SEG frames reference the source frames at their positions ---------
    mf_study = str(enhanced.StudyInstanceUID)
    mf_objs = _download(orthanc, _wait_for_outputs(orthanc, mf_study, {"SEG": 1, "SR": 3}), tmp_path)
    seg = mf_objs["seg"]
    source = pydicom.dcmread(mf_path)
    assert (
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        == source.SOPInstanceUID
    )
    referenced = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (src,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert src.ReferencedSOPInstanceUID == source.SOPInstanceUID
        number = int(src.ReferencedFrameNumber)
        referenced.add(number)
        seg_ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert seg_ipp == pytest.approx(_frame_ipp(source, number))
    assert referenced <= set(range(1, N + 1)) and len(referenced) > N // 2
    # the SEG's voxels are the reference algorithm's on the source frames, frame by frame
    vol = read_series([mf_path])
    expected = segment_ct(vol.voxels, float(np.prod(vol.spacing_mm)) / 1000)
    reader = hd.seg.Segmentation.from_dataset(seg)
    numbers = {reader.get_segment_description(n).segment_label: n for n in reader.segment_numbers}
    frames = [r.frame for r in vol.slices]
    for label, key in LABELS:
        got = reader.get_pixels_by_source_frame(
            source.SOPInstanceUID, frames, segment_numbers=[numbers[label]], skip_overlap_checks=True
        )
        np.testing.assert_array_equal(got[..., 0].astype(bool), expected[key], err_msg=label)
    # the key-slice SR's outlines name a frame of the enhanced image
    image_refs = [item.ReferencedSOPSequence[0] for item in _items(mf_objs["keyslices"], "IMAGE")]
    assert image_refs and all(
        r.ReferencedSOPInstanceUID == source.SOPInstanceUID and 1 <= int(r.ReferencedFrameNumber) <= N
        for r in image_refs
    )

    # -- the gapped series: SEG on the received images only; the gap in SR and history -------
    gap_study = str(pydicom.dcmread(gapped[0], stop_before_pixels=True).StudyInstanceUID)
    gap_objs = _download(orthanc, _wait_for_outputs(orthanc, gap_study, {"SEG": 1, "SR": 3}), tmp_path)
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in gapped}
    gap_seg = gap_objs["seg"]
    named = {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in gap_seg.PerFrameFunctionalGroupsSequence
    }
    assert named <= received and len(named) > N // 2
    listed = {
        str(i.ReferencedSOPInstanceUID)
        for i in gap_seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert listed == received
    missing_z = float(pydicom.dcmread(gapped_all[6], stop_before_pixels=True).ImagePositionPatient[2])
    seg_z = {
        round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]), 3)
        for f in gap_seg.PerFrameFunctionalGroupsSequence
    }
    assert missing_z not in seg_z  # no frame for the interpolated position
    gvol = read_series(gapped)
    gexpected = segment_ct(gvol.voxels, float(np.prod(gvol.spacing_mm)) / 1000)
    greader = hd.seg.Segmentation.from_dataset(gap_seg)
    gnumbers = {greader.get_segment_description(n).segment_label: n for n in greader.segment_numbers}
    on_received = [k for k, r in enumerate(gvol.slices) if r.source is not None]
    uids = [gvol.sources[gvol.slices[k].source].SOPInstanceUID for k in on_received]  # type: ignore[index]
    for label, key in LABELS:
        got = greader.get_pixels_by_source_instance(
            uids, segment_numbers=[gnumbers[label]], skip_overlap_checks=True
        )
        np.testing.assert_array_equal(got[..., 0].astype(bool), gexpected[key][on_received], err_msg=label)
    note = "1 missing slice between z=-17.50 and z=-12.50 mm; resampled to 2.50 mm"
    assert any(note in text for text in _texts(gap_objs["narrative"]))
    study, _ = study_status(cfg, gap_study)
    assert any(e["event"] == "geometry" and note in e["detail"] for e in study["history"]), study["history"]
