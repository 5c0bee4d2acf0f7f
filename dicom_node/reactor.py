"""Event-driven wake-ups for pynetdicom's two polling loops (acceptor and requestor alike).

Profiling the SCP (bench/bench_ingest.py, a handler that does nothing) showed about a third of
each C-STORE spent asleep: pynetdicom's association reactor sleeps 1 ms between looks at its
message queue, and its DUL thread sleeps 1 ms whenever a pass found nothing to do, so a request
waits for the first, its response for the second and the next request for the second again.
Here the loops keep their code and their order; only *how they wait* changes:

- the DUL thread waits in ``select`` on its socket and on a wake-up pipe that a put on its
  queues (a primitive to send, an event) writes to while it waits, at most ``MAX_WAIT_S``
  (ARTIM, kill);
- the association thread waits on an Event set by every put on its DIMSE message queue and on
  its DUL's to-user queue (a message, a release, an abort), also at most ``MAX_WAIT_S``;
- a ``send_*()`` that pauses the reactor (clears its checkpoint) wakes it too
  (``_WakingCheckpoint``): it had waited up to ``MAX_WAIT_S`` for the reactor to notice, 10 ms
  per C-STORE of a C-MOVE's sub-operations, measured;
- the association thread's own look at its DIMSE queue takes nothing while a ``send_*()`` has
  paused it (``EventDrivenDIMSE.get_msg``): pynetdicom's pause can be read as taken while the
  reactor is past its checkpoint and about to read the queue, and a fast peer's response then
  went to the reactor ("Received unexpected C-STORE service message", then a DIMSE timeout).

The hook points are names pynetdicom's association module looks up when it builds an
Association (its DUL and DIMSE provider classes, its ``time``), so nothing of pynetdicom's is
copied (the socket wrapper, too, is swapped by name: it reads a PDU in 256 KiB pieces);
``install`` checks that the loops it relies on are the ones it knows (pynetdicom 3.0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import ae, association, transport
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from dicom_node import nodelay

logger = logging.getLogger(__name__)

#: Longest wait without a wake-up: how late a kill, ARTIM or idle timeout is noticed.
MAX_WAIT_S = 0.01
#: The association reactor's per-pass sleep (pynetdicom 3.0 association._run_reactor).
_REACTOR_SLEEP_S = 0.001
_WAKE_ATTR = "_radbridge_wake"
#: Bytes asked of the socket per recv while a PDU is read (pynetdicom: 4096, ~128 calls per CT slice).
RECV_CHUNK = 256 * 1024


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``wake`` after every put (an Event's set or a pipe write)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _Pipe:
    """A self-pipe: other threads write a byte so that the DUL's ``select`` returns."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    @staticmethod
    def close(read_fd: int, write_fd: int) -> None:
        for fd in (read_fd, write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _association_wake(assoc: Any) -> threading.Event:
    wake = getattr(assoc, _WAKE_ATTR, None)
    if wake is None:
        wake = threading.Event()
        setattr(assoc, _WAKE_ATTR, wake)
    return wake


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL whose idle passes block in ``select`` instead of sleeping 1 ms."""

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._pipe = _Pipe()
        weakref.finalize(self, _Pipe.close, self._pipe.read_fd, self._pipe.write_fd)
        self._run_loop_delay = 0  # its loop's sleep(0) only yields; the wait is in _idle_wait
        # A put writes to the pipe only while this thread is (about to be) in select: a data set
        # goes out as one P-DATA PDU per max PDU length (16 KiB for dcmtk and Orthanc), and a pipe
        # write for each was a tenth of a C-MOVE's sub-operation time (py-spy).
        self._selecting = False
        self.to_provider_queue = _WakingQueue(self._wake_if_selecting)
        self.event_queue = _WakingQueue(self._wake_if_selecting)
        self.to_user_queue = _WakingQueue(_association_wake(assoc).set)

    def _is_transport_event(self) -> bool:
        # Called only on a pass that sent nothing: wait here until there is something to do.
        if self.to_provider_queue.empty() and self.event_queue.empty() and not self._kill_thread:
            self._idle_wait()
        return super()._is_transport_event()

    def _wake_if_selecting(self) -> None:
        if self._selecting:
            self._pipe.wake()

    def _idle_wait(self) -> None:
        fds: list[Any] = [self._pipe.read_fd]
        sock = getattr(self.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        if sock is not None and sock.fileno() >= 0:
            fds.append(sock)
        # Announce the wait, then look again: a put before this look is seen here, one after it
        # sees _selecting and writes to the pipe, so select never sleeps over queued work.
        self._selecting = True
        try:
            if not (self.to_provider_queue.empty() and self.event_queue.empty()) or self._kill_thread:
                return
            select.select(fds, [], [], MAX_WAIT_S)
        except (OSError, ValueError):  # socket closed under us: the base class reports it
            return
        finally:
            self._selecting = False
        self._pipe.drain()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._pipe.wake()
        if threading.current_thread() is not self:
            self.join()
        return True


class EventDrivenDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose completed messages wake the association reactor, and
    whose reactor never takes the response a ``send_*()`` is waiting for.

    pynetdicom's reactor sets ``_is_paused = True``, waits on its checkpoint, sets it False and
    then reads the queue. A ``send_*()`` clears the checkpoint and waits for ``_is_paused``: if it
    does so while the reactor is between its wait and its read, it reads True, sends, and a peer
    that answers within a GIL switch (loopback, TCP_NODELAY) has its response taken by the
    reactor. Here the reactor's non-blocking read and the check that nobody paused it are one
    step under ``_take_lock``, which ``send_msg`` also passes through: either the reactor read
    before the request went out (so what it took is not the response), or it sees the cleared
    checkpoint and leaves the queue to the ``send_*()``. Only the reactor's own non-blocking
    reads are filtered; a blocking read (a ``send_*()``, also from a C-GET handler on the
    reactor's thread) is pynetdicom's.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self.msg_queue = _WakingQueue(_association_wake(assoc).set)
        self._take_lock = threading.Lock()

    def get_msg(self, block: bool = False) -> Any:
        assoc = self._assoc
        if block or threading.current_thread() is not assoc:
            return super().get_msg(block)
        with self._take_lock:
            if not assoc._reactor_checkpoint.is_set():
                return None, None  # paused by a send_*(): what arrives now is its response
            return super().get_msg(False)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        with self._take_lock:  # a reactor read under way finishes before the request goes out
            pass
        super().send_msg(primitive, context_id)


class _ReactorClock:
    """pynetdicom.association's ``time``: the reactor's 1 ms sleep becomes a wait for work."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        wake = getattr(thread, _WAKE_ATTR, None)
        if wake is None or seconds != _REACTOR_SLEEP_S:
            time.sleep(seconds)  # any other sleep, or an Association built before install
            return
        wake.clear()  # then look: a put or a pause after this sets it again, so nothing is missed
        if (
            thread.dimse.msg_queue.empty()
            and thread.dul.to_user_queue.empty()
            and not thread._kill
            and thread._reactor_checkpoint.is_set()  # cleared: a send_*() waits for the reactor to pause
        ):
            wake.wait(MAX_WAIT_S)


class _WakingCheckpoint(threading.Event):
    """``Association._reactor_checkpoint`` whose ``clear()`` also wakes the reactor.

    A ``send_*()`` clears the checkpoint, then waits until the reactor reaches it and reports
    itself paused; a reactor idle in ``_ReactorClock.sleep`` noticed only at the end of its wait
    (``MAX_WAIT_S``). Only ``clear`` differs from ``threading.Event``.
    """

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


def _get_checkpoint(assoc: Any) -> threading.Event:
    state = assoc.__dict__  # an Association built before install() keeps its plain Event
    return (
        state["_radbridge_checkpoint"] if "_radbridge_checkpoint" in state else state["_reactor_checkpoint"]
    )


def _set_checkpoint(assoc: Any, event: threading.Event) -> None:
    if not isinstance(event, _WakingCheckpoint):
        waking = _WakingCheckpoint(_association_wake(assoc))
        if event.is_set():
            waking.set()
        event = waking
    assoc.__dict__["_radbridge_checkpoint"] = event


class BulkRecvSocket(AssociationSocket):
    """pynetdicom's socket wrapper reading a PDU in large pieces rather than 4 KiB ones, with Nagle
    off on every connection it makes or wraps (dicom_node.nodelay): export, pull, C-MOVE
    sub-operations and commitment alike, and only together with this module's guard against the
    pause race that fast answers expose (``EventDrivenDIMSE``)."""

    def __init__(self, assoc: Any, client_socket: socket.socket | None = None, address: Any = None) -> None:
        super().__init__(assoc, client_socket, address)
        if client_socket is not None:  # accepted by pynetdicom's server
            nodelay.set_nodelay(client_socket)

    def _create_socket(self, address: Any) -> socket.socket:
        sock = super()._create_socket(address)
        nodelay.set_nodelay(sock)  # before connect (and a TLS wrap, which keeps it)
        return sock

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None  # pynetdicom reads only from a connected socket
        data = bytearray()
        while len(data) < nr_bytes:
            piece = sock.recv(min(nr_bytes - len(data), RECV_CHUNK))
            if not piece:  # connection closed: what was read, as pynetdicom does
                break
            data += piece
        return data


def install() -> bool:
    """Make every Association built from now on in this process event-driven (idempotent).

    Another pynetdicom than 3.0 keeps its own polling loops (slower, not wrong): False, logged.
    """
    if not pynetdicom.__version__.startswith("3.0."):
        logger.warning(
            "pynetdicom's polling loops kept",
            extra={"event": "scp.reactor_not_installed", "pynetdicom": pynetdicom.__version__},
        )
        return False
    association.Association._reactor_checkpoint = property(_get_checkpoint, _set_checkpoint)  # type: ignore[assignment]
    association.DULServiceProvider = EventDrivenDUL  # type: ignore[misc]
    association.DIMSEServiceProvider = EventDrivenDIMSE  # type: ignore[misc]
    association.time = _ReactorClock()  # type: ignore[assignment]
    ae.AssociationSocket = BulkRecvSocket  # type: ignore[misc]
    transport.AssociationSocket = BulkRecvSocket  # type: ignore[misc]
    return True
