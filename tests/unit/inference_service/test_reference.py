from __future__ import annotations

import numpy as np
import pytest

from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.reference import BONE_HU, LUNG_HU, ReferenceBackend, segment_ct
from inference_service.errors import InvalidInput, UnsupportedTask
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from radbridge.synth import phantom_hu


def _ct(n: int = 16) -> Volume:
    hu = phantom_hu(n).astype(np.float32)
    g = Geometry(hu.shape, (2.5, 0.7, 0.7), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT")
    return Volume(hu, g)


@pytest.fixture
def backend() -> ReferenceBackend:
    return ReferenceBackend(ModelConfig(name="reference", backend="reference"))


def test_ct_segments_are_disjoint_and_measured(backend: ReferenceBackend) -> None:
    vol = _ct()
    (r,) = backend.run([WorkItem(vol, AnalysisSpec("", (TaskKind.SEGMENT,)))], TaskKind.SEGMENT)
    masks = {m.label: m.voxels for m in r.masks}
    assert set(masks) == {"Lungs", "Bone", "Soft tissue"}
    total = sum(m.astype(int) for m in masks.values())
    assert total.max() == 1  # non-overlapping, as OHIF needs
    assert (vol.voxels[masks["Lungs"]] < LUNG_HU).all()
    assert (vol.voxels[masks["Bone"]] > BONE_HU).all()
    ml = {m.segment_number: m.value for m in r.measurements}
    voxel_ml = 2.5 * 0.7 * 0.7 / 1000
    assert ml[1] == pytest.approx(masks["Lungs"].sum() * voxel_ml, abs=0.1)
    assert all(m.unit.value == "mL" for m in r.measurements)
    assert backend.identity.non_clinical


def test_deterministic(backend: ReferenceBackend) -> None:
    a = segment_ct(_ct().voxels, 0.001)
    b = segment_ct(_ct().voxels, 0.001)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_report_states_it_is_non_clinical(backend: ReferenceBackend) -> None:
    (r,) = backend.run([WorkItem(_ct(), AnalysisSpec("", (TaskKind.REPORT,)))], TaskKind.REPORT)
    assert "no diagnostic interpretation" in r.report.impression
    assert "Body volume" in r.report.findings


def test_detect_boxes_bound_lungs(backend: ReferenceBackend) -> None:
    vol = _ct()
    (r,) = backend.run([WorkItem(vol, AnalysisSpec("", (TaskKind.DETECT,)))], TaskKind.DETECT)
    assert len(r.boxes) == 2
    lungs = segment_ct(vol.voxels, vol.geometry.voxel_volume_ml)["lungs"]
    for b in r.boxes:
        region = lungs[b.slice_index, int(b.row_min) : int(b.row_max), int(b.column_min) : int(b.column_max)]
        assert region.any()


def test_xray_foreground_and_stats(backend: ReferenceBackend) -> None:
    img = np.zeros((1, 200, 160), np.float32)
    img[0, 40:160, 30:130] = 1000
    g = Geometry(img.shape, (0, 0.2, 0.2), (1, 0, 0, 0, 1, 0), (0, 0, 0), "DX", rescaled=False)
    (r,) = backend.run([WorkItem(Volume(img, g), AnalysisSpec("", (TaskKind.SEGMENT,)))], TaskKind.SEGMENT)
    (mask,) = r.masks
    assert mask.voxels.sum() == 120 * 100
    area = [m for m in r.measurements if m.concept.meaning == "Area"]
    assert area and area[0].value == pytest.approx(120 * 100 * 0.04)


def test_refuses_what_it_cannot_do(backend: ReferenceBackend) -> None:
    vol = _ct(4)
    with pytest.raises(UnsupportedTask):
        backend.run([WorkItem(vol, AnalysisSpec("", (TaskKind.VQA,)))], TaskKind.VQA)
    mr = Volume(vol.voxels, Geometry(vol.geometry.shape, (1, 1, 1), (1, 0, 0, 0, 1, 0), (0, 0, 0), "MR"))
    with pytest.raises(UnsupportedTask, match="modality"):
        backend.run([WorkItem(mr, AnalysisSpec("", (TaskKind.SEGMENT,)))], TaskKind.SEGMENT)
    raw = Volume(
        vol.voxels,
        Geometry(vol.geometry.shape, (1, 1, 1), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT", rescaled=False),
    )
    with pytest.raises(InvalidInput, match="Hounsfield"):
        backend.run([WorkItem(raw, AnalysisSpec("", (TaskKind.SEGMENT,)))], TaskKind.SEGMENT)


def test_geometry_validation() -> None:
    with pytest.raises(ValueError, match="6 direction cosines"):
        Geometry((1, 2, 2), (1, 1, 1), (1, 0, 0), (0, 0, 0), "CT")
    with pytest.raises(ValueError, match="does not match"):
        Volume(np.zeros((2, 2, 2)), Geometry((1, 2, 2), (1, 1, 1), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT"))


def test_probability_maps_option_sends_fractional_masks() -> None:
    """options.probability_maps: uint8 probability maps whose >= 0.5 part is the binary mask, sent
    as MASK_ENCODING_FRACTIONAL_UINT8 (one byte a voxel); without it, bit-packed binary masks."""
    from inference_service.assembly import pack_mask, result_to_pb
    from inference_service.types import AnalysisResult
    from protos.radbridge.v1 import inference_pb2 as pb

    volume = _ct(8)
    item = WorkItem(volume, AnalysisSpec("", (TaskKind.SEGMENT,)))
    plain = ReferenceBackend(ModelConfig("reference", "reference"))
    soft = ReferenceBackend(ModelConfig("reference", "reference", options={"probability_maps": True}))
    (binary,) = plain.run([item], TaskKind.SEGMENT)
    (fractional,) = soft.run([item], TaskKind.SEGMENT)
    for b, f in zip(binary.masks, fractional.masks, strict=True):
        assert b.voxels.dtype == bool and f.voxels.dtype == np.uint8 and f.fractional
        assert np.any((f.voxels > 0) & (f.voxels < 255))  # fractional at the edges
        assert np.mean((f.voxels >= 128) == b.voxels) > 0.99  # the same structure
        assert len(pack_mask(f)) == f.voxels.size and len(pack_mask(b)) == (b.voxels.size + 7) // 8
    infos = result_to_pb(AnalysisResult(soft.identity, [fractional])).tasks[0].masks
    assert all(
        i.encoding == pb.MASK_ENCODING_FRACTIONAL_UINT8 and i.max_fractional_value == 255 for i in infos
    )
    assert all(i.packed_bytes == volume.voxels.size for i in infos)
    infos = result_to_pb(AnalysisResult(plain.identity, [binary])).tasks[0].masks
    assert all(i.encoding == pb.MASK_ENCODING_BINARY_PACKBITS for i in infos)
