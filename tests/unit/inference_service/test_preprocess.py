from __future__ import annotations

import numpy as np
import pytest

from inference_service.preprocess import CT_WINDOWS, SquareFit, ct_rgb, sample_slices, to_rgb, voi, window


@pytest.mark.parametrize(
    ("rows", "cols", "size"), [(300, 200, 896), (1955, 1841, 448), (64, 64, 64), (100, 250, 224)]
)
def test_square_fit_round_trips_points(rows: int, cols: int, size: int) -> None:
    fit = SquareFit(rows, cols, size)
    for r, c in [(0, 0), (rows / 2, cols / 3), (rows, cols)]:
        y, x = (r + fit.pad_top) * fit.scale, (c + fit.pad_left) * fit.scale
        assert fit.to_source(y, x) == pytest.approx((r, c), abs=1e-6)


def test_square_fit_pads_with_zeros_centred() -> None:
    fit = SquareFit(4, 2, 4)
    out = fit.apply(np.full((4, 2), 255, np.uint8))
    assert out.shape == (4, 4)
    assert (out[:, 1:3] == 255).all() and (out[:, 0] == 0).all() and (out[:, 3] == 0).all()


def test_mask_to_source_inverts_apply() -> None:
    fit = SquareFit(30, 20, 60)
    src = np.zeros((30, 20), bool)
    src[5:15, 4:12] = True
    model_space = fit.apply(src.astype(np.uint8) * 255) > 127
    np.testing.assert_array_equal(fit.mask_to_source(model_space), src)


def test_box_from_normalized_1000_and_1024() -> None:
    fit = SquareFit(200, 100, 50)  # side 200, pad_left 50
    assert fit.box_from_normalized(0, 250, 500, 750, 1000) == pytest.approx((0, 0, 100, 100))
    assert fit.box_from_normalized(512, 512, 1023, 1023, 1024) == pytest.approx(
        (100, 50, 199.8, 100), abs=0.01
    )  # clamped to the image


def test_ct_windows_pack_three_channels() -> None:
    hu = np.array([[-1024, 0, 40, 80, 1000]], np.float32)
    rgb = ct_rgb(hu)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    for ch, (lo, hi) in enumerate(CT_WINDOWS):
        np.testing.assert_array_equal(rgb[..., ch], (window(hu, lo, hi) * 255).round().astype(np.uint8))
    assert rgb[0, 3, 2] == 255 and rgb[0, 1, 2] == 0  # brain window 0..80


def test_sampling_and_voi() -> None:
    assert sample_slices(10) == list(range(10))
    picks = sample_slices(300)
    assert len(picks) == 85 and picks[0] == 0 and picks[-1] == 299 and picks == sorted(set(picks))
    assert voi(np.array([0.0, 50.0, 100.0]), (50.0, 100.0)).tolist() == [0.0, 0.5, 1.0]


def test_presets() -> None:
    hu = np.linspace(-1000, 1000, 100, dtype=np.float32).reshape(10, 10)
    assert not np.array_equal(
        to_rgb(hu, "CT", True, None)[..., 0], to_rgb(hu, "CT", True, None)[..., 1]
    )  # auto: ct3
    grey = to_rgb(hu, "CT", True, (40.0, 400.0), "window")
    assert np.array_equal(grey[..., 0], grey[..., 2])
    assert grey.max() == 255 and grey.min() == 0
    assert np.array_equal(
        to_rgb(hu, "CR", False, (0.0, 1.0), "minmax"), to_rgb(hu, "CR", False, None, "window")
    )
    with pytest.raises(ValueError, match="Hounsfield"):
        to_rgb(hu, "CR", False, None, "ct3")
    with pytest.raises(ValueError, match="Unknown preprocess preset"):
        to_rgb(hu, "CT", True, None, "sharpen")
