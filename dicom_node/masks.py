"""A returned mask kept bit-packed, as it came over gRPC: 1 bit a voxel instead of 1 byte.

A study's masks are unpacked one at a time (into the SEG's label map) or a slice at a time (key
slices, outlines), so the node never holds every segment as a full byte volume: 100 segments of a
300-slice 512x512 CT are 1 GB packed, 7.9 GB unpacked. Anything that needs the whole array gets it
through ``numpy.asarray`` (``__array__``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Set bits of every byte value (numpy < 2 has no bitwise_count).
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint32)
_BITWISE_COUNT = hasattr(np, "bitwise_count")


def _row_popcounts(rows: np.ndarray) -> np.ndarray:
    """Set bits in each row of a 2D uint8 array. numpy 2's ``bitwise_count`` on 8 bytes at a time
    (a 1000-slice 512x512 mask: ~6 ms) instead of a byte table (a uint32 per byte: ~130 ms)."""
    if not _BITWISE_COUNT:
        return _POPCOUNT[rows].sum(axis=1, dtype=np.int64)
    if rows.shape[1] % 8 == 0 and rows.flags.c_contiguous:
        rows = rows.view(np.uint64)
    return np.bitwise_count(rows).sum(axis=1, dtype=np.int64)


class PackedMask:
    """A bool volume (slices, rows, columns) held as numpy ``packbits`` bytes (C order, big bit order)."""

    def __init__(self, packed: bytes | bytearray, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.size = int(np.prod(self.shape))
        if len(packed) != (self.size + 7) // 8:
            raise ValueError(f"{len(packed)} packed bytes do not hold a {self.shape} mask.")
        self._packed = np.frombuffer(packed, dtype=np.uint8)

    dtype = np.dtype(bool)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self._packed.nbytes)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        full = np.unpackbits(self._packed, count=self.size).reshape(self.shape).view(bool)
        return full if dtype is None else full.astype(dtype, copy=False)

    def _bits(self, start: int, stop: int) -> np.ndarray:
        first, last = start // 8, (stop + 7) // 8
        bits = np.unpackbits(self._packed[first:last])
        return bits[start - 8 * first : stop - 8 * first]

    def __getitem__(self, k: int) -> np.ndarray:
        """Slice k as a bool array (only its own bits are unpacked)."""
        if not isinstance(k, int | np.integer):
            return np.asarray(self)[k]
        k = int(k) + (self.shape[0] if k < 0 else 0)
        if not 0 <= k < self.shape[0]:
            raise IndexError(f"slice {k} is outside the mask's {self.shape[0]} slices")
        per_slice = self.size // self.shape[0]
        return self._bits(k * per_slice, (k + 1) * per_slice).reshape(self.shape[1:]).view(bool)

    def packed_slices(self) -> np.ndarray | None:
        """The packed bytes as (slices, bytes per slice), a read-only view (slice k starts at byte
        k * voxels per slice / 8), or None when a slice's voxels are not a whole number of bytes.
        Lets SEG frames be cut from the packed bytes without unpacking them."""
        per_slice = self.size // self.shape[0]
        if per_slice % 8:
            return None
        return self._packed[: self.size // 8].reshape(self.shape[0], per_slice // 8)

    def slice_counts(self) -> np.ndarray:
        """Set voxels per slice, counted on the packed bytes."""
        rows = self.packed_slices()
        if rows is not None:
            return _row_popcounts(rows)
        return np.array([np.count_nonzero(self[k]) for k in range(self.shape[0])], dtype=np.int64)

    def count(self) -> int:
        return int(self.slice_counts().sum())

    def any(self) -> bool:
        return bool(self._packed.any())


class FractionalMask:
    """A probability map (slices, rows, columns) as it came over gRPC (MASK_ENCODING_FRACTIONAL_UINT8):
    one byte a voxel, 0..``max_value`` for probability 0..1.

    As a mask (``__array__``, ``__getitem__``, ``slice_counts``: outlines, key slices, areas) it is
    the voxels of probability >= 0.5; the SEG writes ``probabilities`` as a FRACTIONAL segment.
    """

    def __init__(
        self, data: bytes | bytearray | np.ndarray, shape: tuple[int, ...], max_value: int = 255
    ) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.size = int(np.prod(self.shape))
        values = (
            np.asarray(data, dtype=np.uint8)
            if isinstance(data, np.ndarray)
            else np.frombuffer(data, np.uint8)
        )
        if values.size != self.size:
            raise ValueError(f"{values.size} bytes do not hold a {self.shape} probability map.")
        if not 1 <= max_value <= 255:
            raise ValueError(f"max_fractional_value {max_value} is not in 1..255.")
        if int(values.max(initial=0)) > max_value:
            raise ValueError(f"a value is above max_fractional_value {max_value}.")
        self.max_value = int(max_value)
        self.threshold = (self.max_value + 1) // 2  # probability >= 0.5 (128 of 255)
        self.probabilities = values.reshape(self.shape)

    def fraction(self) -> np.ndarray:
        """The probabilities as float32 in 0..1."""
        return self.probabilities.astype(np.float32) / self.max_value

    dtype = np.dtype(bool)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.probabilities.nbytes)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        full = self.probabilities >= self.threshold
        return full if dtype is None else full.astype(dtype, copy=False)

    def __getitem__(self, k: int) -> np.ndarray:
        if not isinstance(k, int | np.integer):
            return np.asarray(self)[k]
        return self.probabilities[int(k)] >= self.threshold

    def slice_counts(self) -> np.ndarray:
        return np.count_nonzero((self.probabilities >= self.threshold).reshape(self.shape[0], -1), axis=1)

    def count(self) -> int:
        return int(self.slice_counts().sum())

    def any(self) -> bool:
        return bool((self.probabilities >= self.threshold).any())
