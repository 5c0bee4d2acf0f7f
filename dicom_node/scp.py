"""The DICOM SCP: C-ECHO, C-STORE of every storage SOP class and transfer syntax, and
Study Root Query/Retrieve C-FIND and C-MOVE over the spool (dicom_node.query).

The C-STORE handler does I/O only: the data set, as sent, goes to a
``*.partial`` file in the spool's staging directory (written by the handler, or,
with scp.stream_to_disk, streamed there by pynetdicom while it arrives); the
handler reads only its header (identifiers, searchable attributes), fsyncs the
file, renames it into place, and a group commit (dicom_node.group_commit)
fsyncs the directory and records the index row; only then is 0x0000 returned.
Failures become a specific DIMSE status with an Error Comment
(errors.to_dimse_status).

Before a connection reaches pynetdicom, GuardedAssociationServer bounds what an
unassociated peer can hold: connections per IP address, the wait for the whole
A-ASSOCIATE-RQ (the ARTIM timer) and that PDU's announced length. With DICOM
TLS (scp.tls_cert_file) the same bounds hold: the TLS handshake happens in the
connection's thread within the same time limit (never in the accepting thread),
then the first PDU is read through TLS, checked, and replayed to pynetdicom.
Called AE titles other than scp.ae_title are rejected (scp.require_called_aet).

The SCP also takes the Storage Commitment reports (N-EVENT-REPORT) a PACS sends for the node's
exports on a new association (dicom_node.commitment), granting the SCP role the PACS proposes.

Two acceptors share the port: once the guard holds a whole A-ASSOCIATE-RQ, a storage-only
association (C-STORE, C-ECHO) that the node would accept is served by dicom_node.lean_scp in the
connection's thread (LeanAcceptor, ``scp.lean_store``); every other goes to pynetdicom, unread.
Both end in ``store_staged``.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, acse, dimse_messages, evt, presentation
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import lean_scp, reactor
from dicom_node.attributes import check_identifiers, check_uid, identifiers, searchable_attributes
from dicom_node.commitment import handle_event_report, refuse_action
from dicom_node.config import ScpSection
from dicom_node.errors import (
    InvalidInstance,
    RadBridgeError,
    StorageError,
    UndecodableInstance,
    to_dimse_status,
)
from dicom_node.group_commit import GroupCommitter
from dicom_node.header import read_header
from dicom_node.index import Index, ReceivedInstance
from dicom_node.metrics import ASSOCIATIONS, BYTES_RECEIVED, INSTANCES_RECEIVED, INSTANCES_REFUSED
from dicom_node.nodelay import set_nodelay
from dicom_node.part10 import file_preamble
from dicom_node.query import handle_find, handle_move
from dicom_node.receivers import ReceiverPool
from dicom_node.spool import TMP_SUFFIX, Spool, open_private, uid_key
from dicom_node.staging import StagingFiles
from radbridge_common.tls import server_context

logger = logging.getLogger(__name__)

A_ASSOCIATE_RQ_PDU_TYPE = 0x01
_PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length of what follows (PS3.8 9.3.1)
_POLL_S = 0.05
#: Why a connection is refused before pynetdicom sees it, and details for the log line.
Refusal = tuple[str, dict[str, int | str]]


#: Where pynetdicom streams incoming C-STORE data sets (see configure_pynetdicom).
_staging_dir: Path | None = None
#: Elements larger than this stay on disk while the header is read (the pixel data is never read).
_HEADER_DEFER_BYTES = 64 * 1024


def _staged_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile for received data sets, put in the spool's staging
    directory (same file system: the file is renamed into place, never copied) and named
    ``*.partial`` so that a crash's leftovers are removed at start (Spool.remove_partials)."""
    kwargs.update(suffix=TMP_SUFFIX, prefix="cstore-", dir=_staging_dir)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def _negotiate_keeping_roles(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict[Any, tuple[bool | None, bool | None]] | None = None,
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """pynetdicom 3.0's ``negotiate_unrestricted`` returns the SCP/SCU Role Selection replies of
    the storage contexts only and drops those of the others it negotiates normally. A PACS that
    proposes the SCP role to send its N-EVENT-REPORT (Orthanc does) would get no reply item, which
    means the default roles (it as SCU): here the replies of the non-storage contexts are kept."""
    result, storage_roles = presentation.negotiate_unrestricted(rq_contexts, ac_contexts, roles)
    _, other_roles = presentation.negotiate_as_acceptor(
        [cx for cx in rq_contexts if str(cx.abstract_syntax) == StorageCommitmentPushModel], ac_contexts, roles
    )
    replies = {str(r.sop_class_uid): r for r in [*storage_roles, *other_roles]}
    return result, [replies[uid] for uid in sorted(replies)]


def configure_pynetdicom(staging_dir: Path | None = None) -> None:
    """Process-wide pynetdicom switches: no identifiers in logs, accept unknown storage classes,
    event-driven association loops (dicom_node.reactor), and stream each received C-STORE data set to a file in ``staging_dir`` as its PDUs arrive
    (no copy of the instance in memory; the handler reads only the header)."""
    global _staging_dir
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    acse.negotiate_unrestricted = _negotiate_keeping_roles  # type: ignore[attr-defined]
    if staging_dir is not None:
        _staging_dir = staging_dir
        dimse_messages.NamedTemporaryFile = _staged_file  # type: ignore[attr-defined]
    _config.STORE_RECV_CHUNKED_DATASET = staging_dir is not None
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    reactor.install()


def _staged(event: evt.Event, spool: Spool) -> Path:
    """The received instance as a file (preamble, file meta, data set as sent)."""
    if _config.STORE_RECV_CHUNKED_DATASET:
        return Path(event.dataset_path)
    staged = spool.staging_path()  # not streamed (the switch was turned off): write it out
    request = event.request
    try:
        with open_private(staged) as fh:
            fh.write(
                file_preamble(
                    str(request.AffectedSOPClassUID),
                    str(request.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                )
            )
            fh.write(request.DataSet.getbuffer())  # as sent, no copy
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise StorageError(f"Out of resources: cannot write spool ({exc.strerror})") from exc
    return staged


def _header(path: Path, sop_instance_uid: str) -> tuple[Dataset, dict[str, str]]:
    try:
        ds = dcmread(path, stop_before_pixels=True, defer_size=_HEADER_DEFER_BYTES)
    except Exception as exc:  # any decode failure of untrusted bytes
        raise UndecodableInstance("Cannot understand: dataset could not be decoded") from exc
    values = identifiers(ds)
    if values["SOPInstanceUID"] != sop_instance_uid:
        raise InvalidInstance("SOPInstanceUID does not match the C-STORE request")
    return ds, values


def handle_store(
    event: evt.Event, spool: Spool, index: Index, committer: GroupCommitter | None = None
) -> Dataset | int:
    """pynetdicom's C-STORE handler: the data set as a staged file, then ``store_staged``."""
    # The peer: the requestor, or the acceptor when the C-STORE comes back on our own C-GET
    # association (dicom_node.retrieve reuses this handler).
    assoc = event.assoc
    peer_ae = (assoc.acceptor if assoc.is_requestor else assoc.requestor).ae_title
    sop_class_uid = str(event.request.AffectedSOPClassUID or "")
    sop_instance_uid = str(event.request.AffectedSOPInstanceUID or "")
    transfer_syntax = str(event.context.transfer_syntax)
    try:
        # pynetdicom writes these into the File Meta group and refuses to encode invalid ones.
        check_uid(sop_class_uid, "Affected SOP Class UID")
        check_uid(sop_instance_uid, "Affected SOP Instance UID")
        staged = _staged(event, spool)
    except RadBridgeError as exc:
        return _refused(exc, _log_fields(peer_ae, sop_class_uid, transfer_syntax))
    return store_staged(
        staged,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        peer_ae=peer_ae,
        spool=spool,
        index=index,
        committer=committer or GroupCommitter(index),
        owned=not _config.STORE_RECV_CHUNKED_DATASET,  # pynetdicom removes the files it streamed
    )


def _log_fields(peer_ae: str, sop_class_uid: str, transfer_syntax: str) -> dict[str, Any]:
    return {"event": "cstore", "peer_ae": peer_ae, "sop_class": sop_class_uid, "transfer_syntax": transfer_syntax}


def _refused(exc: BaseException, log: dict[str, Any]) -> Dataset:
    status = to_dimse_status(exc)
    INSTANCES_REFUSED.labels(via="dimse", status=f"0x{status.Status:04X}").inc()
    if isinstance(exc, RadBridgeError):
        logger.warning(
            "C-STORE refused", extra={**log, "status": f"0x{status.Status:04X}", "reason": status.ErrorComment}
        )
    else:  # e.g. SQLite failure: never answer success
        logger.error("C-STORE failed", exc_info=exc, extra={**log, "status": f"0x{status.Status:04X}"})
    return status


@dataclass(frozen=True)
class EarlyHeader:
    """The header read from a data set's first bytes (dicom_node.header): its identifiers and
    searchable attributes, or the error that will refuse it; neither when the bytes cannot give
    them (the file is read instead)."""

    values: dict[str, str] | None = None
    attributes: dict[str, Any] | None = None
    error: Exception | None = None


_DIMSE_INSTANCES = INSTANCES_RECEIVED.labels(via="dimse")  # looked up once: .labels() hashes and locks
_DIMSE_BYTES = BYTES_RECEIVED.labels(via="dimse")


def early_header(head: bytes | bytearray, transfer_syntax: str, sop_instance_uid: str) -> EarlyHeader:
    """Read and check the header from ``head``; the lean acceptor calls this as soon as the first
    64 KiB have arrived, while the rest of the data set is still on its way."""
    try:
        lean = read_header(head, transfer_syntax)
        if lean is None:
            return EarlyHeader()
        values, attributes = lean
        check_identifiers(values)
        if values["SOPInstanceUID"] != sop_instance_uid:
            raise InvalidInstance("SOPInstanceUID does not match the C-STORE request")
        return EarlyHeader(values, attributes)
    except Exception as exc:  # noqa: BLE001 - refused by store_staged, with the others
        return EarlyHeader(error=exc)


def store_staged(
    staged: Path,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    peer_ae: str,
    spool: Spool,
    index: Index,
    committer: GroupCommitter,
    owned: bool = True,
    head: bytes | bytearray | None = None,
    early: EarlyHeader | None = None,
    index_now: bool = True,
    fd: int | None = None,
) -> Dataset | int:
    """Spool one received instance durably, index it, then give the status to answer with.

    ``staged`` is the whole Part 10 file as received (UIDs already checked); ``owned``: remove it
    if it is not placed. Both acceptors call this: pynetdicom's handler and dicom_node.lean_scp.
    ``head`` is the data set's first bytes, kept in memory by the lean acceptor: the header is read
    from them (dicom_node.header) where it can be, else from the file; ``early``: that header,
    already read while the data set arrived (``early_header``); ``index_now=False``: the index row
    is left to ``committer.index_pending()``, which the caller calls once it has answered
    (dicom_node.group_commit); ``fd``: the staged file, still open for writing (its fsync needs no
    second open; the caller closes it).
    """
    started = time.monotonic()
    log = _log_fields(peer_ae, sop_class_uid, transfer_syntax)
    try:
        if early is None and head is not None:
            early = early_header(head, transfer_syntax, sop_instance_uid)
        if early is not None and early.error is not None:
            raise early.error
        if early is None or early.values is None or early.attributes is None:
            ds, values = _header(staged, sop_instance_uid)
            attributes = searchable_attributes(ds)
        else:
            values, attributes = early.values, early.attributes
        # fsync(file) + rename here, in this association's thread; fsync(dir) + index row in a group.
        ref = spool.place_staged(
            staged,
            sop_instance_uid=values["SOPInstanceUID"],
            sop_class_uid=values["SOPClassUID"],
            study_instance_uid=values["StudyInstanceUID"],
            series_instance_uid=values["SeriesInstanceUID"],
            transfer_syntax_uid=transfer_syntax,
            fd=fd,
        )
        owned = False
        committer.commit(ReceivedInstance(ref, values["Modality"], peer_ae, attributes), index_now=index_now)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a DIMSE status, never success
        return _refused(exc, log)
    finally:
        if owned:
            staged.unlink(missing_ok=True)
    _DIMSE_INSTANCES.inc()
    _DIMSE_BYTES.inc(ref.size)
    if not logger.isEnabledFor(logging.DEBUG):  # the line's fields cost a hash each: only when logged
        return 0x0000
    logger.debug(
        "C-STORE stored",
        extra={
            **log,
            "study_key": uid_key(values["StudyInstanceUID"]),
            "bytes": ref.size,
            "duration_ms": round(1000 * (time.monotonic() - started), 1),
            "status": "0x0000",
        },
    )
    return 0x0000


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def handle_accepted(event: evt.Event) -> None:
    ASSOCIATIONS.labels(acceptor="pynetdicom").inc()


def handle_rejected(event: evt.Event) -> None:
    rj = event.assoc.acceptor.primitive
    logger.warning(
        "Association rejected",
        extra={
            "event": "scp.association_rejected",
            "peer_address": event.assoc.requestor.address,
            "peer_ae": event.assoc.requestor.ae_title,
            "result": rj.result,
            "source": rj.result_source,
            "diagnostic": rj.diagnostic,  # source 3, diagnostic 2: local limit exceeded
        },
    )


class GuardedAssociationServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer that bounds what a peer can hold before it has associated.

    pynetdicom starts an association thread for every accepted connection, counts it
    against ``AE.maximum_associations`` while it waits ``AE.acse_timeout`` (30 s) for the
    A-ASSOCIATE-RQ, and reads a PDU's body with a blocking ``recv`` of whatever length
    its header announces. Here, before pynetdicom sees a connection:

    - at most ``max_per_peer`` connections (waiting or associated) per IP address; more
      are closed at once, in the accepting thread;
    - the peer has ``first_pdu_timeout_s`` to deliver a whole A-ASSOCIATE-RQ announcing
      at most ``max_first_pdu_bytes``. The bytes are only peeked (``MSG_PEEK``), so
      pynetdicom then reads a complete PDU. Anything else is closed unread.
    """

    request_queue_size = 64  # listen() backlog; socketserver's 5 drops SYNs (1 s client retry) in a burst

    def __init__(
        self,
        *args: Any,
        max_per_peer: int,
        first_pdu_timeout_s: float,
        max_first_pdu_bytes: int,
        tls_context: ssl.SSLContext | None = None,
        lean: LeanAcceptor | None = None,
        reuse_port: bool = False,
        handoff: Callable[[socket.socket, Any], None] | None = None,
        committer: GroupCommitter | None = None,
        **kwargs: Any,
    ) -> None:
        self.max_per_peer = max_per_peer
        self.committer = committer
        #: After the server is closed: whether every stored instance got its index row (here and in
        #: the receiver processes); if not, the stop must not be marked clean (dicom_node.recovery).
        self.all_indexed = True
        self.lean = lean
        self.reuse_port = reuse_port  # several processes accept on this port (dicom_node.receivers)
        self.handoff = handoff  # a receiver process: what the lean acceptor does not take goes to the node
        self.receivers: ReceiverPool | None = None
        self._lean_sockets: set[socket.socket] = set()  # served by the lean acceptor (still "waiting" per peer)
        self.tls_context = tls_context
        if tls_context is not None:
            tls_context.sslsocket_class = _ReplaySSLSocket  # what the guard reads, pynetdicom reads again
        self.first_pdu_timeout_s = first_pdu_timeout_s
        self.max_first_pdu_bytes = max_first_pdu_bytes
        self._waiting: Counter[str] = Counter()  # per IP: accepted, A-ASSOCIATE-RQ not yet handed over
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = client_address[0]
        with self._lock:
            associated = sum(1 for a in self.active_associations if _peer_address(a) == peer)
            if self._waiting[peer] + associated >= self.max_per_peer:
                _log_refused(peer, "peer_limit", limit=self.max_per_peer)
                return False  # socketserver closes it
            self._waiting[peer] += 1
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts process_request_thread
        except BaseException:
            self._done_waiting(client_address[0])
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = client_address[0]
        started = time.monotonic()
        try:
            if self.tls_context is not None:
                request, refusal = self._await_tls_associate_rq(request, self.tls_context)
            else:
                try:
                    refusal = self._await_associate_rq(request)
                except OSError:
                    refusal = "connection_error", {}
            if refusal is None:
                # As pynetdicom does for the sockets it connects: a stalled read or write ends.
                request.settimeout(self.ae.network_timeout)
                set_nodelay(request)  # responses are small writes: Nagle would hold them back
                if self._serve_lean(request, peer):
                    pass
                elif self.handoff is not None:
                    self.handoff(request, client_address)  # a receiver: the node process serves it
                elif not self._reject_if_full(request, peer):
                    super().process_request_thread(request, client_address)  # association thread
            else:
                reason, details = refusal
                _log_refused(peer, reason, duration_ms=round(1000 * (time.monotonic() - started)), **details)
                self.shutdown_request(request)
        finally:
            self._done_waiting(peer)

    def _serve_lean(self, request: socket.socket, peer: str) -> bool:
        """Serve a storage-only association with the lean acceptor (dicom_node.lean_scp); False
        (nothing read) if it does not qualify, for pynetdicom to take."""
        if self.lean is None:
            return False
        pdu = _buffered_associate_rq(request)
        if pdu is None:
            return False
        try:
            rq = lean_scp.parse_associate_rq(pdu)
        except lean_scp.ProtocolError:
            return False  # pynetdicom answers malformed PDUs as it always has
        accepted = lean_scp.negotiate(rq)
        if accepted is None or not self.lean.would_accept(rq):
            return False
        with self._lock:  # the per-peer count keeps it as "waiting" until its thread ends
            refuse = len(self.active_associations) + len(self._lean_sockets) >= self.ae.maximum_associations
            if not refuse:
                self._lean_sockets.add(request)
        if refuse:
            self.lean.reject_busy(request, rq, peer)
            return True
        ASSOCIATIONS.labels(acceptor="lean").inc()
        try:
            self.lean.serve(request, rq, accepted)
        finally:
            with self._lock:
                self._lean_sockets.discard(request)
        return True

    def _reject_if_full(self, request: socket.socket, peer: str) -> bool:
        """pynetdicom's own limit counts only its associations: past max_associations counting
        the lean acceptor's too, answer A-ASSOCIATE-RJ "local limit exceeded" here (True)."""
        if self.lean is None:
            return False
        with self._lock:
            acceptors = sum(1 for a in self.active_associations if a.is_acceptor)
            full = acceptors + len(self._lean_sockets) >= self.ae.maximum_associations
        if not full:
            return False
        pdu = _buffered_associate_rq(request)
        try:
            rq = lean_scp.parse_associate_rq(pdu) if pdu else None
        except lean_scp.ProtocolError:
            rq = None
        self.lean.reject_busy(request, rq, peer)
        return True

    def server_close(self) -> None:
        if self.receivers is not None:
            self.receivers.stop()
        self._closing.set()  # waiting connections give up within _POLL_S
        with self._lock:
            for sock in self._lean_sockets:  # their reads fail: the association ends, no partial kept
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        super().server_close()  # joins the association threads
        if self.lean is not None:
            self.lean.close()
        if self.committer is not None and not self.committer.drain():
            self.all_indexed = False
        if self.receivers is not None and not self.receivers.all_indexed:
            self.all_indexed = False

    def _done_waiting(self, peer: str) -> None:
        with self._lock:
            self._waiting[peer] -= 1
            if self._waiting[peer] <= 0:
                del self._waiting[peer]

    def _await_tls_associate_rq(
        self, request: socket.socket, context: ssl.SSLContext
    ) -> tuple[socket.socket, Refusal | None]:
        """The TLS socket, and None once the handshake is done and a whole A-ASSOCIATE-RQ is read
        (kept for pynetdicom to read again), else the reason to refuse."""
        deadline = time.monotonic() + self.first_pdu_timeout_s
        try:
            tls = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except OSError:
            return request, ("connection_error", {})
        try:
            tls.setblocking(False)
            refusal = self._tls_handshake(tls, deadline)
            if refusal is None:
                refusal = self._read_tls_associate_rq(tls, deadline)
        except ssl.SSLError as exc:  # a plaintext peer, no or an untrusted client certificate...
            refusal = "tls_handshake_failed", {"tls_error": exc.reason or type(exc).__name__}
        except OSError:
            refusal = "connection_error", {}
        return tls, refusal

    def _tls_handshake(self, tls: ssl.SSLSocket, deadline: float) -> Refusal | None:
        while not self._closing.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "tls_handshake_timeout", {}
            try:
                tls.do_handshake()
                return None
            except ssl.SSLWantReadError:
                select.select([tls], [], [], min(remaining, _POLL_S))
            except ssl.SSLWantWriteError:
                select.select([], [tls], [], min(remaining, _POLL_S))
        return "server_stopping", {}

    def _read_tls_associate_rq(self, tls: ssl.SSLSocket, deadline: float) -> Refusal | None:
        buffer, wanted, length = bytearray(), _PDU_HEADER.size, None
        while not self._closing.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "first_pdu_timeout", {"received_bytes": len(buffer)}
            try:
                data = tls.recv(wanted - len(buffer))
            except ssl.SSLWantReadError:
                select.select([tls], [], [], min(remaining, _POLL_S))
                continue
            except ssl.SSLWantWriteError:
                select.select([], [tls], [], min(remaining, _POLL_S))
                continue
            if not data:
                return "closed_before_associate_rq", {}
            buffer += data
            if length is None and len(buffer) == _PDU_HEADER.size:
                pdu_type, _, length = _PDU_HEADER.unpack(buffer)
                if pdu_type != A_ASSOCIATE_RQ_PDU_TYPE:
                    return "not_associate_rq", {"pdu_type": pdu_type}
                if length > self.max_first_pdu_bytes:
                    return "first_pdu_too_large", {"pdu_bytes": length, "limit": self.max_first_pdu_bytes}
                wanted += length
            if len(buffer) == wanted:
                tls._replay = bytes(buffer)  # type: ignore[attr-defined]  # see __init__
                return None
        return "server_stopping", {}

    def _await_associate_rq(self, request: socket.socket) -> Refusal | None:
        """None once a whole A-ASSOCIATE-RQ is buffered, else (reason, details) to refuse."""
        deadline = time.monotonic() + self.first_pdu_timeout_s
        wanted, length = _PDU_HEADER.size, None
        while not self._closing.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "first_pdu_timeout", {"received_bytes": len(_peek(request, wanted) or b"")}
            readable, _, _ = select.select([request], [], [], min(remaining, _POLL_S))
            if not readable:
                continue
            data = _peek(request, wanted)
            if data is None:
                continue
            if not data:
                return "closed_before_associate_rq", {}
            if length is None and len(data) == _PDU_HEADER.size:
                pdu_type, _, length = _PDU_HEADER.unpack(data)
                if pdu_type != A_ASSOCIATE_RQ_PDU_TYPE:
                    return "not_associate_rq", {"pdu_type": pdu_type}
                if length > self.max_first_pdu_bytes:
                    return "first_pdu_too_large", {"pdu_bytes": length, "limit": self.max_first_pdu_bytes}
                wanted += length
                _make_room(request, wanted)
            elif len(data) >= wanted:
                return None
            else:
                self._closing.wait(_POLL_S)  # a partial PDU: select would wake at once
        return "server_stopping", {}


class _ReplaySSLSocket(ssl.SSLSocket):
    """An SSLSocket whose first reads return the A-ASSOCIATE-RQ the guard already read and checked
    (TLS cannot be peeked); ``pending()`` counts it, so pynetdicom's readiness check sees it."""

    _replay: bytes = b""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._replay:
            data, self._replay = self._replay[:buflen], self._replay[buflen:]
            return data
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._replay:
            size = min(nbytes or len(buffer), len(self._replay))
            buffer[:size] = self._replay[:size]
            self._replay = self._replay[size:]
            return size
        return super().recv_into(buffer, nbytes, flags)

    def pending(self) -> int:
        return len(self._replay) + super().pending()


def _buffered_associate_rq(request: socket.socket) -> bytes | None:
    """The whole A-ASSOCIATE-RQ the guard checked, still unread (peeked, or replayed under TLS)."""
    if isinstance(request, _ReplaySSLSocket):
        return request._replay or None
    header = _peek(request, _PDU_HEADER.size)
    if not header or len(header) < _PDU_HEADER.size:
        return None
    wanted = _PDU_HEADER.size + _PDU_HEADER.unpack(header)[2]
    pdu = _peek(request, wanted)
    return pdu if pdu is not None and len(pdu) == wanted else None


@dataclass
class LeanAcceptor:
    """What the lean acceptor needs of the node: which associations it may take and where
    instances go (see dicom_node.lean_scp)."""

    settings: ScpSection
    spool: Spool
    index: Index
    committer: GroupCommitter
    staging: StagingFiles

    def close(self) -> None:
        self.staging.close()

    def would_accept(self, rq: lean_scp.AssociateRq) -> bool:
        """The AE title checks pynetdicom makes; a failure is pynetdicom's to reject and log."""
        if self.settings.require_called_aet and rq.called != self.settings.ae_title:
            return False
        allowed = self.settings.allowed_calling_aets
        return not allowed or rq.calling in allowed

    def serve(self, sock: socket.socket, rq: lean_scp.AssociateRq, accepted: dict[int, tuple[str, str]]) -> None:
        lean_scp.LeanStoreAssociation(
            sock,
            rq,
            accepted,
            max_pdu=self.settings.max_pdu,
            new_staged=self.staging.take,
            store=self.store,
            prepare=early_header,
            after_response=self.committer.index_pending,
        ).run()

    def store(
        self, staged: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, peer_ae: str,
        head: bytearray, early: EarlyHeader | None = None, fd: int | None = None,
    ) -> Dataset | int:
        return store_staged(
            staged,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            peer_ae=peer_ae,
            spool=self.spool,
            index=self.index,
            committer=self.committer,
            head=head,
            early=early,
            index_now=False,  # the row after the C-STORE-RSP (LeanStoreAssociation's after_response)
            fd=fd,
        )

    def reject_busy(self, sock: socket.socket, rq: lean_scp.AssociateRq | None, peer: str) -> None:
        """A-ASSOCIATE-RJ "local limit exceeded", as pynetdicom answers past maximum_associations."""
        try:
            try:
                _, body = lean_scp._Reader(sock).pdu()  # take the request off the socket first
                del body
            finally:  # logged before the answer: not after the requestor's close (ARTIM later)
                logger.warning(
                    "Association rejected",
                    extra={
                        "event": "scp.association_rejected",
                        "peer_address": peer,
                        "peer_ae": rq.calling if rq is not None else "",
                        "result": 0x02,
                        "source": 0x03,
                        "diagnostic": 0x02,
                    },
                )
            sock.sendall(lean_scp.associate_rj(0x02, 0x03, 0x02))
            _await_peer_close(sock, self.settings.first_pdu_timeout_s)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()


def _await_peer_close(sock: socket.socket, timeout_s: float) -> None:
    """After an A-ASSOCIATE-RJ: let the requestor close first, for at most ``timeout_s`` (the UL
    state machine's Sta13, ARTIM). Closing at once with bytes of the peer still unread (it may
    have sent more behind its request) makes the kernel send RST, and a peer that has not read
    the RJ yet then gets "connection reset" instead of the rejection."""
    sock.shutdown(socket.SHUT_WR)  # the RJ, then our FIN
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return  # the requestor closed
        except TimeoutError:
            return


def scp_tls_context(settings: ScpSection) -> ssl.SSLContext | None:
    """The SCP's TLS context (BCP 195), or None without scp.tls_cert_file; file errors raise
    TlsConfigError here, at start-up."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return server_context(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file, settings.tls_require_client_cert
    )


def _peer_address(assoc: Any) -> str | None:
    info = assoc.requestor.address_info
    return info.address if info is not None else None


def _peek(request: socket.socket, size: int) -> bytes | None:
    """Up to ``size`` bytes the peer has sent, left unread; b"" once it has gone, None if nothing yet."""
    try:
        return request.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _make_room(request: socket.socket, size: int) -> None:
    """Let the kernel buffer a whole PDU unread (the default holds about 128 KiB)."""
    if request.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 2 * size:
        request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 * size)


def _log_refused(peer: str, reason: str, **details: int | str) -> None:
    logger.warning(
        "SCP connection refused",
        extra={"event": "scp.connection_refused", "peer_address": peer, "reason": reason, **details},
    )


def start_scp(
    settings: ScpSection, spool: Spool, index: Index, *, handoff: Callable[[socket.socket, Any], None] | None = None
) -> ThreadedAssociationServer:
    """Start the SCP in the background; ``server.server_address[1]`` is the bound port. With
    ``scp.receivers`` > 1 the receiver processes are started too (and stopped with the server);
    ``handoff`` is given in a receiver process (dicom_node.receivers)."""
    tls_context = scp_tls_context(settings)  # before anything starts: a bad file stops start-up
    configure_pynetdicom(spool.staging_dir if settings.stream_to_disk else None)
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.first_pdu_timeout_s  # pynetdicom's ARTIM, behind the server's own wait
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.require_called_aet = settings.require_called_aet
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    # Storage Commitment reports (N-EVENT-REPORT) for our exports: the PACS opens the association
    # and proposes the SCP role for itself (SCP/SCU Role Selection), which is accepted; it may not
    # ask us to commit anything (we are not a commitment SCP: no N-ACTION handler).
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    committer = GroupCommitter(index)  # one group for both acceptors: their fsyncs are shared
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, index, committer]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_N_EVENT_REPORT, handle_event_report, [index]),
        (evt.EVT_N_ACTION, refuse_action),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_ACCEPTED, handle_accepted),
    ]
    if settings.query_retrieve:
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        destinations = {
            aet: (address.rpartition(":")[0], int(address.rpartition(":")[2]))
            for aet, address in settings.move_destinations.items()
        }
        handlers += [
            (evt.EVT_C_FIND, handle_find, [index, settings.ae_title]),
            (evt.EVT_C_MOVE, handle_move, [index, destinations]),
        ]
    server = ae.make_server(
        (settings.host, settings.port),
        evt_handlers=handlers,
        server_class=GuardedAssociationServer,
        max_per_peer=settings.max_associations_per_peer,
        first_pdu_timeout_s=settings.first_pdu_timeout_s,
        max_first_pdu_bytes=settings.max_first_pdu_bytes,
        tls_context=tls_context,
        lean=LeanAcceptor(settings, spool, index, committer, StagingFiles(spool.staging_dir))
        if settings.lean_store
        else None,
        reuse_port=settings.receivers > 1,
        handoff=handoff,
        committer=committer,
    )
    if settings.receivers > 1 and handoff is None:
        try:
            server.receivers = ReceiverPool(server, settings, spool)
        except BaseException:
            server.server_close()
            raise
    # As AE.start_server(block=False) does; the server removes itself from ae._servers on shutdown.
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
    logger.info(
        "SCP listening",
        extra={
            "event": "scp.start",
            "ae_title": settings.ae_title,
            "port": server.server_address[1],
            "tls": tls_context is not None,
            "lean_store": settings.lean_store,
            "receivers": settings.receivers,
            "client_cert": "required" if settings.tls_require_client_cert else "optional",
        },
    )
    return server
