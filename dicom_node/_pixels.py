"""A guard in front of pydicom's pixel decoders for data no decoder should be handed.

python-gdcm (pydicom's decoder for lossless JPEG, and the one it tries first for the other
JPEG processes here) does not raise on a JPEG frame whose header claims BitsAllocated 1, 32
or 64: an uncaught C++ ``gdcm::Exception`` reaches ``std::terminate`` and the whole process
aborts (SIGABRT). The node never decodes at ingest, so such an instance is stored; decoding
it later (a volume for analysis, a WADO-RS frame transcoded) would kill the node. Found by
tests/fuzz/test_fuzz_volume.py.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

#: JPEG processes (PS3.5 A.4.1): baseline, extended, lossless, lossless first-order prediction.
JPEG_PROCESSES = frozenset(
    {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
)
#: What a JPEG frame's samples may be stored in (8-bit and 12/16-bit precision).
JPEG_BITS_ALLOCATED = (8, 16)


def undecodable_reason(ds: Dataset, transfer_syntax: str) -> str | None:
    """Why ``ds``'s pixel data must not reach a decoder, or None when it may (it may still fail, by raising)."""
    bits = ds.get("BitsAllocated")
    if str(transfer_syntax) in JPEG_PROCESSES and bits not in JPEG_BITS_ALLOCATED:
        return f"JPEG pixel data with Bits Allocated {bits} cannot be decoded (8 or 16 only)."
    return None
