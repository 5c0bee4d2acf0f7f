"""A de-identifying route with the inference service on "another host": nothing identifying leaves.

The service runs as its own process (`python -m inference_service serve`) on a loopback port; a TCP
man-in-the-middle between the node and the service records every byte the node sends. A PHI-laden
study goes in with dcmtk storescu. The capture must hold none of its identifying values (names, IDs,
dates, UIDs, institution, station, a free-text Body Part Examined), the SR/SEG must land in the
original study referencing the original instances, and a series marked BurnedInAnnotation YES must
be refused with its reason in the study status.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.config import (
    CompletionSection,
    DeidentificationSection,
    HttpSection,
    NodeSettings,
    RoutingRule,
    RoutingSection,
    RuleMatch,
    ScpSection,
    SpoolSection,
    WorkerSection,
)
from dicom_node.deidentify import pseudonymous_uid
from dicom_node.node import Node
from dicom_node.status import describe
from radbridge.synth import SyntheticPatient, ct_series, write_series
from tests.peers import free_port, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("require_dcmtk")]
KEY = b"0f1e2d3c4b5a69788796a5b4c3d2e1f0"
PATIENT = SyntheticPatient(
    name="PHISENTINEL^JOHANNA", patient_id="PHI-MRN-8675309", birth_date="19440229", accession="PHIACC4242"
)
STUDY_DATE = "20250317"
FREE_TEXT_BODY_PART = "JOHN SMITH CHEST"


class Recorder:
    """A TCP proxy on a free loopback port that records what the client sends (and what it gets)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sent = bytearray()
        self.received = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, self.sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.received), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def inference_service(tmp_path: Path) -> Iterator[int]:
    """The inference service as a separate process on a loopback port (the "other host")."""
    port = free_port()
    cfg = tmp_path / "service.toml"
    cfg.write_text(f"[inference_service]\nport = {port}\n")
    log = open(tmp_path / "service.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference_service", "serve", "--config", str(cfg)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "service.log").read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the inference service did not start listening"
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _phi_study(directory: Path) -> tuple[list[Dataset], list[Dataset]]:
    """A PHI-laden CT study: a series to analyse and a series with burned-in annotation."""
    series = ct_series(n_slices=8, patient=PATIENT, seed=61)
    burned = ct_series(n_slices=4, patient=PATIENT, seed=61, study_uid=str(series[0].StudyInstanceUID))
    for k, ds in enumerate(burned):
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["burned", str(ds.StudyInstanceUID)])
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["burned", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 3
        ds.BurnedInAnnotation = "YES"
    for ds in series + burned:
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
        ds.InstitutionName = "PHI SAINT SENTINEL HOSPITAL"
        ds.ReferringPhysicianName = "PHIDOCTOR^REFERRING"
        ds.StationName = "PHISTATION9"
        ds.BodyPartExamined = FREE_TEXT_BODY_PART
    write_series(series, directory / "ct")
    write_series(burned, directory / "burned")
    return series, burned


def _identifying_values(series: list[Dataset], burned: list[Dataset]) -> dict[str, str]:
    first = series[0]
    values = {
        "PatientName (family)": "PHISENTINEL",
        "PatientName (given)": "JOHANNA",
        "PatientID": PATIENT.patient_id,
        "PatientBirthDate": PATIENT.birth_date,
        "AccessionNumber": PATIENT.accession,
        "StudyDate": STUDY_DATE,
        "InstitutionName": "SAINT SENTINEL",
        "ReferringPhysicianName": "PHIDOCTOR",
        "StationName": "PHISTATION9",
        "BodyPartExamined": "JOHN SMITH",
        "StudyInstanceUID": str(first.StudyInstanceUID),
        "SeriesInstanceUID": str(first.SeriesInstanceUID),
        "burned SeriesInstanceUID": str(burned[0].SeriesInstanceUID),
        "FrameOfReferenceUID": str(first.FrameOfReferenceUID),
    }
    values.update({f"SOPInstanceUID {k}": str(ds.SOPInstanceUID) for k, ds in enumerate(series + burned)})
    return values


def _wait_for_status(node: Node, study_uid: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        study = node.index.study(study_uid)
        if study is not None:
            doc = describe(node.index, study, history=True)
            if doc["status"] in ("DELIVERED", "PARTIALLY_FAILED", "FAILED", "DEAD_LETTER"):
                return doc
        time.sleep(0.3)
    raise AssertionError(f"the study did not finish in {timeout_s} s")


def test_nothing_identifying_leaves_and_results_land_in_the_original_study(
    tmp_path: Path, inference_service: int
) -> None:
    (tmp_path / "deid.key").write_bytes(KEY)
    series, burned = _phi_study(tmp_path)
    study_uid = str(series[0].StudyInstanceUID)
    settings = NodeSettings(
        scp=ScpSection(port=0),
        http=HttpSection(enabled=False),
        spool=SpoolSection(directory=tmp_path / "spool", min_free_bytes=0),
        completion=CompletionSection(quiet_window_s=0.5),
        routing=RoutingSection(
            rules=[
                RoutingRule(
                    name="remote-ct",
                    match=RuleMatch(modality=["CT"]),
                    tasks=["segment", "report"],
                    deidentify=True,
                )
            ]
        ),
        worker=WorkerSection(threads=1, poll_interval_s=0.2, max_attempts=1),
        deidentification=DeidentificationSection(key_file=tmp_path / "deid.key"),
    )
    proxy = Recorder(("127.0.0.1", inference_service))
    try:
        with Node(settings, f"127.0.0.1:{proxy.port}") as node:
            sent = storescu(
                sorted((tmp_path / "ct").glob("*.dcm")) + sorted((tmp_path / "burned").glob("*.dcm")),
                "127.0.0.1",
                node.port,
                "RADBRIDGE",
            )
            assert sent.returncode == 0 and not sent.errors, sent.stderr
            status = _wait_for_status(node, study_uid)
            outputs = [pydicom.dcmread(p) for p in sorted(node.spool.output_dir(study_uid).glob("*.dcm"))]
    finally:
        proxy.close()
    wire = bytes(proxy.sent)

    # The burned-in series was refused, with its reason in the study status; the other was delivered.
    assert status["status"] == "PARTIALLY_FAILED", status
    (reason,) = status["reasons"]
    assert (
        "series 3 (CT)" in reason
        and "DeidentificationRefused" in reason
        and "Burned In Annotation YES" in reason
    )
    assert any(e["event"] == "sent de-identified" for e in status["history"])

    # The capture is real (it holds the voxels' header and the pseudonym), and holds nothing identifying.
    pseudonym = pseudonymous_uid(KEY, str(series[0].SeriesInstanceUID))
    assert len(wire) > 8 * 512 * 512 and b"AnalyzeVolume" in wire and pseudonym.encode() in wire
    leaked = {
        name: value for name, value in _identifying_values(series, burned).items() if value.encode() in wire
    }
    assert leaked == {}
    assert b"job-" not in wire  # the node's job ids stay home too

    # SR and SEG landed in the original study and reference the original instances.
    originals = {str(ds.SOPInstanceUID) for ds in series}
    produced = {str(ds.SOPInstanceUID) for ds in outputs}
    kinds = sorted(str(ds.Modality) for ds in outputs)
    assert kinds.count("SEG") == 1 and kinds.count("SR") >= 1, kinds
    for ds in outputs:
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == PATIENT.patient_id  # re-identified: the objects belong to the patient
        assert pseudonym not in str(ds)
    (seg,) = [ds for ds in outputs if ds.Modality == "SEG"]
    referenced = {
        str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    assert referenced and referenced <= originals
    for sr in (ds for ds in outputs if ds.Modality == "SR"):
        evidence = {
            str(i.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for s in study.ReferencedSeriesSequence
            for i in s.ReferencedSOPSequence
        }
        assert str(sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID) == study_uid
        assert evidence & originals and evidence <= originals | produced  # the sources (and our SEG)
