"""STOW-RS export: per-instance outcomes read from a real HTTP peer, and their classification.

The peer is a small Starlette app served by uvicorn on a loopback port the OS
chooses; its path prefix picks the answer (``{url}/{scenario}/studies``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import uvicorn
from pydicom.dataset import Dataset
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicom_node.config import ExportSection, ExportTarget, NodeSettings, SpoolSection
from dicom_node.errors import ExportError, PermanentExportError, failure_reason_is_transient
from dicom_node.export import EXPORTERS, export, retry_after_s, send_cstore, send_stow
from dicom_node.index import Index, JobKind, JobState
from dicom_node.spool import Spool
from dicom_node.worker import StepContext, run_job
from tests.peers import free_port

DICOM_JSON = "application/dicom+json"


def _parts(body: bytes, content_type: str) -> list[Dataset]:
    """The DICOM instances of a multipart/related body (enough of RFC 2046 for a test peer)."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip().strip('"').encode()
    datasets = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, payload = chunk.partition(b"\r\n\r\n")
        datasets.append(pydicom.dcmread(BytesIO(payload.removesuffix(b"\r\n"))))
    return datasets


def _stow_response(status: int, stored: list[Dataset], failed: list[tuple[Dataset, int]]) -> Response:
    body = Dataset()
    if stored:
        body.ReferencedSOPSequence = [_ref(ds) for ds in stored]
    if failed:
        items = []
        for ds, reason in failed:
            item = _ref(ds)
            item.FailureReason = reason
            items.append(item)
        body.FailedSOPSequence = items
    return Response(body.to_json(), status_code=status, media_type=DICOM_JSON)


def _ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


class StowPeer:
    """Answers POST /{scenario}/studies; records what each request carried."""

    def __init__(self) -> None:
        self.received: list[list[str]] = []
        self.app = Starlette(routes=[Route("/{scenario}/studies", self.store, methods=["POST"])])

    async def store(self, request: Request) -> Response:
        scenario = request.path_params["scenario"]
        datasets = _parts(await request.body(), request.headers["content-type"])
        self.received.append([ds.SOPInstanceUID for ds in datasets])
        first, rest = datasets[:1], datasets[1:]
        match scenario:
            case "ok":
                return _stow_response(200, datasets, [])
            case "ok-unlisted":  # 200, but one instance is not acknowledged
                return _stow_response(200, rest, [])
            case "some-cannot-understand":
                return _stow_response(202, rest, [(ds, 0xC000) for ds in first])
            case "sop-class":
                return _stow_response(409, [], [(ds, 0x0122) for ds in datasets])
            case "out-of-resources":
                return _stow_response(409, [], [(ds, 0xA700) for ds in datasets])
            case "mixed":  # one transient, one permanent reason: the job is parked
                return _stow_response(409, [], [(first[0], 0xA700), *[(ds, 0xA900) for ds in rest]])
            case "duplicate":  # 0x0111: the destination already holds it
                return _stow_response(409, [], [(ds, 0x0111) for ds in datasets])
            case "unavailable":
                return Response(Dataset().to_json(), status_code=503, media_type=DICOM_JSON)
            case "busy":  # 503 with how long to wait (RFC 9110 Retry-After, delay-seconds)
                headers = {"Retry-After": "120"}
                return Response(Dataset().to_json(), status_code=503, media_type=DICOM_JSON, headers=headers)
            case "media-type":
                return Response(Dataset().to_json(), status_code=415, media_type=DICOM_JSON)
            case "web-page":  # not a STOW-RS service at all
                return Response("<html>hello</html>", status_code=200, media_type="text/html")
            case "slow":
                await asyncio.sleep(3)
                return _stow_response(200, datasets, [])
        return Response(status_code=404)


@pytest.fixture(scope="module")
def peer() -> Iterator[tuple[str, StowPeer]]:
    stow = StowPeer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        stow.app,
        lifespan="off",
        ws="none",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test STOW-RS peer did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", stow
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def two_files(small_ct_files: list[Path]) -> list[Path]:
    return small_ct_files[:2]


def _target(url: str, timeout_s: float = 10.0) -> ExportTarget:
    return ExportTarget(type="dicomweb", url=url, timeout_s=timeout_s)


def _uids(paths: list[Path]) -> list[str]:
    return [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]


class TestSendStow:
    def test_registered_for_dicomweb_targets(self) -> None:
        assert EXPORTERS["dicomweb"] is send_stow

    def test_200_listing_every_instance_returns(
        self, peer: tuple[str, StowPeer], two_files: list[Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        url, stow = peer
        with caplog.at_level(logging.INFO, logger="dicom_node.export"):
            export(two_files, _target(f"{url}/ok"), "RADBRIDGE")
        assert stow.received[-1] == _uids(two_files)  # one request carrying both
        (record,) = [r for r in caplog.records if getattr(r, "event", "") == "export.stow"]
        assert record.status == 200 and record.instances == 2 and record.duration_ms >= 0
        assert record.target == url.removeprefix("http://")
        ds = pydicom.dcmread(two_files[0], stop_before_pixels=True)
        assert str(ds.PatientName) not in caplog.text and ds.PatientID not in caplog.text

    def test_200_without_every_instance_acknowledged_is_permanent(
        self, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        with pytest.raises(PermanentExportError, match=r"HTTP 200 .*does not list 1 of 2"):
            send_stow(two_files, _target(f"{peer[0]}/ok-unlisted"), "RADBRIDGE")

    def test_200_that_is_not_a_stow_response_is_permanent(
        self, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        with pytest.raises(PermanentExportError, match=r"HTTP 200 .*does not list 2 of 2"):
            send_stow(two_files, _target(f"{peer[0]}/web-page"), "RADBRIDGE")

    def test_202_cannot_understand_is_permanent_and_names_the_instance(
        self, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        with pytest.raises(PermanentExportError) as info:
            send_stow(two_files, _target(f"{peer[0]}/some-cannot-understand"), "RADBRIDGE")
        message = str(info.value)
        assert "HTTP 202" in message and "1 of 2 instance(s) failed" in message
        assert f"{_uids(two_files)[0]} FailureReason 0xC000" in message
        assert info.value.retryable is False

    def test_409_sop_class_not_supported_is_permanent(
        self, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        with pytest.raises(PermanentExportError, match=r"HTTP 409 .*FailureReason 0x0122"):
            send_stow(two_files, _target(f"{peer[0]}/sop-class"), "RADBRIDGE")

    def test_409_out_of_resources_is_retryable(
        self, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        with pytest.raises(ExportError, match=r"HTTP 409 .*FailureReason 0xA700") as info:
            send_stow(two_files, _target(f"{peer[0]}/out-of-resources"), "RADBRIDGE")
        assert type(info.value) is ExportError and info.value.retryable is True

    def test_409_mixed_reasons_is_permanent(self, peer: tuple[str, StowPeer], two_files: list[Path]) -> None:
        with pytest.raises(PermanentExportError) as info:
            send_stow(two_files, _target(f"{peer[0]}/mixed"), "RADBRIDGE")
        assert "0xA700" in str(info.value) and "0xA900" in str(info.value)

    def test_409_duplicates_count_as_stored(self, peer: tuple[str, StowPeer], two_files: list[Path]) -> None:
        send_stow(two_files, _target(f"{peer[0]}/duplicate"), "RADBRIDGE")

    def test_503_is_retryable(self, peer: tuple[str, StowPeer], two_files: list[Path]) -> None:
        before = len(peer[1].received)
        with pytest.raises(ExportError, match="HTTP 503") as info:
            send_stow(two_files, _target(f"{peer[0]}/unavailable"), "RADBRIDGE")
        assert type(info.value) is ExportError and info.value.retryable is True
        assert len(peer[1].received) == before + 1  # dicomweb-client's own retries are off

    def test_503_with_retry_after_says_how_long(self, peer: tuple[str, StowPeer], two_files: list[Path]) -> None:
        with pytest.raises(ExportError, match=r"HTTP 503.*\(Retry-After: 120 s\)") as info:
            send_stow(two_files, _target(f"{peer[0]}/busy"), "RADBRIDGE")
        assert info.value.retry_after_s == 120 and info.value.retryable is True

    def test_415_is_permanent(self, peer: tuple[str, StowPeer], two_files: list[Path]) -> None:
        with pytest.raises(PermanentExportError, match="HTTP 415"):
            send_stow(two_files, _target(f"{peer[0]}/media-type"), "RADBRIDGE")

    def test_wrong_path_404_is_permanent(self, peer: tuple[str, StowPeer], two_files: list[Path]) -> None:
        with pytest.raises(PermanentExportError, match="HTTP 404"):
            send_stow(two_files, _target(f"{peer[0]}/nope/deeper"), "RADBRIDGE")

    def test_timeout_is_retryable(self, peer: tuple[str, StowPeer], two_files: list[Path]) -> None:
        with pytest.raises(ExportError, match="Timeout") as info:
            send_stow(two_files, _target(f"{peer[0]}/slow", timeout_s=0.3), "RADBRIDGE")
        assert type(info.value) is ExportError

    def test_connection_refused_is_retryable(
        self, two_files: list[Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="dicom_node.export"), pytest.raises(ExportError) as info:
            send_stow(two_files, _target(f"http://127.0.0.1:{free_port()}/dicom-web"), "RADBRIDGE")
        assert type(info.value) is ExportError and "ConnectionError" in str(info.value)
        (record,) = [r for r in caplog.records if getattr(r, "event", "") == "export.stow"]
        assert record.levelno == logging.WARNING and record.status == "ConnectionError"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2015 07:30:00 GMT", 120.0),  # an HTTP-date, two minutes after "now"
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # already past: at once
        (None, None),
        ("", None),
        ("-5", None),
        ("soon", None),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_s(header, now=now) == seconds


class TestFailureReasons:
    @pytest.mark.parametrize("reason", [0xA700, 0xA701, 0xA7FF, 0x0110, 0x0999])
    def test_transient(self, reason: int) -> None:
        assert failure_reason_is_transient(reason)

    @pytest.mark.parametrize("reason", [0x0122, 0x0124, 0xA900, 0xA9FF, 0xC000, 0xC122, 0xCFFF])
    def test_permanent(self, reason: int) -> None:
        assert not failure_reason_is_transient(reason)


class TestRunJob:
    def _ctx(self, tmp_path: Path, url: str) -> StepContext:
        spool = Spool(tmp_path / "spool")
        settings = NodeSettings(
            spool=SpoolSection(tmp_path / "spool"),
            export=ExportSection(targets={"web": _target(url)}, max_attempts=5, backoff_s=0.01),
        )
        return StepContext(
            settings, spool, Index(spool.index_path), client_factory=lambda: pytest.fail("no inference")
        )

    def test_permanent_refusal_dead_letters_after_one_attempt(
        self, tmp_path: Path, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        ctx = self._ctx(tmp_path, f"{peer[0]}/sop-class")
        ctx.index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": str(two_files[0]), "target": "web"})
        assert run_job(ctx.index.claim_job(), ctx) is JobState.DEAD_LETTER
        (job,) = ctx.index.jobs()
        assert job.state is JobState.DEAD_LETTER and job.attempts == 1
        assert job.last_error.startswith("PermanentExportError:") and "0x0122" in job.last_error
        assert ctx.index.claim_job() is None

    def test_exporter_raising_permanent_error_dead_letters(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def refuse(paths: object, target: object, calling_ae: str) -> None:
            raise PermanentExportError("HTTP 403 Forbidden")

        monkeypatch.setitem(EXPORTERS, "dicomweb", refuse)
        ctx = self._ctx(tmp_path, "http://127.0.0.1:1/dicom-web")
        ctx.index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": "x.dcm", "target": "web"})
        assert run_job(ctx.index.claim_job(), ctx) is JobState.DEAD_LETTER
        assert ctx.index.jobs()[0].attempts == 1

    def test_transient_refusal_is_retried(
        self, tmp_path: Path, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        ctx = self._ctx(tmp_path, f"{peer[0]}/unavailable")
        ctx.index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": str(two_files[0]), "target": "web"})
        assert run_job(ctx.index.claim_job(), ctx) is JobState.PENDING
        assert "HTTP 503" in ctx.index.jobs()[0].last_error

    def test_the_retry_waits_as_long_as_the_pacs_asked(
        self, tmp_path: Path, peer: tuple[str, StowPeer], two_files: list[Path]
    ) -> None:
        """Backoff here is 0.01 s; the PACS's Retry-After (120 s) sets the next try instead."""
        ctx = self._ctx(tmp_path, f"{peer[0]}/busy")
        ctx.index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": str(two_files[0]), "target": "web"})
        before = time.time()
        assert run_job(ctx.index.claim_job(), ctx) is JobState.PENDING
        (job,) = ctx.index.jobs()
        assert job.next_try_time >= before + 120 and "Retry-After: 120 s" in job.last_error
        assert ctx.index.claim_job(now=before + 60) is None  # not before it asked


class TestSendCstore:
    """C-STORE export against pynetdicom SCPs that refuse in the ways a PACS does."""

    @staticmethod
    def _scp(status: int = 0x0000, **ae_settings: object):  # noqa: ANN205
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage

        ae = AE(ae_title="PACS")
        for key, value in ae_settings.items():
            setattr(ae, key, value)
        ae.add_supported_context(CTImageStorage)
        handlers = [(evt.EVT_C_STORE, lambda event: status)]
        return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)

    @staticmethod
    def _send(server, path: Path, ae_title: str = "PACS") -> None:  # noqa: ANN001
        target = ExportTarget(host="127.0.0.1", port=server.server_address[1], ae_title=ae_title)
        send_cstore([path], target, "RADBRIDGE")

    def test_unknown_called_ae_is_permanent(self, small_ct_files: list[Path]) -> None:
        server = self._scp(require_called_aet=True)
        try:
            with pytest.raises(PermanentExportError, match="rejected the association permanently: called AE"):
                self._send(server, small_ct_files[0], ae_title="NOTPACS")
        finally:
            server.shutdown()

    def test_busy_peer_rejection_is_retried(self, small_ct_files: list[Path]) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        server = self._scp(maximum_associations=1)
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(CTImageStorage)
        held = holder.associate("127.0.0.1", server.server_address[1], ae_title="PACS")
        assert held.is_established
        try:
            with pytest.raises(
                ExportError, match="rejected the association for now: local limit exceeded"
            ) as info:
                self._send(server, small_ct_files[0])
            assert not isinstance(info.value, PermanentExportError)
        finally:
            held.release()
            server.shutdown()

    @pytest.mark.parametrize(
        ("status", "permanent"), [(0xA700, False), (0xA702, False), (0xC000, True), (0xA900, True)]
    )
    def test_store_status_decides_retry_or_park(
        self, small_ct_files: list[Path], status: int, permanent: bool
    ) -> None:
        server = self._scp(status=status)
        try:
            with pytest.raises(ExportError, match=f"status 0x{status:04X}") as info:
                self._send(server, small_ct_files[0])
        finally:
            server.shutdown()
        assert isinstance(info.value, PermanentExportError) is permanent
