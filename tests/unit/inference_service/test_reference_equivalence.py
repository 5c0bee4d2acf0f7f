"""The optimised reference CT engine against an obvious oracle: the same masks, voxel for voxel.

The engine works inside bounding boxes, compares integers as integers, counts components from
their boxes and fills holes a slab at a time. The oracle below does the textbook thing on the
whole volume (float thresholds, one 3-D label, np.bincount, scipy's binary_fill_holes slice by
slice), slowly; it is kept here so that a speed-up cannot change what the engine finds.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.reference import (
    _FEW,
    BODY_HU,
    BONE_HU,
    LUNG_HU,
    MIN_LUNG_ML,
    ReferenceBackend,
    _component_sizes,
    _label,
    _majority,
    segment_ct,
)
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from radbridge.synth import phantom_hu


def oracle_segment_ct(hu: np.ndarray, voxel_ml: float) -> dict[str, np.ndarray]:
    """The documented algorithm, written plainly on the whole volume."""
    hu = hu.astype(np.float64)
    candidates = hu > BODY_HU
    labels, n = ndimage.label(candidates)
    if n:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        body = labels == sizes.argmax()
    else:
        body = candidates
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    lungs = body & (hu < LUNG_HU)
    labels, n = ndimage.label(lungs)
    if n:
        sizes = np.bincount(labels.ravel())
        min_voxels = MIN_LUNG_ML / voxel_ml if voxel_ml > 0 else 1000
        lungs = np.isin(labels, np.flatnonzero(sizes >= min_voxels)) & (labels > 0)
    bone = body & (hu > BONE_HU)
    soft = body & ~lungs & ~bone
    return {"body": body, "lungs": lungs, "bone": bone, "soft": soft}


def _blobs(seed: int, shape: tuple[int, int, int] = (14, 60, 72)) -> np.ndarray:
    """Smoothed noise mapped onto HU, int16: many components of every class, with holes, small
    lung pockets on either side of the size threshold, and components touching the volume's
    faces (odd seeds) or an air margin around everything (even seeds, so the boxes are inside)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.0, 2.5, 2.5))
    field = (field - field.mean()) / field.std()
    hu = np.clip(np.rint(field * 600 - 750), -1024, 3071).astype(np.int16)
    return hu if seed % 2 else np.pad(hu, ((2, 1), (5, 3), (7, 4)), constant_values=-1000)


def _assert_same(hu: np.ndarray, voxel_ml: float) -> dict[str, np.ndarray]:
    expected = oracle_segment_ct(hu, voxel_ml)
    got = segment_ct(hu, voxel_ml)
    assert set(got) == set(expected)
    for key, mask in expected.items():
        assert got[key].dtype == bool and got[key].shape == hu.shape
        diff = np.count_nonzero(got[key] != mask)
        assert diff == 0, f"{key}: {diff} voxels differ from the oracle"
    return expected


@pytest.mark.parametrize("seed", range(6))
def test_matches_oracle_on_random_blobs(seed: int) -> None:
    hu = _blobs(seed)
    expected = _assert_same(hu, voxel_ml=0.2)  # 25 voxels make 5 mL: some pockets kept, some dropped
    assert expected["lungs"].any() and expected["bone"].any() and expected["soft"].any()
    labels, n = ndimage.label(hu > BODY_HU)
    assert n > 1  # the largest-component choice is exercised (both ways: seed 1 has few components)
    assert (n <= _FEW) == (seed == 1)
    assert (expected["body"] & ~(labels > 0)).any()  # and hole filling changed something
    assert (expected["body"] & (hu < LUNG_HU) & ~expected["lungs"]).any()  # small pockets dropped


def test_matches_oracle_on_the_phantom_in_float_and_int() -> None:
    hu = phantom_hu(10)
    expected = _assert_same(hu, 2.5 * 0.7 * 0.7 / 1000)
    _assert_same(hu.astype(np.float32), 2.5 * 0.7 * 0.7 / 1000)
    assert all(m.any() for m in expected.values())


def test_matches_oracle_on_edge_cases() -> None:
    air = np.full((3, 20, 24), -1000, np.int16)
    assert not any(m.any() for m in _assert_same(air, 0.001).values())
    tie = air.copy()
    tie[:, 2:6, 2:6] = 40
    tie[:, 12:16, 14:18] = 40  # the same size: the first in scan order wins, as in scipy
    tie[1, 13, 15] = -900  # a one-voxel hole, below the lung size threshold
    expected = _assert_same(tie, 0.001)
    assert expected["body"][:, 2:6, 2:6].all() and not expected["body"][:, 12:16, 14:18].any()
    late = air.copy()
    late[0, 0:2, 0:2] = 300  # a small component first in scan order, then the larger body
    late[:, 8:18, 6:20] = 40
    expected = _assert_same(late, 0.001)
    assert not expected["body"][0, 0:2, 0:2].any() and expected["body"][:, 8:18, 6:20].all()
    rim = air.copy()
    rim[:, :, :] = 40  # a body filling the whole field: its box is the volume
    rim[:, 5:15, 0:10] = -800  # an air pocket open to the slice edge: not a hole
    rim[:, 5:15, 12:20] = -800  # a closed one: filled, and a lung
    expected = _assert_same(rim, 0.1)
    assert not expected["body"][:, 5:15, 0:10].any() and expected["lungs"][:, 5:15, 12:20].all()
    _assert_same(rim, 0.0)  # unknown spacing: 1000 voxels make a lung


@pytest.mark.parametrize("count", [3, 12])
def test_matches_oracle_when_no_component_has_a_majority(count: int) -> None:
    """Blocks of 54 voxels and one of 72 (neither first nor last in scan order): the largest holds
    less than half of the voxels, so each component is counted (a few: one by one over the labels;
    more than _FEW: inside find_objects' boxes)."""
    hu = np.full((3, 8, 6 * count + 2), -1000, np.int16)
    for i in range(count):
        width = 4 if i == count // 2 else 3
        hu[:, 1:7, 6 * i + 1 : 6 * i + 1 + width] = 40
    hu[1, 3, 6 * (count // 2) + 2] = -900  # a hole in the largest: filled, too small for a lung
    labels, n = _label(hu > BODY_HU)
    assert n == count and _majority(labels, n) is None and (n > _FEW) == (count > _FEW)
    expected = _assert_same(hu, 0.001)
    assert np.count_nonzero(expected["body"]) == 72


def test_component_sizes_match_bincount_including_interleaved_boxes() -> None:
    rng = np.random.default_rng(3)
    labels, n = _label(ndimage.gaussian_filter(rng.normal(size=(10, 50, 50)), 1.5) > 0.2)
    expected = np.bincount(labels.ravel(), minlength=n + 1)
    expected[0] = 0
    assert n > _FEW
    assert np.array_equal(_component_sizes(labels, n), expected)  # counted in find_objects' boxes
    few = np.where(labels <= 3, labels, 0).astype(labels.dtype)
    assert np.array_equal(_component_sizes(few, 3), expected[:4])  # each counted over the volume
    combs = np.zeros((1, 40, 40), bool)  # two interleaved combs: each one's box is the whole slice
    combs[0, 0, :] = True
    combs[0, :38, 0::4] = True
    combs[0, 39, :] = True
    combs[0, 2:, 2::4] = True
    labels, n = _label(combs)
    sizes = _component_sizes(labels, n, ndimage.find_objects(labels))  # the bincount fallback
    assert n == 2 and sizes.tolist() == [0, *np.bincount(labels.ravel())[1:].tolist()]


def test_backend_results_match_oracle() -> None:
    """Masks, volumes and the detection slice as the backend returns them, against the oracle."""
    hu = phantom_hu(12)
    g = Geometry(hu.shape, (2.5, 0.7, 0.7), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT")
    volume = Volume(hu, g)
    expected = oracle_segment_ct(hu, g.voxel_volume_ml)
    backend = ReferenceBackend(ModelConfig("reference", "reference"))
    spec = AnalysisSpec("", (TaskKind.SEGMENT, TaskKind.DETECT, TaskKind.REPORT))
    (seg,) = backend.run([WorkItem(volume, spec)], TaskKind.SEGMENT)
    (det,) = backend.run([WorkItem(volume, spec)], TaskKind.DETECT)
    (rep,) = backend.run([WorkItem(volume, spec)], TaskKind.REPORT)
    keys = {1: "lungs", 2: "bone", 3: "soft"}
    for mask in seg.masks:
        assert np.array_equal(mask.voxels, expected[keys[mask.segment_number]])
    for m in seg.measurements:
        assert m.value == round(float(expected[keys[m.segment_number]].sum()) * g.voxel_volume_ml, 1)
    k = int(np.count_nonzero(expected["lungs"], axis=(1, 2)).argmax())
    assert det.boxes and all(b.slice_index == k for b in det.boxes)
    comps, n = ndimage.label(expected["lungs"][k])
    boxes = sorted((b.row_min, b.column_min, b.row_max, b.column_max) for b in det.boxes)
    assert n == len(boxes) == 2
    for sl in ndimage.find_objects(comps):
        assert (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) in boxes
    assert f"Body volume {expected['body'].sum() * g.voxel_volume_ml:.0f} mL" in rep.report.findings
