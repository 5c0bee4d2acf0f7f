"""``build_seg`` (dicom_node.segwriter) against ``build_seg_highdicom`` (highdicom's Segmentation,
the writer it replaced): the same object, attribute for attribute and byte for byte in the pixel
data, for every shape of input the node produces. Both are saved and read back, so the comparison
is of what goes on the wire; only creation dates/times and the character set (the new writer
declares UTF-8 itself, as build_all did afterwards) may differ."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.masks import FractionalMask, PackedMask
from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import cr_chest_path, ct_series, write_series
from tests.reference_run import analyze_reference
from tests.unit.dicom_node.test_volume_geometry import _temporal, legacy_enhanced, save

#: may differ between two runs of one writer already
VOLATILE = {
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "ContributionDateTime",
    "SpecificCharacterSet",
}
CATEGORY = pb.Code(value="49755003", scheme="SCT", meaning="Morphologically Altered Structure")
TYPE = pb.Code(value="4147007", scheme="SCT", meaning="Mass")


def _saved(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _pixel_bytes(ds: Dataset, data: bytes) -> bytes:
    """The bytes that hold pixels: highdicom pads an odd length with b"0", the DICOM pad is NUL."""
    bits = int(ds.NumberOfFrames) * int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated)
    return data[: (bits + 7) // 8]


def _differences(old: Dataset, new: Dataset, path: str = "") -> list[str]:
    found = []
    for tag in sorted(set(old.keys()) | set(new.keys())):
        a, b = old.get(tag), new.get(tag)
        name = (a or b).keyword or str(tag)
        if name in VOLATILE:
            continue
        if a is None or b is None:
            found.append(f"{path}{name}: only in {'new' if a is None else 'old'}")
        elif a.VR != b.VR:
            found.append(f"{path}{name}: VR {a.VR} != {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{path}{name}: {len(a.value)} items != {len(b.value)}")
                continue
            for i, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                found.extend(_differences(x, y, f"{path}{name}[{i}]."))
        elif name == "PixelData":
            if _pixel_bytes(old, a.value) != _pixel_bytes(new, b.value):
                found.append(f"{path}PixelData differs")
        elif a.value != b.value:
            found.append(f"{path}{name}: {str(a.value)[:60]!r} != {str(b.value)[:60]!r}")
    return found


def assert_same_seg(writer: ResultWriter) -> Dataset:
    """The new SEG equals highdicom's, file meta included; returns the new one (as read back)."""
    new = _saved(writer.build_seg())
    old = _saved(writer.build_seg_highdicom())
    assert _differences(old.file_meta, new.file_meta) == []
    assert _differences(old, new) == []
    assert str(new.SpecificCharacterSet) == "ISO_IR 192"
    return new


def _result(n: int, probability: bool = False) -> pb.AnalysisResult:
    enc = pb.MASK_ENCODING_FRACTIONAL_UINT8 if probability else pb.MASK_ENCODING_UNSPECIFIED
    return pb.AnalysisResult(
        model=pb.ModelIdentity(name="segtest", backend="reference", version="2"),
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_SEGMENT,
                masks=[
                    pb.MaskInfo(
                        segment_number=i, label=f"S{i}", category=CATEGORY, type=TYPE, encoding=enc,
                        cielab=[30000 + i, 40000, 20000],
                    )
                    for i in range(1, n + 1)
                ],
            )
        ],
    )  # fmt: skip


def _packed(mask: np.ndarray) -> PackedMask:
    return PackedMask(np.packbits(np.asarray(mask, dtype=bool)).tobytes(), mask.shape)


@pytest.fixture(scope="module")
def ct(small_ct_files: list[Path]):  # noqa: ANN201
    vol = read_series(small_ct_files)
    return vol, analyze_reference(vol)


def test_reference_ct_packed_masks(ct) -> None:  # noqa: ANN001
    """The node's case: the reference engine's segments as they come over gRPC (bit-packed)."""
    vol, outcome = ct
    masks = {n: _packed(m) for n, m in outcome.masks.items()}
    seg = assert_same_seg(ResultWriter(vol.sources, outcome.result, masks))
    assert len(outcome.masks) > 1 and seg.SegmentsOverlap == "NO"
    # read back with highdicom: each segment's frames are its mask on the source slices
    reader = hd.seg.Segmentation.from_dataset(seg)
    uids = [str(ds.SOPInstanceUID) for ds in vol.sources]
    for number, mask in outcome.masks.items():
        got = reader.get_pixels_by_source_instance(uids, segment_numbers=[number])[..., 0]
        assert np.array_equal(got.astype(bool), np.asarray(mask, dtype=bool))


def test_dense_and_packed_masks_give_the_same_bytes(ct) -> None:  # noqa: ANN001
    vol, outcome = ct
    dense = ResultWriter(vol.sources, outcome.result, outcome.masks).build_seg()
    packed = ResultWriter(
        vol.sources, outcome.result, {n: _packed(m) for n, m in outcome.masks.items()}
    ).build_seg()
    assert dense.PixelData == packed.PixelData
    assert _differences(_saved(dense), _saved(packed)) == []


def _ellipsoids(shape: tuple[int, int, int], n: int, overlap: bool = False) -> dict[int, np.ndarray]:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    masks = {}
    for i in range(1, n + 1):
        cz, cy, cx = (i * 3) % shape[0], 40 + 30 * i, 60 + (0 if overlap else 45 * i)
        masks[i] = ((z - cz) / 3.0) ** 2 + ((y - cy) / 25.0) ** 2 + ((x - cx) / 20.0) ** 2 <= 1.0
    return masks


def test_one_segment_goes_to_the_shared_groups(ct) -> None:  # noqa: ANN001
    vol, _ = ct
    masks = _ellipsoids(vol.voxels.shape, 1)
    seg = assert_same_seg(ResultWriter(vol.sources, _result(1), {1: _packed(masks[1])}))
    assert "SegmentIdentificationSequence" in seg.SharedFunctionalGroupsSequence[0]
    assert seg.DimensionOrganizationType == "3D"


def test_overlapping_segments(ct) -> None:  # noqa: ANN001
    vol, _ = ct
    masks = _ellipsoids(vol.voxels.shape, 3, overlap=True)
    seg = assert_same_seg(ResultWriter(vol.sources, _result(3), {n: _packed(m) for n, m in masks.items()}))
    assert seg.SegmentsOverlap == "YES"


def test_empty_masks_write_every_frame(ct) -> None:  # noqa: ANN001
    vol, _ = ct
    shape = vol.voxels.shape
    seg = assert_same_seg(
        ResultWriter(vol.sources, _result(2), {1: np.zeros(shape, bool), 2: np.zeros(shape, bool)})
    )
    assert seg.NumberOfFrames == 2 * shape[0]


def test_fractional_probability_maps_beside_a_binary_segment(ct) -> None:  # noqa: ANN001
    vol, _ = ct
    shape = vol.voxels.shape
    rng = np.random.default_rng(3)
    masks = _ellipsoids(shape, 3)
    probs = np.where(masks[1], rng.integers(1, 201, size=shape), 0).astype(np.uint8)
    fractional = {
        1: FractionalMask(probs, shape, max_value=200),  # an odd scale: highdicom's rounding
        2: FractionalMask(np.where(masks[2], 255, 0).astype(np.uint8), shape),
        3: masks[3],  # binary: 0/255
    }
    seg = assert_same_seg(ResultWriter(vol.sources, _result(3, probability=True), fractional))
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentsOverlap == "UNDEFINED"


def test_frames_that_are_not_whole_bytes(ct) -> None:  # noqa: ANN001
    """7 x 9 frames: 63 bits each, packed on across frame boundaries."""
    vol, _ = ct
    sources = [copy.deepcopy(ds) for ds in vol.sources]
    for ds in sources:
        ds.Rows, ds.Columns = 7, 9
    rng = np.random.default_rng(5)
    masks = {n: rng.random((len(sources), 7, 9)) < 0.2 for n in (1, 2)}
    masks[2] &= ~masks[1]
    assert_same_seg(ResultWriter(sources, _result(2), {1: _packed(masks[1]), 2: masks[2]}))


def test_resampled_series_writes_on_received_images_only(tmp_path: Path) -> None:
    paths = write_series(ct_series(n_slices=8), tmp_path / "ct")
    vol = read_series(paths[:3] + paths[4:])
    assert any(ref.source is None for ref in vol.slices)
    outcome = analyze_reference(vol)
    masks = {n: _packed(m) for n, m in outcome.masks.items()}
    assert_same_seg(ResultWriter(vol.sources, outcome.result, masks, slices=vol.slices))


def test_enhanced_source_frames_keep_their_numbers(tmp_path: Path) -> None:
    source = _temporal(legacy_enhanced(ct_series(n_slices=6)), True)  # frames 4..6 repeat 1..3's positions
    vol = read_series([save(source, tmp_path / "mf.dcm")])
    outcome = analyze_reference(vol)
    seg = assert_same_seg(ResultWriter(vol.sources, outcome.result, outcome.masks, slices=vol.slices))
    numbers = {
        int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert numbers <= {r.frame for r in vol.slices if r.frame is not None}


def test_a_cr_without_patient_coordinates() -> None:
    vol = read_series([cr_chest_path()])
    outcome = analyze_reference(vol)
    seg = assert_same_seg(ResultWriter(vol.sources, outcome.result, outcome.masks))
    assert "PatientOrientation" in seg
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]  # 0\0 is left out
    bits = int(seg.NumberOfFrames) * int(seg.Rows) * int(seg.Columns)
    assert bits % 16 and seg.PixelData[-1:] == b"\x00"  # an odd length is padded with NUL


def test_the_uids_do_not_change(ct) -> None:  # noqa: ANN001
    """Instance, series and dimension organization UIDs are derived: a re-run writes the same object."""
    vol, outcome = ct
    first = ResultWriter(vol.sources, outcome.result, outcome.masks).build_seg()
    again = ResultWriter(vol.sources, outcome.result, outcome.masks).build_seg()
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.DimensionOrganizationSequence[0].DimensionOrganizationUID == (
        again.DimensionIndexSequence[0].DimensionOrganizationUID
    )
    assert _differences(_saved(first), _saved(again)) == []


def test_masks_that_do_not_fit_the_images_are_refused(ct) -> None:  # noqa: ANN001
    vol, _ = ct
    shape = vol.voxels.shape
    with pytest.raises(ValueError, match="slices for"):
        ResultWriter(vol.sources, _result(1), {1: np.zeros((shape[0] - 1, *shape[1:]), bool)}).build_seg()
    with pytest.raises(ValueError, match="the images are"):
        ResultWriter(vol.sources, _result(1), {1: np.zeros((shape[0], 8, 8), bool)}).build_seg()
