"""The SCP over real loopback associations (pynetdicom SCU as the peer)."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicom_node.config import ScpSection, settings_from
from dicom_node.index import Index
from dicom_node.scp import start_scp
from dicom_node.spool import Spool
from radbridge_common.logs import JsonFormatter
from tests.conftest import StartScp, staged_data
from tests.peers import closed_by_peer, garbage_connection

ATTACKER = "127.0.0.2"  # loopback is 127.0.0.0/8: another peer address on the same machine


@pytest.fixture
def scp(start_node_scp: StartScp) -> tuple[int, Spool, Index]:
    return start_node_scp()


def _try_assoc(port: int, source: str = "127.0.0.1"):  # noqa: ANN202
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="RADBRIDGE", bind_address=(source, 0))


def _assoc(port: int, source: str = "127.0.0.1"):  # noqa: ANN202
    assoc = _try_assoc(port, source)
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


def _refusals(caplog: pytest.LogCaptureFixture) -> list[dict]:
    docs = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    return [d for d in docs if d.get("event") == "scp.connection_refused"]


Held = Callable[[list[socket.socket]], list[socket.socket]]


@pytest.fixture
def held() -> Iterator[Held]:
    """held(sockets) -> sockets, closed after the test (a raw peer's side of the connection)."""
    sockets: list[socket.socket] = []

    def hold(new: list[socket.socket]) -> list[socket.socket]:
        sockets.extend(new)
        return new

    yield hold
    for sock in sockets:
        sock.close()


class TestScpSection:
    @pytest.mark.parametrize("key", ["max_associations", "max_associations_per_peer", "first_pdu_timeout_s"])
    @pytest.mark.parametrize("value", [0, -1])
    def test_limits_must_be_positive(self, key: str, value: int) -> None:
        with pytest.raises(ValueError, match=f"scp.{key} must be a positive number"):
            ScpSection(**{key: value})

    def test_max_first_pdu_bytes_has_a_floor(self) -> None:
        with pytest.raises(ValueError, match="scp.max_first_pdu_bytes must be at least 1024"):
            ScpSection(max_first_pdu_bytes=100)

    def test_keys_come_from_config(self) -> None:
        scp = settings_from({"scp": {"max_associations_per_peer": "3", "first_pdu_timeout_s": "0.5"}}).scp
        assert (scp.max_associations_per_peer, scp.first_pdu_timeout_s) == (3, 0.5)
        assert (ScpSection().max_associations, ScpSection().max_associations_per_peer) == (10, 8)


class TestGuardedAssociationServer:
    def test_peer_limit_closes_extra_connections_at_once(
        self, start_node_scp: StartScp, held: Held, caplog: pytest.LogCaptureFixture
    ) -> None:
        port, _, _ = start_node_scp(max_associations_per_peer=2, first_pdu_timeout_s=30)
        caplog.set_level(logging.WARNING, logger="dicom_node.scp")
        waiting = held([garbage_connection("idle", port, ATTACKER) for _ in range(2)])
        extra = held([garbage_connection("idle", port, ATTACKER)])[0]
        assert closed_by_peer(extra, within_s=1.0)
        assert not closed_by_peer(waiting[0], within_s=0.2)
        _assoc(port).release()  # another peer is not limited by this one
        # Associated connections count too: one waiting + one associated = 2.
        waiting.pop().close()
        deadline, early = time.monotonic() + 2, 0
        while not (assoc := _try_assoc(port, ATTACKER)).is_established:
            # The server may see the next connection before it has noticed the close: refused, retried.
            early += 1
            assert time.monotonic() < deadline, "the closed connection's slot was not given back"
        refused = _try_assoc(port, ATTACKER)
        assert not refused.is_established and not refused.is_rejected  # closed at accept, no A-ASSOCIATE-RJ
        assoc.release()
        limited = [r for r in _refusals(caplog) if r["reason"] == "peer_limit"]
        # extra, each attempt made before the slot came back, and refused
        assert [(r["peer_address"], r["limit"]) for r in limited] == [(ATTACKER, 2)] * (2 + early)

    def test_silent_and_truncated_connections_time_out_without_a_global_slot(
        self, start_node_scp: StartScp, held: Held, caplog: pytest.LogCaptureFixture
    ) -> None:
        port, _, _ = start_node_scp(max_associations=1, first_pdu_timeout_s=0.5)
        caplog.set_level(logging.WARNING, logger="dicom_node.scp")
        started = time.monotonic()
        idle, truncated = held([garbage_connection(k, port, ATTACKER) for k in ("idle", "truncated_rq")])
        _assoc(port).release()  # the only association slot is free while they wait
        assert closed_by_peer(idle, within_s=2.0) and closed_by_peer(truncated, within_s=2.0)
        assert 0.4 < time.monotonic() - started < 2.0
        timeouts = [r for r in _refusals(caplog) if r["reason"] == "first_pdu_timeout"]
        assert sorted(r["received_bytes"] for r in timeouts) == [0, 26]  # the truncated RQ: its 26 bytes
        assert all(r["peer_address"] == ATTACKER and 400 <= r["duration_ms"] < 2000 for r in timeouts)

    @pytest.mark.parametrize(
        ("kind", "reason"), [("huge_pdu", "first_pdu_too_large"), ("random", "not_associate_rq")]
    )
    def test_oversized_or_foreign_first_pdu_is_closed_unread(
        self, start_node_scp: StartScp, held: Held, caplog: pytest.LogCaptureFixture, kind: str, reason: str
    ) -> None:
        port, _, _ = start_node_scp(first_pdu_timeout_s=30)
        caplog.set_level(logging.WARNING, logger="dicom_node.scp")
        (sock,) = held([garbage_connection(kind, port, ATTACKER)])
        assert closed_by_peer(sock, within_s=1.0)  # not after 30 s, and no 4 GB read
        (refusal,) = _refusals(caplog)
        assert (refusal["peer_address"], refusal["reason"]) == (ATTACKER, reason)
        if kind == "huge_pdu":
            assert (refusal["pdu_bytes"], refusal["limit"]) == (0xFFFFFFFF, 256 * 1024)

    def test_large_associate_rq_fits(self, start_node_scp: StartScp) -> None:
        """128 contexts x every transfer syntax: bigger than the default socket buffer can hold unread."""
        port, _, _ = start_node_scp(first_pdu_timeout_s=2)
        ae = AE(ae_title="TESTSCU")
        for context in AllStoragePresentationContexts[:128]:
            ae.add_requested_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
        assert assoc.is_established
        assoc.release()

    def test_global_limit_rejects_with_local_limit_exceeded(
        self, start_node_scp: StartScp, caplog: pytest.LogCaptureFixture
    ) -> None:
        port, _, _ = start_node_scp(max_associations=1)
        caplog.set_level(logging.WARNING, logger="dicom_node.scp")
        first = _assoc(port)
        second = _try_assoc(port, ATTACKER)
        first.release()
        assert second.is_rejected
        docs = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
        (rejected,) = [d for d in docs if d.get("event") == "scp.association_rejected"]
        assert (rejected["peer_address"], rejected["peer_ae"]) == (ATTACKER, "TESTSCU")
        assert (rejected["result"], rejected["source"], rejected["diagnostic"]) == (2, 3, 2)


def test_streamed_to_disk_store_is_durable_and_leaves_no_partial(
    start_node_scp: StartScp, small_ct_files: list[Path]
) -> None:
    port, spool, index = start_node_scp(stream_to_disk=True)
    try:
        assoc = _assoc(port)
        statuses = [assoc.send_c_store(f).Status for f in small_ct_files[:3]]
        assoc.release()
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = False  # process-wide: back to the default for other tests
    assert statuses == [0, 0, 0]
    assert index.count_instances() == 3
    rows = index.study_instances(pydicom.dcmread(small_ct_files[0]).StudyInstanceUID)
    stored = {r.sop_instance_uid: pydicom.dcmread(r.path).PixelData for r in rows}
    for f in small_ct_files[:3]:
        original = pydicom.dcmread(f)
        assert stored[original.SOPInstanceUID] == original.PixelData
    assert not staged_data(spool.root)
