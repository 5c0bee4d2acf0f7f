"""PackedMask: a returned mask kept at 1 bit a voxel, unpacked whole or a slice at a time."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node import masks
from dicom_node.masks import PackedMask


# Slices of whole 8-byte words, of whole bytes, of bits.
@pytest.mark.parametrize("shape", [(6, 16, 16), (4, 4, 6), (5, 7, 9), (1, 3, 3)])
@pytest.mark.parametrize("bitwise_count", [True, False])  # numpy 2, numpy 1.26 (byte table)
def test_packed_mask_reads_back_exactly(
    shape: tuple[int, int, int], bitwise_count: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(masks, "_BITWISE_COUNT", bitwise_count and masks._BITWISE_COUNT)
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
    rows = packed.packed_slices()
    if shape[1] * shape[2] % 8:  # a slice's bits do not start on a byte
        assert rows is None
    else:
        assert rows is not None and rows.shape == (shape[0], shape[1] * shape[2] // 8)
        for k in range(shape[0]):
            np.testing.assert_array_equal(np.unpackbits(rows[k]).reshape(shape[1:]).view(bool), mask[k])


def test_packed_mask_refuses_bytes_of_another_shape() -> None:
    with pytest.raises(ValueError, match="do not hold"):
        PackedMask(b"\x00" * 3, (2, 4, 4))
    with pytest.raises(IndexError):
        PackedMask(b"\x00" * 4, (2, 4, 4))[2]


# -- probability maps (MASK_ENCODING_FRACTIONAL_UINT8) ------------------------------------------
def test_fractional_mask_is_its_voxels_of_probability_at_least_half() -> None:
    from dicom_node.masks import FractionalMask

    values = np.array([[[0, 127, 128], [255, 10, 200]], [[0, 0, 0], [0, 0, 128]]], dtype=np.uint8)
    mask = FractionalMask(values.tobytes(), values.shape)
    assert np.array_equal(np.asarray(mask), values >= 128) and np.asarray(mask).dtype == bool
    assert np.array_equal(mask[0], values[0] >= 128)
    assert mask.slice_counts().tolist() == [3, 1] and mask.count() == 4 and mask.any()
    assert mask.fraction()[0, 1, 0] == 1.0 and mask.fraction().dtype == np.float32
    half = FractionalMask(np.array([0, 1, 2], np.uint8), (1, 1, 3), max_value=2)
    assert np.asarray(half).tolist() == [[[False, True, True]]]  # 1 of 2 is probability 0.5


@pytest.mark.parametrize(
    ("data", "max_value", "message"),
    [
        (b"\x00" * 5, 255, "do not hold"),
        (b"\x00\x03", 2, "above max_fractional_value"),
        (b"\x00\x00", 0, "1..255"),
    ],
)
def test_fractional_mask_refuses_bad_input(data: bytes, max_value: int, message: str) -> None:
    from dicom_node.masks import FractionalMask

    with pytest.raises(ValueError, match=message):
        FractionalMask(data, (1, 1, 2), max_value)


def _result_with_mask(**info: object):  # noqa: ANN202
    from protos.radbridge.v1 import inference_pb2 as pb

    return pb.AnalysisResult(tasks=[pb.TaskResult(masks=[pb.MaskInfo(segment_number=1, **info)])])


def test_unpack_masks_by_encoding() -> None:
    from dicom_node.client import unpack_masks
    from dicom_node.masks import FractionalMask, PackedMask
    from protos.radbridge.v1 import inference_pb2 as pb

    shape = (1, 2, 4)
    packed = np.packbits(np.ones(shape, bool)).tobytes()
    for encoding in (
        pb.MASK_ENCODING_UNSPECIFIED,
        pb.MASK_ENCODING_BINARY_PACKBITS,
    ):  # old services: unspecified
        masks = unpack_masks(
            _result_with_mask(packed_bytes=1, encoding=encoding), {1: bytearray(packed)}, shape
        )
        assert isinstance(masks[1], PackedMask) and np.asarray(masks[1]).all()
    probabilities = bytearray(range(0, 256, 32))
    result = _result_with_mask(
        packed_bytes=8, encoding=pb.MASK_ENCODING_FRACTIONAL_UINT8, max_fractional_value=255
    )
    masks = unpack_masks(result, {1: probabilities}, shape)
    assert isinstance(masks[1], FractionalMask) and masks[1].probabilities.ravel().tolist() == list(
        probabilities
    )


def test_unpack_masks_refuses_an_unknown_encoding_or_a_bad_value() -> None:
    from dicom_node.client import unpack_masks
    from dicom_node.errors import InferenceRejected
    from protos.radbridge.v1 import inference_pb2 as pb

    with pytest.raises(InferenceRejected, match="encoding 7 is unknown"):
        unpack_masks(_result_with_mask(packed_bytes=1, encoding=7), {1: bytearray(b"\xff")}, (1, 1, 8))
    result = _result_with_mask(
        packed_bytes=2, encoding=pb.MASK_ENCODING_FRACTIONAL_UINT8, max_fractional_value=100
    )
    with pytest.raises(InferenceRejected, match="above max_fractional_value"):
        unpack_masks(result, {1: bytearray(b"\x00\xc8")}, (1, 1, 2))
