"""Values a result copies from its source: valid ones kept, unambiguous repairs made, others emptied."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.source_values import conform_source, conform_sources, conform_value, ds_float
from dicom_node.volume import read_series
from radbridge.synth import ct_series, write_series
from tests.dicom_fixtures import CONFORMED, MALFORMED, MALFORMED_WARNINGS, set_raw

pytestmark = pytest.mark.filterwarnings(*MALFORMED_WARNINGS)


@pytest.mark.parametrize(
    ("vr", "text", "expected"),
    [
        ("DA", "19410923", "19410923"),
        ("DA", " 19410923 ", "19410923"),
        ("DA", "1941.09.23", "19410923"),  # ACR-NEMA's form
        ("DA", "1941-09-23", "19410923"),
        ("DA", "1941/09/23", "19410923"),
        ("DA", "20240230", ""),  # no such day
        ("DA", "1941.02.30", ""),
        ("DA", "1941", ""),
        ("DA", "23.09.1941", ""),  # day first: which field is which is a guess
        ("DA", "yesterday", ""),
        ("TM", "102030", "102030"),
        ("TM", "102030.123456", "102030.123456"),
        ("TM", "10", "10"),
        ("TM", "235960", "235960"),  # a leap second
        ("TM", "10:20:30", "102030"),
        ("TM", "10:20:30.5", "102030.5"),
        ("TM", "10:20", "1020"),
        ("TM", "25:61:00", ""),
        ("TM", "246000", ""),
        ("TM", "10.20.30", ""),
        ("DT", "20240102102030.5+0100", "20240102102030.5+0100"),
        ("DT", "2024", "2024"),
        ("DT", "20241302", ""),
        ("DT", "2024-01-02T10:20", ""),
        ("AS", "045Y", "045Y"),
        ("AS", "45Y", "045Y"),
        ("AS", "3 m", "003M"),
        ("AS", "45 years", ""),
        ("AS", "1234Y", ""),
        ("DS", "72.5", "72.5"),
        ("DS", "-1.5e3", "-1.5e3"),
        ("DS", "72kg", ""),
        ("DS", "1e400", ""),  # not finite
        ("DS", "12345678901234567", ""),  # over 16 characters
        ("DS", "0,7", "0.7"),  # a decimal comma: "\\" separates values, so it can only be a point
        ("DS", "-125,5", "-125.5"),
        ("DS", "1,5e2", "1.5e2"),
        ("DS", "1,2,3", ""),
        ("DS", ",5", ""),
        ("IS", "3", "3"),
        ("IS", "3.0", ""),
        ("IS", "99999999999", ""),
        ("LO", "kept as it is", "kept as it is"),
    ],
)
def test_values_are_kept_repaired_or_emptied(vr: str, text: str, expected: str) -> None:
    assert conform_value(vr, text) == expected


@pytest.fixture
def malformed(tmp_path: Path) -> Dataset:
    path = write_series(ct_series(n_slices=1), tmp_path)[0]
    ds = pydicom.dcmread(path)
    for keyword, text in MALFORMED.items():
        set_raw(ds, keyword, text)
    set_raw(ds, "SeriesDate", "20240230")  # not a Patient or Study value: not the results' to copy
    set_raw(ds, "PatientName", "Doe^" + "J" * 70)  # too long for PN: kept, the archive matches on it
    ds.save_as(tmp_path / "malformed.dcm", enforce_file_format=True)
    return pydicom.dcmread(tmp_path / "malformed.dcm", stop_before_pixels=True)


def test_a_valid_source_is_given_back_as_it_is(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_series(ct_series(n_slices=1), tmp_path)[0], stop_before_pixels=True)
    assert conform_source(ds) == (ds, [])


def test_a_malformed_source_gives_a_repaired_copy_and_stays_as_it_was(malformed: Dataset) -> None:
    before = {kw: malformed.get_item(kw).value for kw in MALFORMED}
    fixed, keywords = conform_source(malformed)
    assert fixed is not malformed and keywords == sorted(MALFORMED)
    for keyword, value in CONFORMED.items():
        assert keyword in fixed and fixed[keyword].value == value, keyword
    assert {kw: malformed.get_item(kw).value for kw in MALFORMED} == before  # the source untouched
    assert isinstance(malformed.get_item("PatientWeight"), RawDataElement)  # never converted (it would raise)
    assert fixed.get_item("SeriesDate").value == malformed.get_item("SeriesDate").value
    assert fixed.get_item("PatientName").value == ("Doe^" + "J" * 70).encode()
    assert fixed.SOPInstanceUID == malformed.SOPInstanceUID and fixed.file_meta is malformed.file_meta


def test_ds_float_reads_a_decimal_comma_and_nothing_looser() -> None:
    assert ds_float("0,7") == ds_float("0.7") == ds_float(0.7) == 0.7
    for text in ("1,2,3", "0.7mm", "", "1 000"):
        with pytest.raises(ValueError):
            ds_float(text)


def test_geometry_is_repaired_never_emptied_and_the_reader_agrees(tmp_path: Path) -> None:
    files = write_series(ct_series(n_slices=3), tmp_path)
    for path, spacing in zip(files, ("0,7\\0,7", "0.7\\0,7", "0,7\\0,7"), strict=True):
        ds = pydicom.dcmread(path)
        set_raw(ds, "PixelSpacing", spacing)
        set_raw(ds, "SliceThickness", "2,5")
        ds.save_as(path, enforce_file_format=True)
    vol = read_series(files)
    assert vol.spacing_mm == pytest.approx((2.5, 0.7, 0.7))  # before: (2.5, 0, 0), spacing unknown
    fixed, keywords = conform_sources(vol.sources)
    assert keywords == ["PixelSpacing", "SliceThickness"]
    assert all(list(ds.PixelSpacing) == [0.7, 0.7] and ds.SliceThickness == 2.5 for ds in fixed)

    padded = Dataset()  # DS allows spaces around a value: nothing to repair
    set_raw(padded, "PixelSpacing", " 0.7\\0.7 ")
    set_raw(padded, "PatientWeight", " 72.5")
    assert conform_source(padded) == (padded, [])

    unreadable = Dataset()
    set_raw(unreadable, "PixelSpacing", "abc\\def")
    assert conform_source(unreadable) == (unreadable, [])  # not emptied: type 1, the reader refuses it


@pytest.mark.parametrize(
    ("charset", "kept"), [("ISO_IR 100", True), ("\\ISO 2022 IR 87", True), ("ISO_IR 999", False)]
)
def test_an_unknown_character_set_becomes_utf8(charset: str, kept: bool) -> None:
    ds = Dataset()
    set_raw(ds, "SpecificCharacterSet", charset)
    fixed, keywords = conform_source(ds)
    assert (fixed is ds and keywords == []) if kept else (fixed.SpecificCharacterSet == "ISO_IR 192")


def test_one_bad_value_of_several_empties_the_element() -> None:
    ds = Dataset()
    set_raw(ds, "PatientBirthDate", "19410923")
    ds[Tag(0x00101010)] = RawDataElement(Tag(0x00101010), "AS", 8, b"045Y\\X1Y", 0, False, True)
    fixed, keywords = conform_source(ds)
    assert keywords == ["PatientAge"] and fixed.PatientAge is None and fixed.PatientBirthDate == "19410923"


def test_a_series_shares_the_keywords_and_keeps_its_order(malformed: Dataset, tmp_path: Path) -> None:
    valid = pydicom.dcmread(write_series(ct_series(n_slices=1), tmp_path / "v")[0], stop_before_pixels=True)
    fixed, keywords = conform_sources([valid, malformed])
    assert fixed[0] is valid and fixed[1].SOPInstanceUID == malformed.SOPInstanceUID
    assert keywords == sorted(MALFORMED)
