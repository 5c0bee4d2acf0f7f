"""The harness itself: Orthanc answers DIMSE and DICOMweb; validators catch broken objects."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.peers import OrthancServer, assert_valid_dicom_object, dciodvfy, echoscu, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools")]


def test_orthanc_accepts_storescu_and_lists_over_dicomweb(orthanc: OrthancServer) -> None:
    assert echoscu("127.0.0.1", orthanc.dicom_port, orthanc.aet).returncode == 0
    path = Path(get_testdata_file("CT_small.dcm"))
    result = storescu([path], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert result.returncode == 0 and not result.errors, result.stderr
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    (inst,) = orthanc.find_instances(SOPInstanceUID=ds.SOPInstanceUID)
    assert inst["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID
    studies = orthanc.qido("/studies")
    assert [s["0020000D"]["Value"][0] for s in studies] == [ds.StudyInstanceUID]


def test_storescu_reports_refusals_as_errors(tmp_path: Path) -> None:
    # Nobody listens on this port: storescu must report it, not pass silently.
    from tests.peers import free_port

    result = storescu([Path(get_testdata_file("CT_small.dcm"))], "127.0.0.1", free_port(), "NOBODY")
    assert result.returncode != 0 or result.errors


def test_validators_catch_a_broken_object(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    good = tmp_path / "good.dcm"
    ds.save_as(good)
    del ds.Modality  # Type 1 in the General Series module
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    assert any("Modality" in line for line in dciodvfy(bad))
    with pytest.raises(AssertionError, match="dciodvfy errors"):
        assert_valid_dicom_object(bad)
    assert len(dciodvfy(bad)) > len(dciodvfy(good))
