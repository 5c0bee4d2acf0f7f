"""STOW-RS in (PS3.18 §10.5): ``POST /studies`` and ``POST /studies/{study}``.

The multipart/related body is parsed as a stream (python-multipart's
``MultipartParser`` fed from ``request.stream()``): each part goes straight to
a staging file in the spool, never whole into memory. A finished part is
decoded (header only), checked like a C-STORE, moved into the spool (fsync,
rename, fsync dir) and indexed before the response is sent, so it feeds the
same completion, routing and jobs. Answers: 200 all stored, 202 some failed
(FailedSOPSequence with a FailureReason each), 409 none stored, 400 bad
syntax, 413 too large, 415 wrong media type; instances stored before a
request-level error stay stored and are listed in the body.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import pydicom
from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicom_node.attributes import identifiers, searchable_attributes
from dicom_node.config import HttpSection
from dicom_node.errors import (
    InvalidInstance,
    RadBridgeError,
    SpoolFull,
    StowRequestError,
    StudyMismatch,
    UndecodableInstance,
    to_stow_failure,
)
from dicom_node.index import Index
from dicom_node.metrics import BYTES_RECEIVED, INSTANCES_RECEIVED, INSTANCES_REFUSED, STOW_REQUESTS
from dicom_node.spool import Spool, open_private, uid_key

logger = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
PART_TYPE = "application/dicom"
PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass
class _Part:
    """One part being received: its headers, its staging file and its size."""

    path: Path
    handle: IO[bytes] | None
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    too_large: bool = False
    head: bytes = b""  # the first bytes, held until the preamble question is settled
    started: bool = False


@dataclass
class StowOutcome:
    """What one request stored and what it refused, in arrival order."""

    stored: list[tuple[str, str, str, str]] = field(default_factory=list)  # (class, instance, study, series)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (class, instance, reason)

    def studies(self) -> list[str]:
        return sorted({study for _, _, study, _ in self.stored})


def multipart_boundary(content_type: str) -> bytes:
    """Check the media type (415) and return the boundary (400 if absent)."""
    media, params = parse_options_header(content_type)
    part_type = params.get(b"type", b"").decode("latin-1").strip().lower()
    if media != b"multipart/related" or part_type not in ("", PART_TYPE):
        raise StowRequestError(
            415, f'Content-Type must be multipart/related; type="{PART_TYPE}" (got {content_type[:100]!r}).'
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise StowRequestError(400, "The multipart/related Content-Type has no boundary parameter.")
    return boundary


class StowReceiver:
    """Turns one request body into stored instances; one object per request."""

    def __init__(self, spool: Spool, index: Index, settings: HttpSection, study: str | None) -> None:
        self.spool = spool
        self.index = index
        self.settings = settings
        self.study = study
        self.outcome = StowOutcome()
        self._current: _Part | None = None
        self._header_field = b""
        self._header_value = b""
        self._finished: list[_Part] = []
        self._ended = False

    # -- parser callbacks (synchronous, small writes to the page cache) ----------------
    def _on_part_begin(self) -> None:
        path = self.spool.staging_path()
        self._current = _Part(path=path, handle=open_private(path))  # closed at part end; mode 0600

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._current is not None:
            name = self._header_field.decode("latin-1").strip().lower()
            self._current.headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field = self._header_value = b""

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None or part.handle is None:
            return
        part.size += end - start
        if part.size > self.settings.max_part_bytes:
            part.too_large = True
            part.handle.close()
            part.handle = None
            part.path.unlink(missing_ok=True)
            return
        if part.started:
            part.handle.write(data[start:end])
            return
        part.head += data[start:end]
        if len(part.head) >= len(PREAMBLE):
            self._start_file(part)

    @staticmethod
    def _start_file(part: _Part) -> None:
        """Store a PS3.10 file: some clients (dicomweb-client) send the meta group without the
        preamble and "DICM"; put them back so the spool holds files every tool reads."""
        assert part.handle is not None
        if part.head[128:132] != b"DICM" and part.head[:2] == b"\x02\x00":
            part.handle.write(PREAMBLE)
        part.handle.write(part.head)
        part.head = b""
        part.started = True

    def _on_part_end(self) -> None:
        part = self._current
        if part is not None:
            if part.handle is not None:
                if not part.started:
                    self._start_file(part)
                part.handle.close()
                part.handle = None
            self._finished.append(part)
        self._current = None

    def _on_end(self) -> None:
        self._ended = True

    def parser(self, boundary: bytes) -> MultipartParser:
        return MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_end": self._on_end,
            },  # type: ignore[arg-type]
        )

    # -- per part: decode, check, spool, index (in a worker thread: fsync blocks) ---------
    def commit_finished(self) -> None:
        parts, self._finished = self._finished, []
        for part in parts:
            self._commit(part)

    def _commit(self, part: _Part) -> None:
        sop_class = sop_instance = ""
        try:
            if part.too_large:
                raise StowPartTooLarge(f"Part larger than {self.settings.max_part_bytes} bytes.")
            media = part.headers.get("content-type", PART_TYPE).split(";")[0].strip().lower()
            if media != PART_TYPE:
                raise InvalidInstance(f"Part media type {media!r} is not {PART_TYPE}.")
            ds = _read_header(part.path)
            sop_class, sop_instance = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
            values = identifiers(ds)
            if self.study and values["StudyInstanceUID"] != self.study:
                raise StudyMismatch("Instance belongs to another study than the request's target.")
            ref = self.spool.store_staged(
                part.path,
                sop_instance_uid=values["SOPInstanceUID"],
                sop_class_uid=values["SOPClassUID"],
                study_instance_uid=values["StudyInstanceUID"],
                series_instance_uid=values["SeriesInstanceUID"],
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
            # Not synced, as for C-STORE: the fsynced file is the record (dicom_node.recovery).
            self.index.add_instance(ref, values["Modality"], "", attributes=searchable_attributes(ds), synced=False)
        except Exception as exc:  # every failure becomes this part's FailureReason
            reason = to_stow_failure(exc)
            self.outcome.failed.append((sop_class, sop_instance, reason))
            INSTANCES_REFUSED.labels(via="stow", status=f"0x{reason:04X}").inc()
            if isinstance(exc, RadBridgeError):
                logger.warning(
                    "STOW-RS part refused",
                    extra={"event": "stow.part", "status": f"0x{reason:04X}", "reason": str(exc)[:200]},
                )
            else:
                logger.error(
                    "STOW-RS part failed",
                    exc_info=True,
                    extra={"event": "stow.part", "status": f"0x{reason:04X}"},
                )
            with contextlib.suppress(OSError):
                part.path.unlink(missing_ok=True)
            return
        self.outcome.stored.append(
            (values["SOPClassUID"], values["SOPInstanceUID"], ref.study_instance_uid, ref.series_instance_uid)
        )
        INSTANCES_RECEIVED.labels(via="stow").inc()
        BYTES_RECEIVED.labels(via="stow").inc(ref.size)

    def discard_open_part(self) -> None:
        """A request cut short: its unfinished part was never acknowledged; drop it."""
        part = self._current
        if part is not None:
            if part.handle is not None:
                part.handle.close()
            part.path.unlink(missing_ok=True)
        self._current = None


class StowPartTooLarge(InvalidInstance):
    """One part exceeds http.max_part_bytes: refused as out of resources for this instance."""

    status = 0xA700


def _read_header(path: Path) -> Dataset:
    """The header of a PS3.10 file (preamble + meta required): anything else is not DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        _ = ds.file_meta.TransferSyntaxUID
    except Exception as exc:  # untrusted bytes
        raise UndecodableInstance("Cannot understand: part is not a DICOM PS3.10 file") from exc
    return ds


def _response_dataset(outcome: StowOutcome, base_url: str) -> dict[str, Any]:
    """The STOW-RS response (PS3.18 Table 10.5.3-2) as DICOM JSON."""
    ds = Dataset()
    studies = outcome.studies()
    if len(studies) == 1:
        ds.RetrieveURL = f"{base_url}/studies/{studies[0]}"
    ds.FailedSOPSequence = []
    for sop_class, sop_instance, reason in outcome.failed:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.FailureReason = reason
        ds.FailedSOPSequence.append(item)
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance, study, series in outcome.stored:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.RetrieveURL = f"{base_url}/studies/{study}/series/{series}/instances/{sop_instance}"
        ds.ReferencedSOPSequence.append(item)
    return ds.to_json_dict()


def status_of(outcome: StowOutcome) -> int:
    if outcome.failed and outcome.stored:
        return 202
    if outcome.failed:
        return 409
    return 200


class _DicomJSONResponse(JSONResponse):
    media_type = DICOM_JSON


async def receive(
    request: Request,
    spool: Spool,
    index: Index,
    settings: HttpSection,
    base_url: str,
    study: str | None = None,
) -> Response:
    """Handle one STOW-RS request (see module docstring); the only place HTTP codes are chosen."""
    started = time.monotonic()
    receiver = StowReceiver(spool, index, settings, study)
    received = 0
    try:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            raise StowRequestError(413, f"Request body larger than {settings.max_request_bytes} bytes.")
        parser = receiver.parser(multipart_boundary(request.headers.get("content-type", "")))
        try:
            spool.check_space(int(length) if length is not None and length.isdigit() else 0)
        except SpoolFull as exc:
            raise StowRequestError(503, str(exc), retry_after_s=exc.retry_after_s) from exc
        async for chunk in request.stream():
            received += len(chunk)
            if received > settings.max_request_bytes:
                raise StowRequestError(413, f"Request body larger than {settings.max_request_bytes} bytes.")
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise StowRequestError(400, f"Malformed multipart body: {exc}") from exc
            if receiver._finished:
                await anyio.to_thread.run_sync(receiver.commit_finished)
        try:
            parser.finalize()
        except MultipartParseError as exc:
            raise StowRequestError(400, f"Malformed multipart body: {exc}") from exc
        await anyio.to_thread.run_sync(receiver.commit_finished)
        if not receiver._ended:
            raise StowRequestError(400, "Truncated multipart body: the closing boundary is missing.")
        if not receiver.outcome.stored and not receiver.outcome.failed:
            raise StowRequestError(400, "The request holds no DICOM part.")
    except StowRequestError as exc:
        receiver.discard_open_part()
        # Parts that were complete when the error came (e.g. a malformed header in the same chunk)
        # are stored and listed, as when the error comes in a later chunk; never left in staging.
        await anyio.to_thread.run_sync(receiver.commit_finished)
        outcome = receiver.outcome
        logger.warning(
            "STOW-RS request refused",
            extra={
                "event": "stow",
                "status": exc.http_status,
                "reason": str(exc),
                "stored": len(outcome.stored),
            },
        )
        body: dict[str, Any] = {"error": {"code": exc.http_status, "message": str(exc)}}
        if outcome.stored or outcome.failed:
            body["result"] = _response_dataset(outcome, base_url)
        STOW_REQUESTS.labels(status=str(exc.http_status)).inc()
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return JSONResponse(body, status_code=exc.http_status, headers=headers)
    outcome = receiver.outcome
    if settings.stow_completes_study:
        for study_uid in outcome.studies():
            await anyio.to_thread.run_sync(index.complete_study, study_uid, 0.0)
    code = status_of(outcome)
    STOW_REQUESTS.labels(status=str(code)).inc()
    logger.info(
        "STOW-RS request",
        extra={
            "event": "stow",
            "status": code,
            "stored": len(outcome.stored),
            "failed": len(outcome.failed),
            "bytes": received,
            "study_key": ",".join(uid_key(s) for s in outcome.studies())[:200],
            "duration_ms": round(1000 * (time.monotonic() - started), 1),
        },
    )
    return _DicomJSONResponse(_response_dataset(outcome, base_url), status_code=code)
