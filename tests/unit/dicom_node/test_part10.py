"""The File Meta group the SCP writes is pynetdicom's, byte for byte."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.part10 import file_preamble


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even and odd lengths
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.88.22", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.50"),  # 64 chars
    ],
)
def test_file_preamble_matches_pynetdicom(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(transfer_syntax)
    )
    assert file_preamble(sop_class, sop_instance, transfer_syntax) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


def test_file_preamble_reads_back() -> None:
    ds = pydicom.dcmread(BytesIO(file_preamble("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.FileMetaInformationVersion == b"\x00\x01"
