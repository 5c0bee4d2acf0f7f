"""The writers on volumes that are not one image per slice: an enhanced image with two temporal
positions (frames repeating positions) and a series resampled over a missing slice. Every object
passes dciodvfy (and dsrdump); references name the source frames and received images only."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.results import ResultWriter
from dicom_node.slices import SliceRef
from dicom_node.volume import read_series
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import ct_series, write_series
from tests.peers import assert_valid_dicom_object
from tests.reference_run import analyze_reference
from tests.unit.dicom_node.test_volume_geometry import _temporal, frame_z, legacy_enhanced, save

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools")]


def _written(writer: ResultWriter, tmp_path: Path) -> dict[str, Dataset]:
    out = {}
    for obj in writer.build_all():
        path = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
        out[obj.kind] = pydicom.dcmread(path)
    return out


def _items(item: Dataset, value_type: str) -> list[Dataset]:
    found = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == value_type:
            found.append(child)
        found.extend(_items(child, value_type))
    return found


def _image_refs(sr: Dataset) -> list[Dataset]:
    """The SR's references to CT images (not to the SEG that TID 1411 names)."""
    refs = [item.ReferencedSOPSequence[0] for item in _items(sr, "IMAGE")]
    return [r for r in refs if r.ReferencedSOPClassUID != "1.2.840.10008.5.1.4.1.1.66.4"]


def test_enhanced_image_with_two_time_points(tmp_path: Path) -> None:
    source = _temporal(legacy_enhanced(ct_series(n_slices=6)), True)  # frames 4..6 repeat 1..3's positions
    vol = read_series([save(source, tmp_path / "mf.dcm")])
    outcome = analyze_reference(vol)
    objs = _written(
        ResultWriter(vol.sources, outcome.result, outcome.masks, slices=vol.slices, geometry_note=vol.note),
        tmp_path,
    )
    seg = objs["seg"]
    numbers = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (ref,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        numbers.add(int(ref.ReferencedFrameNumber))
        z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(frame_z(source, int(ref.ReferencedFrameNumber)))
    assert numbers and numbers <= {1, 2, 3}  # the analysed time point only
    reader = hd.seg.Segmentation.from_dataset(seg)
    got = reader.get_pixels_by_source_frame(
        source.SOPInstanceUID, [1, 2, 3], segment_numbers=[1], skip_overlap_checks=True
    )[..., 0]
    mask = np.asarray(outcome.masks[1], dtype=bool)
    by_frame = {r.frame: mask[k] for k, r in enumerate(vol.slices)}
    np.testing.assert_array_equal(got.astype(bool), np.stack([by_frame[1], by_frame[2], by_frame[3]]))
    refs = _image_refs(objs["keyslices"])
    assert refs and all(int(r.ReferencedFrameNumber) in (1, 2, 3) for r in refs)
    texts = [str(item.TextValue) for item in _items(objs["narrative"], "TEXT")]
    assert any(text.startswith("Input geometry: the series holds 2 stacks") for text in texts)
    assert any("(stack 1, temporal position 1), 3 frames" in text for text in texts)


def test_resampled_series_writes_on_received_images(tmp_path: Path) -> None:
    paths = write_series(ct_series(n_slices=8), tmp_path / "ct")
    vol = read_series(paths[:3] + paths[4:])
    outcome = analyze_reference(vol)
    # a box on the interpolated slice (grid slice 4) is drawn on the nearest received image
    detect = outcome.result.tasks.add(task=pb.TASK_KIND_DETECT)
    detect.boxes.add(
        slice_index=4, row_min=10, column_min=10, row_max=20, column_max=20, score=0.5, label="box",
        finding=pb.Code(value="27925004", scheme="SCT", meaning="Nodule"),
    )  # fmt: skip
    objs = _written(
        ResultWriter(vol.sources, outcome.result, outcome.masks, slices=vol.slices, geometry_note=vol.note),
        tmp_path,
    )
    received = {str(ds.SOPInstanceUID) for ds in vol.sources}
    assert len(received) == 7
    seg = objs["seg"]
    named = {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert named <= received
    z = {
        round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]), 2)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert -7.5 not in z  # the missing slice's position has no frame
    nearest = {str(vol.sources[vol.slices[k].source].SOPInstanceUID) for k in (3, 5)}  # type: ignore[index]
    box_refs = {str(r.ReferencedSOPInstanceUID) for r in _image_refs(objs["measurements"])}
    assert box_refs & nearest and box_refs <= received


def test_slices_that_name_no_source_are_refused(small_ct_files: list[Path]) -> None:
    vol = read_series(small_ct_files[:3])
    outcome = analyze_reference(vol)
    with pytest.raises(ValueError, match="not among the sources"):
        ResultWriter(
            vol.sources, outcome.result, outcome.masks, slices=[SliceRef(0), SliceRef(5), SliceRef(2)]
        )
    with pytest.raises(ValueError, match="No slice of the volume is a received image"):
        ResultWriter(vol.sources, outcome.result, outcome.masks, slices=[SliceRef(None)] * 3)


def test_key_images_of_a_resampled_series_show_received_images_only(tmp_path: Path) -> None:
    paths = write_series(ct_series(n_slices=8), tmp_path / "ct")
    vol = read_series(paths[:3] + paths[4:])
    outcome = analyze_reference(vol)
    detect = outcome.result.tasks.add(task=pb.TASK_KIND_DETECT)
    detect.boxes.add(
        slice_index=4, row_min=10, column_min=10, row_max=20, column_max=20, score=0.9, label="box",
        finding=pb.Code(value="27925004", scheme="SCT", meaning="Nodule"),
    )  # fmt: skip
    writer = ResultWriter(vol.sources, outcome.result, outcome.masks, slices=vol.slices, geometry_note=vol.note)
    chosen = writer.key_image_slices()
    assert chosen and all(vol.slices[k].received for k in chosen)  # grid slice 4 was interpolated
    assert len(chosen) == len(set(chosen))
    images = writer.build_key_images()
    received = {str(ds.SOPInstanceUID) for ds in vol.sources}
    for i, sc in enumerate(images):
        path = tmp_path / f"key{i}.dcm"
        sc.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in received
