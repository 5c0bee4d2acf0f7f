from __future__ import annotations

from dicom_node.errors import InvalidInstance, StorageError, UndecodableInstance, to_dimse_status


def test_statuses_come_from_one_table() -> None:
    assert to_dimse_status(StorageError("disk full")).Status == 0xA700
    assert to_dimse_status(UndecodableInstance("x")).Status == 0xC210
    assert to_dimse_status(InvalidInstance("x")).Status == 0xC000
    unexpected = to_dimse_status(RuntimeError("secret detail"))
    assert unexpected.Status == 0xA700  # never 0x0000; sender may retry
    assert "secret" not in unexpected.ErrorComment


def test_error_comment_fits_lo() -> None:
    assert len(to_dimse_status(InvalidInstance("x" * 200)).ErrorComment) == 64
