"""dicom_node.reactor: pynetdicom's loops wait for work instead of polling every millisecond."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE, association, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification

from dicom_node import reactor


@pytest.fixture(autouse=True)
def installed() -> None:
    reactor.install()


class _RecordingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(0)


class _FakeAssociation(threading.Thread):
    """Just what _ReactorClock looks at: the wake Event, the two queues and _kill."""

    def __init__(self) -> None:
        super().__init__()
        self.wake = _RecordingEvent()
        setattr(self, reactor._WAKE_ATTR, self.wake)
        self.dimse = type("D", (), {"msg_queue": reactor._WakingQueue(self.wake.set)})()
        self.dul = type("U", (), {"to_user_queue": reactor._WakingQueue(self.wake.set)})()
        self._kill = False
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()  # nobody is pausing the reactor
        self.results: list[int] = []

    def run(self) -> None:
        clock = reactor._ReactorClock()
        clock.sleep(0.001)  # nothing queued: waits (bounded)
        self.results.append(len(self.wake.waits))
        self.dimse.msg_queue.put("message")
        clock.sleep(0.001)  # a message is queued: returns without waiting
        self.results.append(len(self.wake.waits))
        self.dimse.msg_queue.get()
        self.dul.to_user_queue.put("release")
        clock.sleep(0.001)  # a release/abort primitive is queued: no wait either
        self.results.append(len(self.wake.waits))
        self.dul.to_user_queue.get()
        self._reactor_checkpoint.clear()
        clock.sleep(0.001)  # a send_*() waits for the reactor to pause: no wait
        self.results.append(len(self.wake.waits))


def test_reactor_clock_waits_only_when_nothing_is_queued() -> None:
    fake = _FakeAssociation()
    fake.start()
    fake.join(5)
    assert fake.results == [1, 1, 1, 1]
    assert fake.wake.waits == [reactor.MAX_WAIT_S]  # bounded: a kill or timeout is still seen


def test_other_sleeps_are_real_sleeps() -> None:
    fake = _FakeAssociation()
    clock = reactor._ReactorClock()
    clock.sleep(0)  # not the reactor's 1 ms sleep, not an association thread: plain time.sleep
    assert fake.wake.waits == []
    assert clock.monotonic() > 0  # everything else is the time module's


def test_waking_queue_signals_every_put() -> None:
    calls: list[int] = []
    q = reactor._WakingQueue(lambda: calls.append(1))
    q.put(1)
    q.put_nowait(2)
    assert calls == [1, 1]
    assert [q.get(), q.get()] == [1, 2]


def test_new_associations_are_event_driven() -> None:
    assoc = association.Association(AE(), "requestor")
    assert isinstance(assoc.dul, reactor.EventDrivenDUL)
    assert isinstance(assoc.dimse, reactor.EventDrivenDIMSE)
    assert isinstance(assoc.dimse.msg_queue, reactor._WakingQueue)
    assert isinstance(assoc.dul.to_user_queue, reactor._WakingQueue)


def test_another_pynetdicom_keeps_its_own_loops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    monkeypatch.setattr(association, "DULServiceProvider", DULServiceProvider)
    assert reactor.install() is False
    assert association.DULServiceProvider is DULServiceProvider  # nothing swapped
    assert [r.pynetdicom for r in caplog.records if r.event == "scp.reactor_not_installed"] == ["3.1.0"]


@pytest.fixture
def echo_server() -> Iterator[int]:
    ae = AE(ae_title="REACTOR")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)])
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_many_echoes_and_a_release_over_event_driven_loops(echo_server: int) -> None:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", echo_server, ae_title="REACTOR")
    assert assoc.is_established
    statuses = [assoc.send_c_echo().Status for _ in range(50)]
    assoc.release()
    assert statuses == [0] * 50
    assert assoc.is_released
    assoc.join(5)
    assoc.dul.join(5)
    assert not assoc.is_alive() and not assoc.dul.is_alive()  # the loops end once released


def test_bulk_recv_returns_what_arrived_when_the_peer_closes() -> None:
    left, right = socket.socketpair()
    try:
        sock: Any = reactor.BulkRecvSocket.__new__(reactor.BulkRecvSocket)
        sock.socket = left
        sender = threading.Thread(target=right.sendall, args=(b"x" * 300_000,))
        sender.start()  # more than the socket buffer holds: sent while recv reads
        assert len(sock.recv(300_000)) == 300_000  # several pieces of RECV_CHUNK
        sender.join(5)
        right.sendall(b"abc")
        right.close()
        assert sock.recv(10) == bytearray(b"abc")
    finally:
        left.close()


def _on_reactor_thread(assoc: association.Association, body: Any) -> Any:
    """Run ``body`` on the association's own thread (where pynetdicom's reactor runs)."""
    out: list[Any] = []
    assoc.run = lambda: out.append(body())  # type: ignore[method-assign]
    assoc.start()
    assoc.join(5)
    assert out, "the body did not finish"
    return out[0]


def test_a_paused_reactor_leaves_the_response_to_the_send() -> None:
    """pynetdicom's race, made deterministic: the reactor is past its checkpoint when a send_*()
    clears it and reads _is_paused as True; the peer's response is queued before the reactor
    looks. The reactor must not take it; the send_*()'s blocking read does."""
    assoc = association.Association(AE(), "requestor")
    assoc._reactor_checkpoint.clear()  # the send_*() has begun
    assoc.dimse.msg_queue.put((1, "C-STORE-RSP"))
    assert _on_reactor_thread(assoc, lambda: assoc.dimse.get_msg(block=False)) == (None, None)
    assert assoc.dimse.get_msg(block=True) == (1, "C-STORE-RSP")  # the send_*() gets it


def test_a_running_reactor_still_serves_requests_and_blocking_reads_are_pynetdicoms() -> None:
    assoc = association.Association(AE(), "requestor")
    assoc.dimse.msg_queue.put((1, "N-EVENT-REPORT-RQ"))
    assert _on_reactor_thread(assoc, lambda: assoc.dimse.get_msg(block=False)) == (1, "N-EVENT-REPORT-RQ")
    other = association.Association(AE(), "acceptor")
    other._reactor_checkpoint.clear()  # a C-GET handler's C-STORE on the reactor's own thread
    other.dimse.msg_queue.put((3, "C-STORE-RSP"))
    assert _on_reactor_thread(other, lambda: other.dimse.get_msg(block=True)) == (3, "C-STORE-RSP")


def test_a_request_goes_out_only_after_a_reactor_read_under_way(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(reactor.DIMSEServiceProvider, "send_msg", lambda self, p, c: sent.append(p))
    assoc = association.Association(AE(), "requestor")
    with assoc.dimse._take_lock:  # the reactor is between its check and its take
        sender = threading.Thread(target=assoc.dimse.send_msg, args=("C-STORE-RQ", 1))
        sender.start()
        sender.join(0.2)
        assert sent == [] and sender.is_alive()
    sender.join(5)
    assert sent == ["C-STORE-RQ"]


def test_pausing_the_reactor_wakes_it() -> None:
    """A send_*() clears the checkpoint: the reactor, idle in its wait for work, wakes at once
    rather than at the end of MAX_WAIT_S (it had cost up to 10 ms per C-MOVE sub-operation)."""
    assoc = association.Association(AE(), "requestor")
    checkpoint = assoc._reactor_checkpoint
    assert isinstance(checkpoint, reactor._WakingCheckpoint) and checkpoint.is_set()
    wake = reactor._association_wake(assoc)
    wake.clear()
    checkpoint.clear()
    assert wake.is_set() and not assoc._reactor_checkpoint.is_set()
    checkpoint.set()
    assert assoc._reactor_checkpoint is checkpoint  # pynetdicom's own set() keeps the same Event


def _pipe_bytes(dul: Any) -> int:
    try:
        return len(os.read(dul._pipe.read_fd, 4096))
    except BlockingIOError:
        return 0


def test_the_dul_pipe_is_written_only_while_its_thread_selects(monkeypatch: pytest.MonkeyPatch) -> None:
    """One pipe write per queued PDU cost a tenth of a C-MOVE sub-operation: a put writes only
    when the DUL thread is (about to be) in select, and a put it would miss is seen by its look
    at the queues after announcing the wait."""
    dul = association.Association(AE(), "requestor").dul
    dul.to_provider_queue.put("P-DATA")
    assert _pipe_bytes(dul) == 0  # the DUL thread is busy: it will find the PDU on its own
    dul.to_provider_queue.get()
    dul._selecting = True
    dul.event_queue.put("Evt")
    assert _pipe_bytes(dul) == 1  # it may be asleep in select: woken
    dul._selecting = False
    selects: list[float] = []
    monkeypatch.setattr(reactor.select, "select", lambda r, w, x, t: selects.append(t) or ([], [], []))
    dul._idle_wait()  # something is queued: no select, and no longer announced
    assert selects == [] and dul._selecting is False
    dul.event_queue.get()
    dul._idle_wait()
    assert selects == [reactor.MAX_WAIT_S] and dul._selecting is False


def test_every_socket_the_node_makes_or_wraps_has_nagle_off() -> None:
    """dicom_node.nodelay at the one place sockets are made: export, pull, C-MOVE sub-operations
    and commitment associations alike (the C-MOVE one had been missed when it was per call)."""
    from pynetdicom.transport import AddressInformation

    made = reactor.BulkRecvSocket(
        association.Association(AE(), "requestor"), address=AddressInformation("127.0.0.1", 0)
    )
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert made.socket is not None
        assert made.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        reactor.BulkRecvSocket(association.Association(AE(), "acceptor"), client_socket=accepted)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        made.close()
        for s in (client, accepted, listener):
            s.close()
