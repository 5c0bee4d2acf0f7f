"""The STOW-RS listener over real HTTP on loopback (uvicorn), dicomweb-client and httpx as peers."""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_node.config import HttpSection, NodeSettings, SpoolSection
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index, JobKind, StudyState
from dicom_node.spool import STAGING, Spool
from radbridge.synth import SyntheticPatient, ct_series
from radbridge_common.logs import JsonFormatter

FAILED = "00081198"
STORED = "00081199"
REASON = "00081197"
INSTANCE = "00081155"


@dataclass
class Stow:
    url: str
    spool: Spool
    index: Index

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.url)


def _start(tmp_path: Path, **http: object) -> tuple[HttpServer, Stow]:
    settings = NodeSettings(spool=SpoolSection(directory=tmp_path / "spool"), http=HttpSection(**http))  # type: ignore[arg-type]
    spool = Spool(settings.spool.directory)
    index = Index(spool.index_path)
    server = HttpServer(create_app(settings, spool, index), "127.0.0.1", 0)
    port = server.start()
    return server, Stow(f"http://127.0.0.1:{port}/dicom-web", spool, index)


@pytest.fixture
def stow(tmp_path: Path) -> Iterator[Stow]:
    server, handle = _start(tmp_path)
    yield handle
    server.stop()
    handle.index.close()


@pytest.fixture
def ct() -> list[Dataset]:
    return ct_series(n_slices=4)


def _file_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(parts: list[bytes], boundary: str, close: bool = True) -> bytes:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    )
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def _post(url: str, body: bytes | Iterator[bytes], boundary: str, study: str = "") -> httpx.Response:
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    return httpx.post(
        f"{url}/studies" + (f"/{study}" if study else ""), content=body, headers=headers, timeout=60
    )


def _staging_empty(spool: Spool) -> bool:
    return not any((spool.root / STAGING).iterdir())


def test_dicomweb_client_stow_is_spooled_indexed_and_readable(stow: Stow, ct: list[Dataset]) -> None:
    response = stow.client().store_instances(ct)
    assert [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in ct
    ]
    assert len(response.FailedSOPSequence) == 0
    assert response.RetrieveURL.endswith(f"/studies/{ct[0].StudyInstanceUID}")
    rows = stow.index.study_instances(ct[0].StudyInstanceUID)
    assert {r.sop_instance_uid for r in rows} == {ds.SOPInstanceUID for ds in ct}
    assert stow.index.study(ct[0].StudyInstanceUID)["state"] == StudyState.RECEIVING  # quiet window runs
    for row in rows:  # a PS3.10 file (dicomweb-client drops the preamble; the spool puts it back)
        stored = pydicom.dcmread(row.path)
        original = next(ds for ds in ct if ds.SOPInstanceUID == row.sop_instance_uid)
        assert stored.PixelData == original.PixelData
        assert row.path.read_bytes()[128:132] == b"DICM"
    assert _staging_empty(stow.spool)


def test_wrong_media_type_is_415_with_a_json_body(stow: Stow, ct: list[Dataset]) -> None:
    r = httpx.post(
        f"{stow.url}/studies", content=_file_bytes(ct[0]), headers={"Content-Type": "application/dicom"}
    )
    assert r.status_code == 415
    assert "multipart/related" in r.json()["error"]["message"]
    boundary = "b1"
    r = httpx.post(
        f"{stow.url}/studies",
        content=_multipart([_file_bytes(ct[0])], boundary),
        headers={"Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}'},
    )
    assert r.status_code == 415
    assert stow.index.count_instances() == 0


def test_missing_boundary_is_400(stow: Stow) -> None:
    r = httpx.post(
        f"{stow.url}/studies",
        content=b"x",
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
    )
    assert r.status_code == 400
    assert "boundary" in r.json()["error"]["message"]


def test_truncated_multipart_is_400_and_keeps_the_complete_parts(stow: Stow, ct: list[Dataset]) -> None:
    boundary = uuid.uuid4().hex
    whole = _multipart([_file_bytes(ds) for ds in ct[:2]], boundary, close=False)
    cut = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + _file_bytes(ct[2])[:5000]
    r = _post(stow.url, whole + cut, boundary)
    assert r.status_code == 400
    body = r.json()
    assert "Truncated" in body["error"]["message"]
    stored = [item[INSTANCE]["Value"][0] for item in body["result"][STORED]["Value"]]
    assert stored == [ct[0].SOPInstanceUID, ct[1].SOPInstanceUID]
    assert {r.sop_instance_uid for r in stow.index.study_instances(ct[0].StudyInstanceUID)} == set(stored)
    assert _staging_empty(stow.spool)


def test_a_part_that_is_not_dicom_fails_alone_202(stow: Stow, ct: list[Dataset]) -> None:
    boundary = uuid.uuid4().hex
    parts = [_file_bytes(ct[0]), b"this is not a DICOM file" * 20, _file_bytes(ct[1])]
    r = _post(stow.url, _multipart(parts, boundary), boundary)
    assert r.status_code == 202
    assert r.headers["content-type"].startswith("application/dicom+json")
    body = r.json()
    (failed,) = body[FAILED]["Value"]
    assert failed[REASON]["Value"] == [0xC210]
    assert [i[INSTANCE]["Value"][0] for i in body[STORED]["Value"]] == [
        ct[0].SOPInstanceUID,
        ct[1].SOPInstanceUID,
    ]
    assert stow.index.count_instances() == 2


def test_nothing_stored_is_409(stow: Stow, ct: list[Dataset]) -> None:
    boundary = uuid.uuid4().hex
    no_study = copy.deepcopy(ct[0])
    del no_study.StudyInstanceUID
    r = _post(stow.url, _multipart([b"garbage", _file_bytes(no_study)], boundary), boundary)
    assert r.status_code == 409
    reasons = [item[REASON]["Value"][0] for item in r.json()[FAILED]["Value"]]
    assert reasons == [0xC210, 0xC000]
    assert stow.index.count_instances() == 0


def test_dicomweb_client_409_body_is_readable(stow: Stow) -> None:
    """dicomweb-client raises before reading the body; the per-instance reasons are still there."""
    bad = ct_series(n_slices=1)[0]
    del bad.SeriesInstanceUID
    with pytest.raises(requests.HTTPError) as info:
        stow.client().store_instances([bad])
    assert info.value.response.status_code == 409
    (failed,) = info.value.response.json()[FAILED]["Value"]
    assert failed[INSTANCE]["Value"] == [bad.SOPInstanceUID]
    assert failed[REASON]["Value"] == [0xC000]


def test_other_study_than_the_target_fails_with_c409(stow: Stow, ct: list[Dataset]) -> None:
    other = ct_series(n_slices=1, patient=SyntheticPatient(patient_id="RB-SYN-0002"))[0]
    boundary = uuid.uuid4().hex
    r = _post(
        stow.url,
        _multipart([_file_bytes(ct[0]), _file_bytes(other)], boundary),
        boundary,
        ct[0].StudyInstanceUID,
    )
    assert r.status_code == 202
    (failed,) = r.json()[FAILED]["Value"]
    assert failed[INSTANCE]["Value"] == [other.SOPInstanceUID]
    assert failed[REASON]["Value"] == [0xC409]
    assert stow.index.study(other.StudyInstanceUID) is None


def test_duplicate_instance_is_stored_once_as_for_c_store(stow: Stow, ct: list[Dataset]) -> None:
    client = stow.client()
    client.store_instances(ct[:1])
    changed = copy.deepcopy(ct[0])
    changed.SeriesDescription = "resent"
    response = client.store_instances([changed])
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [ct[0].SOPInstanceUID]
    (row,) = stow.index.study_instances(ct[0].StudyInstanceUID)
    assert pydicom.dcmread(row.path).SeriesDescription == "resent"  # the newer copy wins, as for C-STORE
    assert stow.index.count_instances() == 1


def test_body_over_the_limit_is_413(tmp_path: Path, ct: list[Dataset]) -> None:
    one = len(_file_bytes(ct[0]))
    server, stow = _start(tmp_path, max_request_bytes=int(one * 1.5))
    try:
        boundary = uuid.uuid4().hex
        body = _multipart([_file_bytes(ds) for ds in ct[:3]], boundary)
        r = _post(stow.url, body, boundary)  # Content-Length says so: refused before reading
        assert r.status_code == 413
        assert stow.index.count_instances() == 0

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            for i in range(0, len(body), 64 * 1024):
                yield body[i : i + 64 * 1024]

        r = _post(stow.url, chunked(), boundary)
        assert r.status_code == 413
        body_json = r.json()
        assert "larger than" in body_json["error"]["message"]
        # What was complete before the limit stays stored and is reported.
        stored = [i[INSTANCE]["Value"][0] for i in body_json["result"][STORED]["Value"]]
        assert stored == [ct[0].SOPInstanceUID]
        assert stow.index.count_instances() == 1
        assert _staging_empty(stow.spool)
    finally:
        server.stop()
        stow.index.close()


def test_part_over_the_limit_fails_alone(tmp_path: Path, ct: list[Dataset]) -> None:
    small = ct_series(n_slices=1)[0]
    small.PixelData = small.PixelData[: 64 * 64 * 2]
    small.Rows = small.Columns = 64
    server, stow = _start(tmp_path, max_part_bytes=100_000)
    try:
        boundary = uuid.uuid4().hex
        r = _post(stow.url, _multipart([_file_bytes(ct[0]), _file_bytes(small)], boundary), boundary)
        assert r.status_code == 202
        (failed,) = r.json()[FAILED]["Value"]
        assert failed[REASON]["Value"] == [0xA700]
        assert stow.index.count_instances() == 1
        assert _staging_empty(stow.spool)
    finally:
        server.stop()
        stow.index.close()


def test_stow_can_complete_its_study_at_once(tmp_path: Path, ct: list[Dataset]) -> None:
    server, stow = _start(tmp_path, stow_completes_study=True)
    try:
        stow.client().store_instances(ct)
        assert stow.index.study(ct[0].StudyInstanceUID)["state"] == StudyState.COMPLETE
        (route,) = stow.index.jobs(ct[0].StudyInstanceUID, JobKind.ROUTE)
        assert route.state == "PENDING"
    finally:
        server.stop()
        stow.index.close()


def test_logs_hold_no_patient_data(stow: Stow, ct: list[Dataset], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = copy.deepcopy(ct[1])
    del bad.StudyInstanceUID
    boundary = uuid.uuid4().hex
    _post(stow.url, _multipart([_file_bytes(ct[0]), _file_bytes(bad)], boundary), boundary)
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any(json.loads(line).get("event") == "stow" for line in lines)
    patient = SyntheticPatient()
    for line in lines:
        for secret in (patient.name, patient.patient_id, patient.accession, patient.birth_date):
            assert secret not in line


def test_spool_below_its_watermark_is_503_with_retry_after(tmp_path: Path, ct: list[Dataset]) -> None:
    settings = NodeSettings(spool=SpoolSection(directory=tmp_path / "spool"))
    spool = Spool(settings.spool.directory, min_free_bytes=1 << 60)  # more than any disk has
    index = Index(spool.index_path)
    server = HttpServer(create_app(settings, spool, index), "127.0.0.1", 0)
    port = server.start()
    try:
        response = _post(f"http://127.0.0.1:{port}/dicom-web", _multipart([_file_bytes(ct[0])], "b0"), "b0")
    finally:
        server.stop()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "60"
    assert "watermark" in response.json()["error"]["message"]
    assert index.count_instances() == 0 and _staging_empty(spool)
    index.close()
