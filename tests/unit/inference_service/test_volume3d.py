from __future__ import annotations

import numpy as np
import pytest

from inference_service.errors import InvalidInput
from inference_service.types import Geometry, Volume
from inference_service.volume3d import orientation_plan, prepare_ct, stack

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # columns -> L, rows -> P, slices -> S
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # columns -> L, rows -> I, slices (normal L x I) -> P


def _ct(shape: tuple[int, int, int]) -> np.ndarray:
    return np.full(shape, -1000.0, dtype=np.float32)


def _volume(vox: np.ndarray, orientation: tuple[float, ...] = AXIAL) -> Volume:
    return Volume(vox, Geometry(vox.shape, (2.0, 0.7, 0.7), orientation, (0, 0, 0), "CT"))


def test_axial_plan_reverses_slices_to_head_first() -> None:
    perm, flips = orientation_plan(_volume(_ct((4, 5, 6))).geometry, "IPL")
    assert perm == (0, 1, 2) and flips == (True, False, False)


def test_coronal_plan_picks_rows_as_depth() -> None:
    perm, flips = orientation_plan(_volume(_ct((4, 5, 6)), CORONAL).geometry, "IPL")
    # depth (I) is the source row axis, height (P) the slice axis, both already pointing the model's way.
    assert perm == (1, 0, 2) and flips == (False, False, False)


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL])
def test_marker_and_mask_map_back_to_source(orientation: tuple[float, ...]) -> None:
    vox = _ct((40, 60, 50))
    vox[5:35, 8:52, 6:44] = 40.0  # the "patient": the foreground crop box
    vox[20:24, 30:34, 10:14] = 1000.0  # a bright marker
    prep = prepare_ct(_volume(vox, orientation), size=(16, 32, 32))
    assert prep.array.shape == (16, 32, 32) and prep.array.dtype == np.float32
    assert prep.array.min() >= 0.0 and prep.array.max() <= 1.0
    peak = np.unravel_index(np.argmax(prep.array), prep.array.shape)
    back = prep.to_source(peak)
    assert 19 <= back[0] <= 24 and 29 <= back[1] <= 34 and 9 <= back[2] <= 14
    # A model-space mask of the marker lands on the marker in source space.
    mask = prep.mask_to_source(prep.array > 0.9)
    assert mask.shape == vox.shape
    hits = np.argwhere(mask)
    assert len(hits) and hits.min(0).tolist() >= [18, 28, 8] and hits.max(0).tolist() <= [25, 35, 15]
    # Nothing outside the crop: the air border maps back empty.
    assert not mask[:5].any() and not mask[35:].any()


def test_crop_and_minmax_recorded() -> None:
    vox = _ct((10, 20, 20))
    vox[2:8, 4:16, 3:17] = 100.0
    vox[5, 10, 10] = 300.0
    prep = prepare_ct(_volume(vox), size=(6, 12, 14))
    assert prep.crop == ((2, 8), (4, 16), (3, 17))
    assert prep.intensity_range == (100.0, 300.0)
    assert prep.spacing_mm == pytest.approx((2.0, 0.7, 0.7))


def test_window_and_no_crop() -> None:
    vox = _ct((4, 8, 8))
    prep = prepare_ct(_volume(vox), size=(4, 8, 8), foreground_hu=None, hu_window=(-1000.0, 1000.0))
    assert prep.crop == ((0, 4), (0, 8), (0, 8))
    assert np.allclose(prep.array, 0.0)
    assert stack([prep, prep]).shape == (2, 1, 4, 8, 8)


def test_refuses_non_ct() -> None:
    vox = np.zeros((4, 8, 8), np.float32)
    vol = Volume(vox, Geometry(vox.shape, (1, 1, 1), AXIAL, (0, 0, 0), "MR"))
    with pytest.raises(InvalidInput, match="CT volume in Hounsfield units"):
        prepare_ct(vol)
    with pytest.raises(ValueError, match="three of L/R/P/A/S/I"):
        prepare_ct(_volume(vox), axes="XYZ")
