"""A lean acceptor for storage-only associations: C-STORE and C-ECHO outside pynetdicom.

Profiling the SCP (bench/bench_ingest.py) with a handler that did nothing showed pynetdicom
spending about 2.7 ms of CPU per 512 KB CT instance, more than the durable store itself: each
PDU goes through its state machine and two threads, each P-DATA is decoded into primitives and
the command set into a pydicom Dataset, and the C-STORE-RSP is built and encoded with pydicom.
A modality's association is the simple case: A-ASSOCIATE, then C-STOREs (perhaps a C-ECHO), then
A-RELEASE. This module serves exactly that, in the connection's own thread:

- the A-ASSOCIATE-RQ (PS3.8 9.3.2) is parsed here; an association qualifies only if every
  proposed context is storage-like (as pynetdicom's unrestricted storage decides: a storage SOP
  class, a private or an unknown UID) or Verification, it names no SCP/SCU role or user
  identity, and the node would accept it (called and calling AE titles, the association limit).
  Anything else (Query/Retrieve, Storage Commitment reports, a rejection to explain) is handed,
  unread, to pynetdicom: the guard in dicom_node.scp only peeked at the PDU.
- A-ASSOCIATE-AC, P-DATA-TF, A-RELEASE-RP and A-ABORT are packed with ``struct``; the command set
  (Implicit VR Little Endian, PS3.7 9.3) is read as raw elements and the response encoded as such;
- each data set fragment is written to the staged ``*.partial`` file as it arrives (preamble and
  File Meta first: the same file pynetdicom would stream), then ``dicom_node.scp.store_staged``
  does what the pynetdicom handler does (header, checks, fsync, rename, group commit) and its
  status (0x0000 or a failure with an Error Comment) goes back in the C-STORE-RSP. The index row
  is recorded after the response (``after_response``, dicom_node.group_commit): the fsynced file
  is what makes the instance safe, and the peer prepares its next instance meanwhile.

Negotiation mirrors pynetdicom's for the same contexts (storage-like: the first proposed transfer
syntax; Verification: the first one pynetdicom supports), so a peer sees the same answer on
either path. ``scp.lean_store = false`` sends every association through pynetdicom.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, sop_class

from dicom_node.attributes import check_uid
from dicom_node.errors import InvalidInstance, StorageError, to_dimse_status
from dicom_node.part10 import file_preamble
from dicom_node.spool import start_writeback

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
#: What pynetdicom's AE supports for Verification by default; the first of these the peer
#: proposes is accepted, whatever the peer's order (as pynetdicom negotiates).
VERIFICATION_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)
#: PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
_PDU = struct.Struct(">BBL")
_ITEM = struct.Struct(">BBH")
_PDV = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")
#: Message Control Header bits (PS3.8 E.2).
_COMMAND, _LAST = 0x01, 0x02
#: User Information sub-items that need an answer or change roles: SCP/SCU Role Selection, User
#: Identity. Async window, extended negotiation and implementation items may go unanswered.
_NEEDS_PYNETDICOM = {0x54, 0x58}
#: Command Field values (PS3.7 E.1).
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATA_SET = 0x0101
#: Bytes asked of the socket at a time.
RECV_BYTES = 256 * 1024
#: Bytes of the data set's start kept in memory for the header parse (the rest goes to disk only);
#: a longer header (large private sequences) is read from the file instead.
HEAD_BYTES = 64 * 1024
#: Written bytes are handed to the kernel's writeback every this many (spool.start_writeback),
#: so the fsync after the last fragment waits for little more than the journal commit.
WRITEBACK_BYTES = 128 * 1024
#: A-ABORT reasons (source 2, the service provider): unexpected PDU, invalid PDU parameter.
_UNEXPECTED_PDU, _INVALID_PARAMETER = 0x02, 0x06


class ProtocolError(Exception):
    """The peer broke the protocol: the association is aborted."""


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass
class AssociateRq:
    """The parts of an A-ASSOCIATE-RQ that negotiation needs (PS3.8 9.3.2)."""

    called_ae: bytes
    calling_ae: bytes
    protocol_version: int
    application_context: str
    contexts: list[ProposedContext] = field(default_factory=list)
    max_length: int = 0
    user_items: set[int] = field(default_factory=set)

    @property
    def called(self) -> str:
        return self.called_ae.decode("ascii", "replace").strip()

    @property
    def calling(self) -> str:
        return self.calling_ae.decode("ascii", "replace").strip()


def _uid(raw: bytes | memoryview) -> str:
    return bytes(raw).rstrip(b"\0 ").decode("ascii", "replace")


def parse_associate_rq(pdu: bytes) -> AssociateRq:
    """Parse a whole A-ASSOCIATE-RQ PDU (header included); ProtocolError if malformed."""
    if len(pdu) < 74 or pdu[0] != ASSOCIATE_RQ:
        raise ProtocolError("not an A-ASSOCIATE-RQ")
    (version,) = struct.unpack_from(">H", pdu, 6)
    rq = AssociateRq(pdu[10:26], pdu[26:42], version, "")
    for item_type, body in _items(memoryview(pdu)[74:]):
        if item_type == 0x10:
            rq.application_context = _uid(body)
        elif item_type == 0x20:
            if len(body) < 4:
                raise ProtocolError("short presentation context item")
            abstract, transfers = "", []
            for sub_type, sub in _items(body[4:]):
                if sub_type == 0x30:
                    abstract = _uid(sub)
                elif sub_type == 0x40:
                    transfers.append(_uid(sub))
            rq.contexts.append(ProposedContext(body[0], abstract, tuple(transfers)))
        elif item_type == 0x50:
            for sub_type, sub in _items(body):
                rq.user_items.add(sub_type)
                if sub_type == 0x51 and len(sub) == 4:
                    (rq.max_length,) = struct.unpack(">L", sub)
    return rq


def _items(data: memoryview) -> list[tuple[int, memoryview]]:
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError("truncated item header")
        item_type, _, length = _ITEM.unpack_from(data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise ProtocolError("item runs past its PDU")
        items.append((item_type, data[offset + 4 : end]))
        offset = end
    return items


def is_storage_like(uid: str) -> bool:
    """pynetdicom's unrestricted-storage test: a storage class, a private or an unknown UID."""
    value = UID(uid)
    return value.is_private or uid in _STORAGE_UIDS or not hasattr(sop_class, value.keyword)


_STORAGE_UIDS = frozenset(
    str(getattr(sop_class, name))
    for name in dir(sop_class)
    if isinstance(getattr(sop_class, name), str)
    and sop_class.uid_to_service_class(getattr(sop_class, name)) is sop_class.StorageServiceClass
)


def negotiate(rq: AssociateRq) -> dict[int, tuple[str, str]] | None:
    """context id -> (abstract syntax, transfer syntax) for every proposed context, or None if
    the association is not storage-only (then pynetdicom negotiates it)."""
    if (
        rq.application_context != APPLICATION_CONTEXT
        or not rq.protocol_version & 1
        or rq.user_items & _NEEDS_PYNETDICOM
        or not rq.contexts
    ):
        return None
    accepted: dict[int, tuple[str, str]] = {}
    for cx in rq.contexts:
        if not cx.abstract_syntax or not cx.transfer_syntaxes or cx.context_id in accepted:
            return None
        if cx.abstract_syntax == VERIFICATION:
            supported = [ts for ts in VERIFICATION_TRANSFER_SYNTAXES if ts in cx.transfer_syntaxes]
            if not supported:
                return None  # pynetdicom answers "transfer syntax not supported"
            accepted[cx.context_id] = (cx.abstract_syntax, supported[0])
        elif is_storage_like(cx.abstract_syntax):
            accepted[cx.context_id] = (cx.abstract_syntax, cx.transfer_syntaxes[0])
        else:
            return None
    return accepted


def _item(item_type: int, body: bytes) -> bytes:
    return _ITEM.pack(item_type, 0, len(body)) + body


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _PDU.pack(pdu_type, 0, len(body)) + body


def associate_ac(rq: AssociateRq, accepted: dict[int, tuple[str, str]], max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC (PS3.8 9.3.3): AE fields echoed, every context accepted."""
    contexts = b"".join(
        _item(0x21, bytes((cid, 0, 0, 0)) + _item(0x40, ts.encode("ascii")))
        for cid, (_, ts) in sorted(accepted.items())
    )
    user = _item(
        0x50,
        _item(0x51, struct.pack(">L", max_pdu))
        + _item(0x52, str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"))
        + _item(0x55, PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
    )
    fixed = struct.pack(">HH", 1, 0) + rq.called_ae + rq.calling_ae + bytes(32)
    return _pdu(ASSOCIATE_AC, fixed + _item(0x10, APPLICATION_CONTEXT.encode("ascii")) + contexts + user)


def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    return _pdu(ASSOCIATE_RJ, bytes((0, result, source, diagnostic)))


def abort_pdu(reason: int = 0) -> bytes:
    return _pdu(ABORT, bytes((0, 0, 2, reason)))


RELEASE_RP_PDU = _pdu(RELEASE_RP, bytes(4))


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (Implicit VR Little Endian, group 0000 only) as element -> raw value."""
    elements, offset = {}, 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or offset + length > len(data):
            raise ProtocolError("malformed command set")
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int:
    raw = elements.get(element)
    if raw is None or len(raw) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) missing or not US")
    return int.from_bytes(raw, "little")


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def encode_response(
    command_field: int, message_id: int, sop_class_uid: str, status: int,
    sop_instance_uid: str | None = None, error_comment: str | None = None,
) -> bytes:
    """A response command set (C-STORE-RSP, C-ECHO-RSP), Implicit VR Little Endian (PS3.7 9.3)."""
    parts = [
        (0x0002, _even(sop_class_uid.encode("ascii"), b"\0")),
        (0x0100, struct.pack("<H", command_field)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", status)),
    ]
    if error_comment:
        parts.append((0x0902, _even(error_comment[:64].encode("ascii", "replace"), b" ")))
    if sop_instance_uid is not None:
        parts.append((0x1000, _even(sop_instance_uid.encode("ascii"), b"\0")))
    body = b"".join(_ELEMENT.pack(0, tag, len(value)) + value for tag, value in parts)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF with the whole command set as its last fragment."""
    return _pdu(P_DATA_TF, _PDV.pack(len(command) + 2, context_id, _COMMAND | _LAST) + command)


#: store(staged, sop_class_uid, sop_instance_uid, transfer_syntax, peer_ae, head, early, fd) -> status;
#: ``fd``: the staged file, still open for writing (the caller closes it once store returns).
StoreFunction = Callable[[Path, str, str, str, str, bytearray, Any, int], "Dataset | int"]
#: prepare(head, transfer_syntax, sop_instance_uid): work on the data set's first bytes done while
#: the rest still arrives (the header read); its result is given to store as ``early``.
PrepareFunction = Callable[[bytearray, str, str], Any]


class _Reader:
    """Whole PDUs from a socket, read in large pieces into one buffer kept for the association.
    A returned view is valid until the next read: the callers copy what they keep (the command
    set, the data set's head) and write the rest out at once. (A fresh zeroed 256 KiB buffer per
    refill was 2% of the C-STORE thread's time.)"""

    def __init__(self, sock: socket.socket, largest: int = 0) -> None:
        self.sock = sock
        self.largest = largest  # a PDU announcing more is a protocol error, never allocated; 0: any
        self.buffer = bytearray(RECV_BYTES)
        self.view = memoryview(self.buffer)
        self.offset = self.end = 0

    def read(self, size: int) -> memoryview:
        if self.end - self.offset < size:
            self._fill(size)
        start = self.offset
        self.offset = start + size
        return self.view[start : start + size]

    def _fill(self, size: int) -> None:
        """Receive until ``size`` bytes are buffered after ``offset``."""
        available = self.end - self.offset
        if self.offset + size > len(self.buffer):  # no room after them: to the front, or a larger buffer
            if size > len(self.buffer):
                fresh = bytearray(size)
                fresh[:available] = self.view[self.offset : self.end]
                self.buffer, self.view = fresh, memoryview(fresh)
            else:
                self.view[:available] = self.view[self.offset : self.end]  # memoryview copies with memmove
            self.offset, self.end = 0, available
        while self.end - self.offset < size:
            received = self.sock.recv_into(self.view[self.end :])
            if not received:
                raise ConnectionError("peer closed the connection")
            self.end += received

    def pdu(self) -> tuple[int, memoryview]:
        pdu_type, _, length = _PDU.unpack(self.read(_PDU.size))
        if self.largest and length > self.largest:
            raise ProtocolError(f"a PDU of {length} bytes, over the maximum length announced ({self.largest})")
        return pdu_type, self.read(length)


@dataclass
class _Incoming:
    """The C-STORE whose data set is arriving."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    staged: Path | None
    fd: int | None
    head: bytearray = field(default_factory=bytearray)
    refusal: Dataset | None = None
    early: Any = None  # what prepare gave for the head
    written: int = 0  # bytes in the staged file
    flushed: int = 0  # of them, handed to writeback


class LeanStoreAssociation:
    """One storage-only association, served in the calling thread (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        rq: AssociateRq,
        accepted: dict[int, tuple[str, str]],
        *,
        max_pdu: int,
        new_staged: Callable[[], tuple[Path, int]],
        store: StoreFunction,
        prepare: PrepareFunction | None = None,
        after_response: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.after_response = after_response  # work that may wait until the peer has its C-STORE-RSP
        self.prepare = prepare
        self.rq = rq
        self.accepted = accepted
        self.max_pdu = max_pdu
        self.new_staged = new_staged  # an empty staging file (path, fd open for writing)
        self.store = store
        self.reader = _Reader(sock)
        self.peer_ae = rq.calling
        self._incoming: _Incoming | None = None
        self._command = bytearray()
        self._command_context: int | None = None

    def run(self) -> None:
        """Accept, serve until release or abort, then close the socket."""
        try:
            _, body = self.reader.pdu()  # the A-ASSOCIATE-RQ the guard checked
            del body
            self.sock.sendall(associate_ac(self.rq, self.accepted, self.max_pdu))
            self.reader.largest = self.max_pdu  # PS3.8 D.1: what the peer may send from now on
            while True:
                pdu_type, body = self.reader.pdu()
                if pdu_type == P_DATA_TF:
                    self._p_data(body)
                elif pdu_type == RELEASE_RQ:
                    if self._incoming is not None or self._command:
                        raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                    self.sock.sendall(RELEASE_RP_PDU)
                    return
                elif pdu_type == ABORT:
                    logger.info("Association aborted by peer", extra={"event": "scp.peer_abort"})
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
        except ProtocolError as exc:
            logger.warning(
                "Association aborted", extra={"event": "scp.abort", "peer_ae": self.peer_ae, "reason": str(exc)}
            )
            with contextlib.suppress(OSError):
                self.sock.sendall(abort_pdu(_UNEXPECTED_PDU))
        except (OSError, ConnectionError) as exc:  # timeout, reset, closed
            logger.info(
                "Association ended without release",
                extra={"event": "scp.connection_lost", "peer_ae": self.peer_ae, "reason": type(exc).__name__},
            )
        finally:
            self._discard()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()

    def _p_data(self, body: memoryview) -> None:
        offset = 0
        while offset < len(body):
            if offset + _PDV.size > len(body):
                raise ProtocolError("truncated PDV")
            length, context_id, control = _PDV.unpack_from(body, offset)
            end = offset + 4 + length
            if length < 2 or end > len(body):
                raise ProtocolError("PDV runs past its PDU")
            if context_id not in self.accepted:
                raise ProtocolError(f"PDV on presentation context {context_id}, not accepted")
            fragment = body[offset + _PDV.size : end]
            offset = end
            if control & _COMMAND:
                self._command_fragment(context_id, fragment, bool(control & _LAST))
            else:
                self._data_fragment(context_id, fragment, bool(control & _LAST))

    def _command_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._incoming is not None:
            raise ProtocolError("a command fragment before the data set ended")
        if self._command_context not in (None, context_id):
            raise ProtocolError("command fragments on two presentation contexts")
        self._command_context = context_id
        self._command += fragment
        if last:
            command, self._command, self._command_context = bytes(self._command), bytearray(), None
            self._on_command(context_id, parse_command(command))

    def _on_command(self, context_id: int, elements: dict[int, bytes]) -> None:
        command_field = _us(elements, 0x0100)
        message_id = _us(elements, 0x0110)
        has_data = _us(elements, 0x0800) != NO_DATA_SET
        abstract_syntax = self.accepted[context_id][0]
        if command_field == C_ECHO_RQ and abstract_syntax == VERIFICATION and not has_data:
            self._send(context_id, encode_response(0x8030, message_id, VERIFICATION, 0x0000))
            return
        if command_field != C_STORE_RQ or abstract_syntax == VERIFICATION or not has_data:
            raise ProtocolError(f"command 0x{command_field:04X} on a storage-only association")
        sop_class_uid = _uid(elements.get(0x0002, b""))
        sop_instance_uid = _uid(elements.get(0x1000, b""))
        incoming = _Incoming(context_id, message_id, sop_class_uid, sop_instance_uid, None, None)
        self._incoming = incoming
        try:
            # These go into the File Meta group and become spool keys: refuse invalid ones.
            check_uid(sop_class_uid, "Affected SOP Class UID")
            check_uid(sop_instance_uid, "Affected SOP Instance UID")
        except InvalidInstance as exc:
            incoming.refusal = to_dimse_status(exc)  # the data set is read and dropped
            return
        transfer_syntax = self.accepted[context_id][1]
        try:
            incoming.staged, incoming.fd = self.new_staged()
            incoming.written = _write_all(incoming.fd, file_preamble(sop_class_uid, sop_instance_uid, transfer_syntax))
        except OSError as exc:
            incoming.refusal = _write_failure(exc)
            self._close_file(unlink=True)

    def _data_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        incoming = self._incoming
        if incoming is None or incoming.context_id != context_id:
            raise ProtocolError("a data set fragment without its command")
        if len(incoming.head) < HEAD_BYTES:
            incoming.head += fragment[: HEAD_BYTES - len(incoming.head)]
            if self.prepare is not None and (len(incoming.head) >= HEAD_BYTES or last) and incoming.refusal is None:
                transfer_syntax = self.accepted[context_id][1]
                incoming.early = self.prepare(incoming.head, transfer_syntax, incoming.sop_instance_uid)
        if incoming.fd is not None:
            try:
                incoming.written += _write_all(incoming.fd, fragment)
                if incoming.written - incoming.flushed >= WRITEBACK_BYTES and not last:
                    start_writeback(incoming.fd, incoming.flushed, incoming.written - incoming.flushed)
                    incoming.flushed = incoming.written
            except OSError as exc:
                incoming.refusal = _write_failure(exc)
                self._close_file(unlink=True)
        if last:
            self._finish(incoming)

    def _finish(self, incoming: _Incoming) -> None:
        status: Dataset | int
        if incoming.refusal is not None:
            status = incoming.refusal
            self._close_file(unlink=True)
        else:
            assert incoming.staged is not None and incoming.fd is not None
            transfer_syntax = self.accepted[incoming.context_id][1]
            try:
                status = self.store(
                    incoming.staged, incoming.sop_class_uid, incoming.sop_instance_uid,
                    transfer_syntax, self.peer_ae, incoming.head, incoming.early, incoming.fd,
                )
            finally:
                incoming.staged = None  # store_staged placed it or removed it
                self._close_file(unlink=False)
        self._incoming = None
        code, comment = (status, None) if isinstance(status, int) else (int(status.Status), status.get("ErrorComment"))
        try:
            self._send(
                incoming.context_id,
                encode_response(
                    0x8001, incoming.message_id, incoming.sop_class_uid, code, incoming.sop_instance_uid, comment
                ),
            )
        finally:  # also when the peer is gone: what was stored stays stored (and gets its row)
            if self.after_response is not None:
                self.after_response()

    def _send(self, context_id: int, command: bytes) -> None:
        self.sock.sendall(p_data(context_id, command))

    def _close_file(self, *, unlink: bool) -> None:
        incoming = self._incoming
        if incoming is None:
            return
        if incoming.fd is not None:
            with contextlib.suppress(OSError):
                os.close(incoming.fd)
            incoming.fd = None
        if unlink and incoming.staged is not None:
            incoming.staged.unlink(missing_ok=True)
            incoming.staged = None

    def _discard(self) -> None:
        """A data set cut off by abort or a lost connection: nothing of it is kept."""
        self._close_file(unlink=True)
        self._incoming = None


def _write_all(fd: int, data: Any) -> int:
    view = memoryview(data)
    size = len(view)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    return size


def _write_failure(exc: OSError) -> Dataset:
    return to_dimse_status(StorageError(f"Out of resources: cannot write spool ({exc.strerror})"))
