"""The SCP over real loopback associations (pynetdicom SCU as the peer)."""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from dicom_node.config import ScpSection
from dicom_node.index import Index
from dicom_node.scp import start_scp
from dicom_node.spool import Spool
from radbridge_common.logs import JsonFormatter


@pytest.fixture
def scp(tmp_path: Path):  # noqa: ANN201
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    server = start_scp(ScpSection(port=0, ae_title="RADBRIDGE"), spool, index)
    yield server.server_address[1], spool, index
    server.shutdown()
    index.close()


def _assoc(port: int):  # noqa: ANN202
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    return assoc


def test_echo_and_store_are_durable_before_success(scp, small_ct_files: list[Path]) -> None:  # noqa: ANN001
    port, spool, index = scp
    assoc = _assoc(port)
    assert assoc.send_c_echo().Status == 0x0000
    status = assoc.send_c_store(small_ct_files[0])
    assoc.release()
    assert status.Status == 0x0000
    (row,) = index.study_instances(pydicom.dcmread(small_ct_files[0]).StudyInstanceUID)
    stored = pydicom.dcmread(row.path)
    original = pydicom.dcmread(small_ct_files[0])
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.PixelData == original.PixelData  # bytes kept as sent
    assert row.calling_aet == "TESTSCU"


def test_malformed_dataset_is_refused_without_phi_in_logs(
    scp,
    small_ct_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, _, index = scp
    good = pydicom.dcmread(small_ct_files[1])
    good.save_as(tmp_path / "ok.dcm")
    # A valid file meta header followed by a dataset that cannot be decoded.
    meta = BytesIO()
    write_file_meta_info(DicomFileLike(meta), good.file_meta)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(
        b"\x00" * 128 + b"DICM" + meta.getvalue() + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 10
    )
    missing = pydicom.dcmread(small_ct_files[2])
    del missing.StudyInstanceUID
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    assoc = _assoc(port)
    s1 = assoc.send_c_store(broken)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    s2 = assoc.send_c_store(missing)
    s3 = assoc.send_c_store(small_ct_files[3])  # the association survives
    assoc.release()
    assert 0xC000 <= s1.Status <= 0xCFFF  # "cannot understand"
    assert "decoded" in s1.ErrorComment or "Missing required" in s1.ErrorComment
    assert s2.Status == 0xC000 and "StudyInstanceUID" in s2.ErrorComment
    assert s3.Status == 0x0000
    assert index.count_instances() == 1
    logs = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for phi in (str(good.PatientName), good.PatientID, good.PatientBirthDate, good.AccessionNumber):
        assert phi not in logs
    assert f"0x{s1.Status:04X}" in logs


def test_write_failure_answers_a700(scp, small_ct_files: list[Path]) -> None:  # noqa: ANN001
    port, spool, _ = scp
    # Make the instances directory unusable: a file where a directory must go.
    ds = pydicom.dcmread(small_ct_files[4])
    target = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    target.parent.write_bytes(b"not a directory")
    assoc = _assoc(port)
    status = assoc.send_c_store(small_ct_files[4])
    assoc.release()
    assert status.Status == 0xA700
    assert "cannot write spool" in status.ErrorComment


def test_spool_below_its_watermark_answers_a700_and_keeps_nothing(
    tmp_path: Path, small_ct_files: list[Path]
) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=1 << 60)  # more than any disk has
    index = Index(spool.index_path)
    server = start_scp(ScpSection(port=0, ae_title="RADBRIDGE"), spool, index)
    try:
        assoc = _assoc(server.server_address[1])
        status = assoc.send_c_store(small_ct_files[0])
        assoc.release()
    finally:
        server.shutdown()
    assert status.Status == 0xA700
    assert "watermark" in status.ErrorComment
    assert index.count_instances() == 0 and not any((spool.root / "instances").rglob("*.dcm"))
    index.close()
