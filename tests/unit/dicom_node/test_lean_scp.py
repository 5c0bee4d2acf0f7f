"""The lean acceptor (dicom_node.lean_scp) over real loopback associations.

Which acceptor served an association is read from ``radbridge_associations_total``. Peers:
dcmtk ``storescu``/``echoscu`` and pynetdicom's SCU; the protocol-state cases use a raw socket
whose PDUs are packed here from PS3.8, independently of the module under test.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from dicom_node.metrics import REGISTRY
from dicom_node.spool import Spool
from tests.conftest import StartScp, staged_data
from tests.peers import closed_by_peer, dcmtk_env, missing_tools

PRIVATE_STORAGE = "1.3.6.1.4.1.9590.100.1.2.999"  # a private (storage-like) SOP class


def _served(acceptor: str) -> float:
    return REGISTRY.get_sample_value("radbridge_associations_total", {"acceptor": acceptor}) or 0.0


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {a: _served(a) - n for a, n in before.items()}


def _snapshot() -> dict[str, float]:
    return {a: _served(a) for a in ("lean", "pynetdicom")}


def test_dcmtk_storescu_and_echoscu_are_served_by_the_lean_acceptor(
    start_node_scp: StartScp, small_ct_files: list[Path]
) -> None:
    if missing := missing_tools("storescu", "echoscu"):
        pytest.skip(f"needs dcmtk: {', '.join(missing)} not found")
    port, spool, index = start_node_scp()
    before = _snapshot()
    files = small_ct_files[:5]
    for cmd in (
        ["echoscu", "-aet", "MODALITY", "-aec", "RADBRIDGE", "127.0.0.1", str(port)],
        ["storescu", "-aet", "MODALITY", "-aec", "RADBRIDGE", "127.0.0.1", str(port), *map(str, files)],
    ):
        done = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert _delta(before) == {"lean": 2.0, "pynetdicom": 0.0}
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    rows = index.study_instances(study)
    assert len(rows) == len(files)
    for row in rows:  # the data set as sent, under a File Meta group naming the transfer syntax
        stored = pydicom.dcmread(row.path)
        (original,) = [pydicom.dcmread(f) for f in files if pydicom.dcmread(f).SOPInstanceUID == row.sop_instance_uid]
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.file_meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        assert stored == original
        assert row.calling_aet == "MODALITY"
    assert not staged_data(spool.staging_dir)


def _propose(port: int) -> tuple[list[tuple[int, str, str]], object]:
    ae = AE(ae_title="NEGOTIATE")
    ae.add_requested_context(CTImageStorage, [JPEGBaseline8Bit, ExplicitVRLittleEndian])
    ae.add_requested_context(PRIVATE_STORAGE, [ImplicitVRLittleEndian])
    ae.add_requested_context(Verification, [JPEGBaseline8Bit, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification, [ExplicitVRBigEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    accepted = sorted(
        (cx.context_id, str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    )
    return accepted, assoc


def test_negotiation_answers_as_pynetdicom_does(start_node_scp: StartScp) -> None:
    """The same proposal to the lean acceptor and to pynetdicom (scp.lean_store off) gets the
    same contexts and transfer syntaxes: storage-like ones their first proposal, Verification
    the first that pynetdicom supports."""
    lean_port, _, _ = start_node_scp()
    plain_port, _, _ = start_node_scp(lean_store=False)
    before = _snapshot()
    lean, lean_assoc = _propose(lean_port)
    assert _delta(before) == {"lean": 1.0, "pynetdicom": 0.0}
    assert lean_assoc.send_c_echo().Status == 0x0000
    lean_assoc.release()
    plain, plain_assoc = _propose(plain_port)
    plain_assoc.release()
    assert _delta(before) == {"lean": 1.0, "pynetdicom": 1.0}
    assert lean == plain
    assert (1, CTImageStorage, JPEGBaseline8Bit) in lean
    assert (5, Verification, ImplicitVRLittleEndian) in lean  # pynetdicom: its own order


def test_other_services_are_left_to_pynetdicom(start_node_scp: StartScp, small_ct_files: list[Path]) -> None:
    port, _, _ = start_node_scp()
    before = _snapshot()
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    assert assoc.send_c_store(small_ct_files[0]).Status == 0x0000
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    answers = [status.Status for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    assoc.release()
    assert answers[-1] == 0x0000 and answers.count(0xFF00) == 1
    assert _delta(before) == {"lean": 0.0, "pynetdicom": 1.0}


def _with_other_sop_instance_uid(src: Path, dst: Path) -> Path:
    """A copy whose data set names another SOP Instance UID than its File Meta group."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(dst)
    assert pydicom.dcmread(dst).file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    return dst


def test_a_refused_instance_gets_its_status_and_nothing_is_kept(
    start_node_scp: StartScp, small_ct_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's SCU sending a file as it is takes the request's UIDs from its File Meta
    group: here they differ from the data set's (a refusal with a comment), then a valid one on
    the same association is stored."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    port, spool, index = start_node_scp()
    mismatch = _with_other_sop_instance_uid(small_ct_files[0], tmp_path / "x.dcm")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    before = _snapshot()
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    refused = assoc.send_c_store(mismatch)
    stored = assoc.send_c_store(small_ct_files[1])
    assoc.release()
    assert _delta(before)["lean"] == 1.0
    assert refused.Status != 0x0000 and refused.Status & 0xF000 in (0xA000, 0xC000)
    assert refused.ErrorComment == "SOPInstanceUID does not match the C-STORE request"
    assert stored.Status == 0x0000
    assert index.count_instances() == 1
    assert not staged_data(spool.staging_dir)


# -- raw PDUs (PS3.8 9.3), packed here --------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _associate_rq(called: str = "RADBRIDGE", abstract: str = CTImageStorage) -> bytes:
    context = _item(0x20, bytes((1, 0, 0, 0)) + _item(0x30, abstract.encode()) + _item(0x40, b"1.2.840.10008.1.2.1"))
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + b"RAWSCU".ljust(16) + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    )
    return struct.pack(">BBL", 1, 0, len(body)) + body


def _command(sop_instance: str) -> bytes:
    def el(tag: int, value: bytes) -> bytes:
        value = value + (b"\0" if len(value) % 2 else b"")
        return struct.pack("<HHL", 0, tag, len(value)) + value

    body = (
        el(0x0002, CTImageStorage.encode()) + el(0x0100, struct.pack("<H", 1)) + el(0x0110, struct.pack("<H", 7))
        + el(0x0700, struct.pack("<H", 0)) + el(0x0800, struct.pack("<H", 0)) + el(0x1000, sop_instance.encode())
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _p_data(control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(fragment) + 2, 1, control) + fragment
    return struct.pack(">BBL", 4, 0, len(pdv)) + pdv


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(10)
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    kind, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return kind, body


def _raw_association(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_associate_rq())
    kind, _ = _read_pdu(sock)
    assert kind == 2  # A-ASSOCIATE-AC
    return sock


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_an_abort_in_the_middle_of_a_data_set_keeps_nothing(
    start_node_scp: StartScp, small_ct_files: list[Path]
) -> None:
    port, spool, index = start_node_scp()
    before = _snapshot()
    sock = _raw_association(port)
    data = small_ct_files[0].read_bytes()[132 + 200 :]  # some of a data set: never completed
    sock.sendall(_p_data(0x03, _command(generate_uid())) + _p_data(0x00, data[:20000]))
    assert _wait_for(lambda: len(staged_data(spool.staging_dir)) == 1)  # being written
    sock.sendall(struct.pack(">BBL", 7, 0, 4) + bytes(4))  # A-ABORT
    assert closed_by_peer(sock, within_s=5)
    sock.close()
    assert _delta(before)["lean"] == 1.0
    assert _wait_for(lambda: not staged_data(spool.staging_dir))
    assert index.count_instances() == 0


def test_a_release_in_the_middle_of_a_message_is_aborted(start_node_scp: StartScp) -> None:
    port, spool, _ = start_node_scp()
    sock = _raw_association(port)
    sock.sendall(_p_data(0x03, _command(generate_uid())) + _p_data(0x00, b"\x08\x00\x05\x00CS\x00\x00"))
    sock.sendall(struct.pack(">BBL", 5, 0, 4) + bytes(4))  # A-RELEASE-RQ before the last fragment
    kind, body = _read_pdu(sock)
    assert (kind, body[2:3]) == (7, b"\x02")  # A-ABORT from the service provider
    assert closed_by_peer(sock, within_s=5)
    sock.close()
    assert _wait_for(lambda: not staged_data(spool.staging_dir))


def test_a_pdv_on_a_context_never_accepted_is_aborted(start_node_scp: StartScp) -> None:
    port, _, index = start_node_scp()
    sock = _raw_association(port)
    command = _command(generate_uid())
    pdv = struct.pack(">LBB", len(command) + 2, 9, 0x03) + command  # context 9 was never proposed
    sock.sendall(struct.pack(">BBL", 4, 0, len(pdv)) + pdv)
    kind, _ = _read_pdu(sock)
    assert kind == 7
    sock.close()
    assert index.count_instances() == 0


def test_past_the_association_limit_the_answer_is_local_limit_exceeded(start_node_scp: StartScp) -> None:
    port, _, _ = start_node_scp(max_associations=1)
    first = _raw_association(port)
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    second.sendall(_associate_rq())
    kind, body = _read_pdu(second)
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)  # rejected-transient, local limit
    second.close()
    first.sendall(struct.pack(">BBL", 5, 0, 4) + bytes(4))
    assert _read_pdu(first)[0] == 6  # A-RELEASE-RP
    first.close()


def test_a_rejected_peer_that_sent_ahead_still_reads_the_rejection(start_node_scp: StartScp) -> None:
    """A requestor that sent more behind its A-ASSOCIATE-RQ (here a P-DATA-TF, as a hasty SCU
    does) and reads late: the node sends the RJ, half-closes and lets it close first (Sta13), so
    its unread bytes do not make the kernel answer RST. Linux keeps the RJ readable after a
    reset; a Windows peer drops unread data on one, the rejection with it."""
    port, _, _ = start_node_scp(max_associations=1)
    first = _raw_association(port)
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    second.sendall(_associate_rq())

    def send_ahead() -> None:  # more than the node reads with the request: some stays unread
        with contextlib.suppress(OSError):
            second.sendall(_p_data(0x03, bytes(1_000_000)))

    sender = threading.Thread(target=send_ahead, daemon=True)
    sender.start()
    time.sleep(0.5)  # the node has answered and, before, closed by now
    kind, body = _read_pdu(second)
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)
    # An orderly end (FIN), not a reset: a Windows peer loses unread data on a reset, the RJ too.
    assert second.recv(1) == b""
    second.close()
    first.sendall(struct.pack(">BBL", 5, 0, 4) + bytes(4))  # released, not dropped (nothing logged late)
    assert _read_pdu(first)[0] == 6
    first.close()


def test_the_limit_counts_both_acceptors(start_node_scp: StartScp) -> None:
    """A lean association holds a slot that a query association (pynetdicom's) cannot take."""
    port, _, _ = start_node_scp(max_associations=1)
    before = _served("lean")
    first = _raw_association(port)  # storage only: the lean acceptor's
    assert _served("lean") == before + 1
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    refused = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert refused.is_rejected and not refused.is_established
    rj = refused.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # local limit exceeded
    first.sendall(struct.pack(">BBL", 5, 0, 4) + bytes(4))
    assert _read_pdu(first)[0] == 6  # A-RELEASE-RP: the slot is free again
    first.close()
    deadline = time.monotonic() + 5
    while not (query := ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")).is_established:
        assert time.monotonic() < deadline, "the lean association's slot was not given back"
        time.sleep(0.05)
    query.release()


def test_a_wrong_called_ae_title_is_rejected_as_before(start_node_scp: StartScp) -> None:
    """Rejections are pynetdicom's: the lean acceptor takes only what the node would accept."""
    port, _, _ = start_node_scp()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_associate_rq(called="SOMEONEELSE"))
    kind, body = _read_pdu(sock)
    assert kind == 3 and tuple(body[1:4]) == (0x01, 0x01, 0x07)  # called AE title not recognised
    sock.close()


def test_small_pdus_reassemble_the_same_instance(start_node_scp: StartScp, small_ct_files: list[Path]) -> None:
    port, _, index = start_node_scp(max_pdu=4096)  # a 512 KB instance in ~130 P-DATA-TF PDUs
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.acceptor.maximum_length == 4096
    assert assoc.send_c_store(small_ct_files[2]).Status == 0x0000
    assoc.release()
    (row,) = index.study_instances(pydicom.dcmread(small_ct_files[2]).StudyInstanceUID)
    assert pydicom.dcmread(row.path) == pydicom.dcmread(small_ct_files[2])


def test_stopping_the_server_ends_a_lean_association(tmp_path: Path) -> None:
    from dicom_node.config import ScpSection
    from dicom_node.index import Index
    from dicom_node.scp import start_scp

    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    server = start_scp(ScpSection(port=0, ae_title="RADBRIDGE"), spool, index)
    try:
        sock = _raw_association(server.server_address[1])
    finally:
        server.shutdown()
    assert closed_by_peer(sock, within_s=5)
    sock.close()
    index.close()


def test_a_header_longer_than_the_bytes_held_is_read_from_the_file(
    start_node_scp: StartScp, small_ct_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 100 KB private element before the pixel module: the lean header walk runs out of held
    bytes, and the instance is read with pydicom from the staged file, with the same result."""
    import dicom_node.scp as scp
    from dicom_node.lean_scp import HEAD_BYTES

    answers: list[object] = []
    walk = scp.read_header
    monkeypatch.setattr(scp, "read_header", lambda *a: answers.append(walk(*a)) or answers[-1])

    ds = pydicom.dcmread(small_ct_files[3])
    block = ds.private_block(0x0009, "RADBRIDGE TEST", create=True)
    block.add_new(0x01, "OB", bytes(HEAD_BYTES + 40_000))
    big = tmp_path / "big.dcm"
    ds.save_as(big)
    port, _, index = start_node_scp()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.send_c_store(big).Status == 0x0000
    assoc.release()
    (row,) = index.study_instances(ds.StudyInstanceUID)
    assert pydicom.dcmread(row.path) == pydicom.dcmread(big)
    (stored,) = index.search_instances(ds.StudyInstanceUID)
    assert stored.attributes["00280010"] == {"vr": "US", "Value": [512]}  # Rows, past the private block
    assert answers == [None]  # the walk declined; pydicom read the file


def test_the_response_goes_out_before_the_index_row(
    start_node_scp: StartScp, small_ct_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C-STORE-RSP is sent once the file and its directory are fsynced; the index row follows
    (dicom_node.group_commit) and is in before the association reads its next PDU."""
    port, _, index = start_node_scp()
    real = index.add_instances
    gate = threading.Event()
    monkeypatch.setattr(
        index, "add_instances", lambda items, now=None, *, synced=True: (gate.wait(10), real(items, now, synced=synced))
    )
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(small_ct_files[0]).Status == 0x0000  # answered while the row waits
        assert index.count_instances() == 0
    finally:
        gate.set()
        assoc.release()
    assert index.count_instances() == 1  # released: every instance of the association has its row


def test_a_row_that_cannot_be_recorded_keeps_the_stop_unclean(
    tmp_path: Path, small_ct_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance answered "stored" whose row never made it leaves ``all_indexed`` false, so the
    node does not mark its stop clean and the next start re-indexes it from the spool."""
    from dicom_node.config import ScpSection
    from dicom_node.index import Index
    from dicom_node.recovery import recover
    from dicom_node.scp import start_scp

    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    index.mark_running()
    server = start_scp(ScpSection(port=0, ae_title="RADBRIDGE"), spool, index)

    def broken(items: object, now: object = None, *, synced: bool = True) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(index, "add_instances", broken)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="RADBRIDGE")
        assert assoc.send_c_store(small_ct_files[0]).Status == 0x0000  # durable in the spool
        assert assoc.send_c_store(small_ct_files[1]).Status == 0xA700  # refused while rows fail
        assoc.release()
    finally:
        server.shutdown()
    assert not server.all_indexed
    monkeypatch.undo()
    assert index.count_instances() == 0
    recover(spool, index)  # what the next start does, the stop not being marked clean
    assert index.count_instances() == 2  # the refused one was placed too: kept, as a resend would be
    index.close()


def test_a_pdu_longer_than_announced_is_aborted_unread(start_node_scp: StartScp) -> None:
    """A P-DATA-TF claiming 1 GiB, past the 16 KiB the node announced: A-ABORT at once, nothing
    allocated for it and nothing kept (the lean acceptor holds a PDU whole)."""
    port, spool, index = start_node_scp(max_pdu=16384)
    sock = _raw_association(port)
    sock.sendall(struct.pack(">BBL", 4, 0, 1 << 30) + bytes(64))
    kind, body = _read_pdu(sock)
    assert (kind, body[2:3]) == (7, b"\x02")  # A-ABORT from the service provider
    assert closed_by_peer(sock, within_s=5)
    sock.close()
    assert index.count_instances() == 0
    assert _wait_for(lambda: not staged_data(spool.staging_dir))


def test_one_pdu_larger_than_the_receive_buffer_then_small_ones(
    start_node_scp: StartScp, small_ct_files: list[Path]
) -> None:
    """To a node announcing 0 (unlimited), pynetdicom sends each 512 KB data set as one PDU, twice
    the lean acceptor's receive buffer: the buffer grows for it and is reused for what follows."""
    from dicom_node.lean_scp import RECV_BYTES

    port, _, index = start_node_scp(max_pdu=0)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.acceptor.maximum_length == 0
    assert small_ct_files[4].stat().st_size > RECV_BYTES
    for path in small_ct_files[4:8]:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    rows = index.study_instances(pydicom.dcmread(small_ct_files[4]).StudyInstanceUID)
    stored = {row.sop_instance_uid: pydicom.dcmread(row.path) for row in rows}
    for path in small_ct_files[4:8]:
        original = pydicom.dcmread(path)
        assert stored[original.SOPInstanceUID] == original
