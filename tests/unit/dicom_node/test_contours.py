"""Mask outlines: closed, on the pixel edges, the right area, a bounded number of vertices."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicom_node._contours import largest_component, major_components, outline, polygon_area


def _vertices_touch_mask(points: np.ndarray, mask: np.ndarray) -> bool:
    """Every vertex (a pixel corner) is a corner of at least one mask pixel."""
    padded = np.pad(mask, 1)  # padded[y : y + 2, x : x + 2] = pixels (y-1..y, x-1..x)
    return all(padded[y : y + 2, x : x + 2].any() for x, y in points.astype(int))


def test_one_pixel_is_its_unit_square() -> None:
    mask = np.zeros((5, 6), dtype=bool)
    mask[2, 3] = True
    np.testing.assert_array_equal(outline(mask), [[3, 2], [4, 2], [4, 3], [3, 3], [3, 2]])


def test_an_l_shape_is_exact_and_closed() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:6, 2:4] = True
    mask[4:6, 4:7] = True
    points = outline(mask)
    np.testing.assert_array_equal(points[0], points[-1])
    assert len(points) == 7  # six corners, closed
    assert polygon_area(points) == mask.sum()
    assert _vertices_touch_mask(points, mask)


def test_largest_component_only_and_holes_filled() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:30, 5:30] = True
    mask[10:20, 10:20] = False  # a hole
    mask[33:38, 33:38] = True  # a smaller component
    points = outline(mask)
    assert polygon_area(points) == 25 * 25
    assert points[:, 0].max() == 30 and points[:, 1].max() == 30
    assert largest_component(mask).sum() == 25 * 25 - 100


def test_diagonal_touch_is_one_simple_cycle() -> None:
    # Pixels touching only at a corner are not 4-connected: the largest piece is outlined.
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    mask[3, 3] = True
    assert polygon_area(outline(mask)) == 4
    # A 4-connected U whose tips touch diagonally: the pinch is closed by filling the hole.
    u = np.zeros((7, 7), dtype=bool)
    u[1:6, 1] = u[5, 1:6] = u[1:6, 5] = True
    u[1, 2] = u[2, 4] = True  # (1,2) and (2,3) would touch diagonally if (2,3) were set
    u[2, 3] = True
    points = outline(u)
    assert polygon_area(points) == ndimage.binary_fill_holes(u).sum()
    assert len({tuple(p) for p in points[:-1]}) == len(points) - 1  # no repeated vertex


def test_large_smooth_mask_is_simplified_within_bounds() -> None:
    yy, xx = np.mgrid[:1200, :1000]
    mask = ((yy - 600) / 500) ** 2 + ((xx - 480) / 420) ** 2 < 1
    points = outline(mask, max_points=200)
    assert len(points) <= 201
    assert polygon_area(points) == pytest.approx(mask.sum(), rel=0.01)
    assert _vertices_touch_mask(points, mask)


def test_noisy_mask_stays_bounded() -> None:
    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((600, 600)) > 0.3)
    for limit in (200, 50, 8):
        points = outline(mask, max_points=limit)
        assert len(points) <= limit + 1
        np.testing.assert_array_equal(points[0], points[-1])
        assert _vertices_touch_mask(points, mask)


def test_empty_or_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError):
        outline(np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError):
        outline(np.ones((2, 4, 4), dtype=bool))


def test_major_components_keep_both_lungs_and_drop_specks() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:35, 5:25] = True  # 600 px
    mask[5:33, 35:55] = True  # 560 px: the other lung
    mask[37:39, 28:30] = True  # 4 px speck
    parts = major_components(mask)
    assert [int(p.sum()) for p in parts] == [600, 560]
    assert major_components(np.zeros((4, 4), dtype=bool)) == []
    assert len(major_components(mask, min_fraction=0.0, limit=2)) == 2
