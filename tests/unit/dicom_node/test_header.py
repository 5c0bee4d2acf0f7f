"""The header read from a received data set's first bytes (dicom_node.header) against pydicom's.

Every case is compared with what ingest computed before: ``identifiers`` and
``searchable_attributes`` of ``dcmread(stop_before_pixels=True)``. A case the lean walk cannot
answer must say so (None: the node reads the file), never answer differently.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicom_node.attributes import searchable_attributes
from dicom_node.header import read_header

#: pydicom's bundled files: explicit/implicit VR, compressed, sequences of undefined length,
#: private and UN sequences, character sets, empty numbers.
BUNDLED = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm", "MR_small_RLE.dcm",
    "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtplan.dcm", "rtdose.dcm", "test-SR.dcm",
    "nested_priv_SQ.dcm", "priv_SQ.dcm", "UN_sequence.dcm", "empty_charset_LEI.dcm", "reportsi.dcm",
    "reportsi_with_empty_number_tags.dcm", "liver_1frame.dcm", "waveform_ecg.dcm", "examples_palette.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm",
]


def _data_set_bytes(path: Path) -> tuple[bytes, str]:
    """The data set as a C-STORE carries it (no File Meta), and its transfer syntax."""
    syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    raw = Path(path).read_bytes()
    return raw[_end_of_meta(raw) :], syntax


def _end_of_meta(raw: bytes) -> int:
    offset = 132
    while raw[offset : offset + 2] == b"\x02\x00":
        vr = raw[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            offset += 12 + int.from_bytes(raw[offset + 8 : offset + 12], "little")
        else:
            offset += 8 + int.from_bytes(raw[offset + 6 : offset + 8], "little")
    return offset


def _expected(path: Path) -> tuple[dict[str, str], dict]:
    ds = dcmread(path, stop_before_pixels=True)
    ids = {k: str(ds.get(k, "") or "") for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")}
    return ids, searchable_attributes(ds)


def _check(path: Path) -> bool:
    """True if the lean read answered (and matched), False if it declined."""
    data, syntax = _data_set_bytes(path)
    got = read_header(data, syntax)
    if got is None:
        return False
    ids, doc = got
    want_ids, want_doc = _expected(path)
    assert ids == want_ids, path.name
    assert doc == want_doc, path.name
    assert list(doc) == list(want_doc), path.name  # same order: same JSON text in the index
    return True


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files_read_as_pydicom_reads_them(name: str) -> None:
    answered = _check(Path(get_testdata_file(name)))
    if name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):
        assert not answered  # big endian, deflated: the file is read as before


def _synthetic(tmp_path: Path, syntax: str, **values: object) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    item = Dataset()
    item.CodeValue = "X"
    ds.ProcedureCodeSequence = Sequence([item])
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    "values",
    [
        {"PatientName": "Doe^John", "PatientID": "P1", "StudyDate": "20240102", "InstanceNumber": "7"},
        {"PatientName": "Doe^John=ドウ^ジョン", "SpecificCharacterSet": ["", "ISO 2022 IR 87"]},
        {"PatientName": "Müller^Jörg", "SpecificCharacterSet": "ISO_IR 192", "StudyDescription": "Thorax café"},
        {"PatientName": "A^B\\C^D", "AccessionNumber": " 12 ", "SeriesNumber": " 3", "InstanceNumber": ""},
        {"StudyDescription": "", "PatientSex": "", "Rows": 512, "Columns": 512, "NumberOfFrames": "2"},
        {"ReferringPhysicianName": "", "StudyID": "A\\\\B", "BodyPartExamined": "CHEST "},
        {"InstanceNumber": " 5 ", "SeriesNumber": "+4", "Modality": "CT\\MR"},
    ],
)
def test_synthetic_headers_read_as_pydicom_reads_them(tmp_path: Path, syntax: str, values: dict) -> None:
    """Several values, padding, empty values, non-ASCII and ISO 2022 text: answered or declined,
    never different; plain ASCII headers (the common case) must be answered."""
    answered = _check(_synthetic(tmp_path, syntax, **values))
    if "SpecificCharacterSet" not in values and "Modality" not in values:  # an identifier with
        assert answered  # several values is left to pydicom


def test_a_header_longer_than_the_bytes_held_is_declined(tmp_path: Path) -> None:
    path = _synthetic(tmp_path, ExplicitVRLittleEndian, PatientName="Doe^John", Rows=512)
    data, syntax = _data_set_bytes(path)
    assert read_header(data[: len(data) // 2], syntax) is None
    assert read_header(data, syntax) is not None


def test_the_walk_stops_before_the_pixel_data(tmp_path: Path) -> None:
    """Only the header is walked: bytes after the last wanted tag may be anything."""
    path = _synthetic(tmp_path, ExplicitVRLittleEndian, Rows=4, Columns=4, BitsAllocated=16)
    data, syntax = _data_set_bytes(path)
    pixels = b"\xe0\x7f\x10\x00OW\x00\x00" + (32).to_bytes(4, "little")  # (7FE0,0010) header, no value
    got = read_header(data + pixels, syntax)
    assert got is not None and got[1]["00280010"] == {"vr": "US", "Value": [4]}


def test_a_plain_ct_header_needs_no_pydicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The common case (ASCII, padded UIDs, the synthetic CT every bench sends) is decoded here."""
    import dicom_node.header as header
    from radbridge.synth import ct_series, write_series

    def refuse(*args: object) -> None:
        raise AssertionError("pydicom fallback used")

    monkeypatch.setattr(header, "_pydicom_json", refuse)
    (path,) = write_series(ct_series(n_slices=1), tmp_path)
    assert _check(path)
