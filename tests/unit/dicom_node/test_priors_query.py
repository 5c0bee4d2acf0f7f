"""The prior query names the patient by PatientID and, when the study has one, IssuerOfPatientID:
two hospitals' patients can share an ID, and a prior of the wrong one must not be fetched."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.config import PullSource
from dicom_node.index import Index
from dicom_node.priors import Patient, PriorStudy, find_patient_studies, patient_of
from dicom_node.spool import InstanceRef, Spool


@pytest.fixture
def find_scp() -> Iterator[tuple[int, list[Dataset]]]:
    """A pynetdicom C-FIND SCP that records each identifier and answers one prior study."""
    queries: list[Dataset] = []

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        queries.append(event.identifier)
        answer = Dataset()
        answer.QueryRetrieveLevel = "STUDY"
        answer.StudyInstanceUID = "1.2.3.99"
        answer.StudyDate = "20240101"
        answer.StudyTime = "101010"
        answer.ModalitiesInStudy = "CT"
        yield 0xFF00, answer

    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield server.server_address[1], queries
    finally:
        server.shutdown()


@pytest.mark.parametrize("issuer", ["HOSPITAL-A", ""])
def test_the_c_find_names_the_issuer_when_there_is_one(
    find_scp: tuple[int, list[Dataset]], issuer: str
) -> None:
    port, queries = find_scp
    source = PullSource(host="127.0.0.1", port=port, ae_title="PACS")
    found = find_patient_studies(source, "RADBRIDGE", Patient("PID-7", issuer, frozenset({"CT"})))
    assert found == [PriorStudy("1.2.3.99", "20240101", "101010", frozenset({"CT"}))]
    (query,) = queries
    assert query.PatientID == "PID-7" and query.QueryRetrieveLevel == "STUDY"
    if issuer:
        assert query.IssuerOfPatientID == issuer
    else:
        assert "IssuerOfPatientID" not in query


class _Qido(BaseHTTPRequestHandler):
    seen: list[dict[str, list[str]]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append(parse_qs(urlsplit(self.path).query))
        body = json.dumps([{"0020000D": {"vr": "UI", "Value": ["1.2.3.98"]}}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_qido_query_names_the_issuer() -> None:
    _Qido.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Qido)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = PullSource(type="dicomweb", url=f"http://127.0.0.1:{server.server_address[1]}/dicom-web")
        found = find_patient_studies(source, "RADBRIDGE", Patient("PID-7", "HOSPITAL-A", frozenset()))
    finally:
        server.shutdown()
        server.server_close()
    assert [s.study_instance_uid for s in found] == ["1.2.3.98"]
    (params,) = _Qido.seen
    assert params["PatientID"] == ["PID-7"] and params["IssuerOfPatientID"] == ["HOSPITAL-A"]


def test_the_patient_is_read_with_its_issuer_from_the_study(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = "PID-7"
    ds.IssuerOfPatientID = "HOSPITAL-A"
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    ref = InstanceRef(
        ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
        str(ds.file_meta.TransferSyntaxUID), path, path.stat().st_size,
    )  # fmt: skip
    index.add_instance(ref, "CT", "SCU")
    try:
        assert patient_of(index, ds.StudyInstanceUID) == Patient("PID-7", "HOSPITAL-A", frozenset({"CT"}))
        del ds.IssuerOfPatientID
        ds.save_as(path)
        assert patient_of(index, ds.StudyInstanceUID) == Patient("PID-7", "", frozenset({"CT"}))
    finally:
        index.close()
