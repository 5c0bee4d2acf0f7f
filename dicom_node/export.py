"""Exporters: send produced objects to their destinations (C-STORE SCU, STOW-RS).

Exporters are registered by target type, as in mercure: "dicom" (C-STORE) and
"dicomweb" (STOW-RS). A failure a retry may cure raises ExportError, which the
worker retries with backoff and finally parks in DEAD_LETTER; a refusal a retry
cannot change raises PermanentExportError, parked in DEAD_LETTER at once.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.auth import read_bearer_token
from dicom_node.config import ExportTarget
from dicom_node.errors import (
    DUPLICATE_SOP_INSTANCE,
    FAILURE_REASONS,
    TRANSIENT_HTTP_STATUSES,
    ExportError,
    PermanentExportError,
    dimse_status_is_transient,
    failure_reason_is_transient,
)
from radbridge_common.settings import ConfigError
from radbridge_common.tls import client_context

logger = logging.getLogger(__name__)
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
Exporter = Callable[[Sequence[Path], ExportTarget, str], None]


def tls_args(target: ExportTarget) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a target with DICOM TLS, else None; the node calls it for
    every target at start-up, so a bad file is a TlsConfigError then, not a failed export."""
    if target.type != "dicom" or not target.uses_tls:
        return None
    context = client_context(target.tls_ca_file, target.tls_cert_file, target.tls_key_file)
    return context, target.tls_server_name or target.host


def requests_tls(target: ExportTarget) -> tuple[str | bool, tuple[str, str] | None]:
    """requests' ``verify`` and ``cert`` for an https dicomweb target."""
    verify: str | bool = str(target.tls_ca_file) if target.tls_ca_file is not None else True
    if target.tls_cert_file is not None and target.tls_key_file is not None:
        return verify, (str(target.tls_cert_file), str(target.tls_key_file))
    return verify, None


def send_cstore(
    paths: Sequence[Path],
    target: ExportTarget,
    calling_ae: str,
    *,
    then: Callable[[Association], None] | None = None,
    contexts: Sequence[str] = (),
    handlers: Sequence[tuple[Any, ...]] = (),
) -> None:
    """One association, one C-STORE per file; any non-success status is an ExportError.

    With DICOM TLS the files are read again for each export (a renewed certificate is used
    without a restart); a handshake the peer refuses is an ExportError, retried. ``then`` runs
    on the same association after every C-STORE succeeded (Storage Commitment's N-ACTION), with
    ``contexts`` (more SOP classes) proposed and ``handlers`` bound for it.
    """
    tls = tls_args(target)
    ae = AE(ae_title=target.calling_ae_title or calling_ae)
    stored: set[tuple[str, str]] = set()
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        stored.add((str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    for sop_class in sorted({c for c, _ in stored}):
        syntaxes = sorted(
            {ts for c, ts in stored if c == sop_class} | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        )
        ae.add_requested_context(sop_class, syntaxes)
    for sop_class in contexts:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{target.ae_title}@{target.host}:{target.port}" + (" (TLS)" if tls else "")
    try:
        assoc = ae.associate(
            target.host, target.port, ae_title=target.ae_title, tls_args=tls, evt_handlers=list(handlers)
        )
    except Exception as exc:
        raise ExportError(f"Cannot connect to {where}: {exc}") from exc
    if assoc.is_rejected:
        raise association_rejection(assoc, where)
    if not assoc.is_established:
        hint = (
            " TLS handshake failed or the peer closed: check its certificate against tls_ca_file,"
            " tls_server_name, and whether it requires our client certificate."
            if tls
            else " If the peer expects DICOM TLS, set tls = true on this target."
        )
        raise ExportError(f"Association with {where} was not established (no answer or aborted).{hint}")
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code not in SUCCESS_STATUSES:
                comment = status.get("ErrorComment", "") if status else "no response"
                detail = f"C-STORE to {target.ae_title} failed: status {_hex(code)} {comment}".strip()
                if code is not None and not dimse_status_is_transient(int(code)):
                    raise PermanentExportError(detail)
                raise ExportError(detail)
        if then is not None:
            then(assoc)
    finally:
        if assoc.is_established:
            assoc.release()


#: A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 = rejected-permanent, 2 = rejected-transient; the
#: diagnostic by source: 1 service user, 2 service provider (ACSE), 3 service provider (presentation).
_REJECT_REASONS = {
    1: {1: "no reason given", 2: "application context name not supported",
        3: "calling AE title not recognised", 7: "called AE title not recognised"},
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}  # fmt: skip


def _hex(code: object) -> str:
    return f"0x{code:04X}" if isinstance(code, int) else repr(code)


def association_rejection(assoc: object, where: str) -> ExportError:
    """A refused association: an unknown AE (rejected-permanent) is parked at once, a busy peer
    (rejected-transient: congestion, local limit exceeded) is retried."""
    primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    result = getattr(primitive, "result", None)
    source = getattr(primitive, "result_source", None)
    diagnostic = getattr(primitive, "diagnostic", None)
    reason = _REJECT_REASONS.get(source, {}).get(diagnostic, f"source {source}, diagnostic {diagnostic}")
    if result == 1:
        return PermanentExportError(f"{where} rejected the association permanently: {reason}.")
    return ExportError(f"{where} rejected the association for now: {reason}.")


#: requests errors of the transport: the peer may be back on a later attempt.
_TRANSIENT_REQUEST_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
#: requests errors that mean the request itself is wrong (a retry sends the same thing).
_PERMANENT_REQUEST_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
    requests.exceptions.TooManyRedirects,
)
_MAX_LISTED_FAILURES = 10


def safe_location(url: str) -> str:
    """host:port of a URL, without credentials or path (what the logs and messages name)."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port out of range: the request fails later, permanently
        return f"{parts.hostname}"
    return f"{parts.hostname}:{port}"


def _dicom_json(response: requests.Response) -> Dataset:
    """The STOW-RS response dataset; empty when the body is absent or not application/dicom+json."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not response.content or media_type not in ("application/dicom+json", "application/json"):
        return Dataset()
    try:
        body = response.json()
        return Dataset.from_json(body[0] if isinstance(body, list) and body else body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return Dataset()


def _failures(body: Dataset) -> list[tuple[str, int | None]]:
    """(ReferencedSOPInstanceUID, FailureReason) of each FailedSOPSequence item."""
    return [
        (str(item.get("ReferencedSOPInstanceUID", "?")), item.get("FailureReason"))
        for item in body.get("FailedSOPSequence", [])
    ]


def _describe(reason: int | None) -> str:
    if reason is None:
        return "no FailureReason"
    return f"FailureReason 0x{reason:04X} ({FAILURE_REASONS.get(reason, 'unknown')})"


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds an HTTP Retry-After header asks for (RFC 9110 10.2.3: delay-seconds or an
    HTTP-date), or None when absent or unreadable."""
    if not value or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT; a date without a zone is read as such
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _stow_outcome(response: requests.Response, sent: Sequence[str], where: str) -> None:
    """Return if every instance sent is stored; else raise ExportError or PermanentExportError."""
    status = response.status_code
    body = _dicom_json(response)
    stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in body.get("ReferencedSOPSequence", [])}
    failed = _failures(body)
    stored |= {uid for uid, reason in failed if reason == DUPLICATE_SOP_INSTANCE}
    failed = [(uid, reason) for uid, reason in failed if reason != DUPLICATE_SOP_INSTANCE]
    head = f"STOW-RS to {where} answered HTTP {status} {response.reason or ''}".rstrip()
    listed = "; ".join(f"{uid} {_describe(reason)}" for uid, reason in failed[:_MAX_LISTED_FAILURES])
    if len(failed) > _MAX_LISTED_FAILURES:
        listed += f"; and {len(failed) - _MAX_LISTED_FAILURES} more"
    detail = f"{head}: {len(failed)} of {len(sent)} instance(s) failed: {listed}" if failed else head
    missing = [uid for uid in sent if uid not in stored]
    if (200 <= status < 300 or status == 409) and not failed and not missing:
        return  # 409 too when every "failure" was a duplicate of an instance already stored there
    if 200 <= status < 300 and not failed:
        # A success without the per-instance acknowledgement (e.g. a URL that is not a STOW-RS
        # service answering 200 with a web page): the objects may not be stored, and a resend
        # reaches the same endpoint.
        raise PermanentExportError(
            f"{head} but its ReferencedSOPSequence does not list {len(missing)} of {len(sent)} instance(s)."
        )
    if status in TRANSIENT_HTTP_STATUSES:
        wait = retry_after_s(response.headers.get("Retry-After"))
        raise ExportError(
            detail if wait is None else f"{detail} (Retry-After: {wait:g} s)", retry_after_s=wait
        )
    if failed and (200 <= status < 300 or status == 409):
        # 202 (some stored) or 409 (none stored): the per-instance reasons decide. One permanent
        # failure parks the job: resending cannot get every instance stored.
        # A failure without a FailureReason counts as an unknown code: retried, within max_attempts.
        if all(reason is None or failure_reason_is_transient(reason) for _, reason in failed):
            raise ExportError(detail)
        raise PermanentExportError(detail)
    raise PermanentExportError(detail)


def bearer_token(target: ExportTarget) -> str:
    """The target's bearer token ("" when it has none), read at each export so that a rotated
    token is picked up. A configured but missing token is permanent: a retry sends the same nothing."""
    try:
        return read_bearer_token(target.token_file, target.token_env, f"STOW-RS target {safe_location(target.url)}")
    except ConfigError as exc:
        raise PermanentExportError(str(exc)) from exc


def send_stow(paths: Sequence[Path], target: ExportTarget, calling_ae: str) -> None:
    """One STOW-RS request (POST {url}/studies) with every file; each instance must be acknowledged.

    dicomweb-client's own retries are off: the worker retries with its backoff
    and parks the job in DEAD_LETTER, so a retry policy exists only once.
    """
    where = safe_location(target.url)
    token = bearer_token(target)
    datasets = [pydicom.dcmread(path) for path in paths]
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    responses: list[requests.Response] = []
    status: int | str = "no response"
    stored = False
    started = time.monotonic()
    try:
        with requests.Session() as session:
            if target.uses_tls:
                session.verify, session.cert = requests_tls(target)
            # dicomweb-client reads the body only on success: keep the response for 202/409/4xx.
            session.hooks["response"].append(lambda r, *args, **kwargs: responses.append(r))
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            try:
                client = DICOMwebClient(url=target.url, session=session, timeout=target.timeout_s)
            except ValueError as exc:
                status = "invalid url"
                raise PermanentExportError(f"STOW-RS target {where}: the URL is malformed.") from exc
            client.set_http_retry_params(retry=False)
            try:
                client.store_instances(datasets=datasets)
            except _TRANSIENT_REQUEST_ERRORS as exc:
                status = type(exc).__name__
                raise ExportError(f"STOW-RS to {where} failed: {type(exc).__name__}.") from exc
            except _PERMANENT_REQUEST_ERRORS as exc:
                status = type(exc).__name__
                raise PermanentExportError(
                    f"STOW-RS to {where} cannot be sent: {type(exc).__name__}."
                ) from exc
            except (requests.exceptions.RequestException, ValueError, KeyError) as exc:
                # HTTPError (4xx/5xx), or a body dicomweb-client could not read: judged below.
                if not responses:
                    status = type(exc).__name__
                    raise ExportError(f"STOW-RS to {where} failed: {type(exc).__name__}.") from exc
            status = responses[-1].status_code
            _stow_outcome(responses[-1], sent, where)
            stored = True
    finally:
        logger.log(
            logging.INFO if stored else logging.WARNING,
            "stow-rs export",
            extra={
                "event": "export.stow",
                "target": where,
                "status": status,
                "instances": len(sent),
                "duration_ms": round(1000 * (time.monotonic() - started)),
            },
        )


EXPORTERS: dict[str, Exporter] = {"dicom": send_cstore, "dicomweb": send_stow}


def export(paths: Sequence[Path], target: ExportTarget, calling_ae: str) -> None:
    try:
        exporter = EXPORTERS[target.type]
    except KeyError as exc:
        raise ExportError(f"No exporter for target type {target.type!r}.") from exc
    exporter(paths, target, calling_ae)
