"""PackedMask: a returned mask kept at 1 bit a voxel, unpacked whole or a slice at a time."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.masks import PackedMask


@pytest.mark.parametrize("shape", [(6, 16, 16), (5, 7, 9), (1, 3, 3)])  # byte-aligned slices or not
def test_packed_mask_reads_back_exactly(shape: tuple[int, int, int]) -> None:
    mask = np.random.default_rng(sum(shape)).random(shape) < 0.3
    packed = PackedMask(np.packbits(mask).tobytes(), shape)
    np.testing.assert_array_equal(np.asarray(packed), mask)
    assert np.asarray(packed).dtype == bool and packed.shape == shape and packed.ndim == 3
    for k in range(shape[0]):
        np.testing.assert_array_equal(packed[k], mask[k])
    np.testing.assert_array_equal(packed[-1], mask[-1])
    np.testing.assert_array_equal(packed.slice_counts(), np.count_nonzero(mask, axis=(1, 2)))
    assert packed.count() == np.count_nonzero(mask) and packed.any() == mask.any()
    assert packed.nbytes == (mask.size + 7) // 8  # an eighth of the bool volume
    np.testing.assert_array_equal(np.stack([packed, packed], axis=-1)[..., 1], mask)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(packed, dtype=bool)), np.flatnonzero(mask))


def test_packed_mask_refuses_bytes_of_another_shape() -> None:
    with pytest.raises(ValueError, match="do not hold"):
        PackedMask(b"\x00" * 3, (2, 4, 4))
    with pytest.raises(IndexError):
        PackedMask(b"\x00" * 4, (2, 4, 4))[2]
