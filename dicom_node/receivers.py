"""Several receiver processes behind the SCP's one port (``scp.receivers`` > 1).

Why: one Python process serves C-STOREs on about one core (the GIL); with concurrent
associations the node process is the bottleneck while other cores idle (bench/bench_ingest.py).
With SO_REUSEPORT the kernel spreads new connections over the node's listening socket and
those of ``scp.receivers - 1`` receiver processes (``python -m dicom_node.receivers``).

A receiver runs the same guarded server (dicom_node.scp) on the same spool and index: it serves
storage-only associations itself with the lean acceptor (fsync, rename, group commit within the
process; SQLite serialises the processes' transactions, WAL). Anything else (C-FIND, C-MOVE,
storage commitment reports, anything pynetdicom must answer) is handed to the node process
with its socket, still unread (the guard only peeked at the A-ASSOCIATE-RQ), over a Unix socket
(SCM_RIGHTS): the node serves it exactly as if it had accepted it.

Limits: max_associations and max_associations_per_peer are counted in each process;
/metrics shows the node process's counters. TLS sessions cannot be handed between processes:
receivers need plaintext DICOM (checked in ScpSection). A receiver stops when the node stops,
when it is sent SIGTERM, and when the node process is gone (its Unix socket closes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.config import ScpSection
from dicom_node.spool import Spool

if TYPE_CHECKING:
    from dicom_node.scp import GuardedAssociationServer

logger = logging.getLogger(__name__)

#: A receiver that is not listening this long after it was started is stopped, and start-up fails.
READY_TIMEOUT_S = 30.0
_READY = b"ready"
#: A receiver's exit status when some instance it stored has no index row (dicom_node.group_commit).
UNINDEXED_EXIT = 3
_MAX_MESSAGE = 1024


@dataclass(frozen=True)
class ReceiverSpec:
    """What a receiver process is given on its standard input (pickled; it is our own child)."""

    scp: ScpSection  # the node's, with port = the bound port
    spool_root: Path
    min_free_bytes: int
    log_level: str
    log_json: bool
    number: int


class ReceiverPool:
    """The node process's side: starts the receivers and serves what they hand over."""

    def __init__(self, server: GuardedAssociationServer, scp: ScpSection, spool: Spool) -> None:
        self.server = server
        self._procs: list[subprocess.Popen[bytes]] = []
        self._ends: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: After ``stop``: every receiver ended on its own with all its instances indexed.
        self.all_indexed = True
        port = int(server.server_address[1])
        root = logging.getLogger()
        level = logging.getLevelName(root.level) if root.level else "INFO"
        log_json = any(type(h.formatter).__name__ == "JsonFormatter" for h in root.handlers)
        ready: list[threading.Event] = []
        try:
            for number in range(1, scp.receivers):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                spec = ReceiverSpec(
                    replace(scp, port=port), spool.root, spool.min_free_bytes, level, log_json, number
                )
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dicom_node.receivers", str(theirs.fileno())],
                    stdin=subprocess.PIPE,
                    pass_fds=[theirs.fileno()],
                )
                theirs.close()
                assert proc.stdin is not None
                proc.stdin.write(pickle.dumps(spec))
                proc.stdin.close()
                self._procs.append(proc)
                self._ends.append(ours)
                ready.append(threading.Event())
                thread = threading.Thread(
                    target=self._handoffs,
                    args=(ours, number, ready[-1]),
                    name=f"receiver-{number}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
            for number, event in enumerate(ready, start=1):
                if not event.wait(READY_TIMEOUT_S):
                    raise RuntimeError(
                        f"SCP receiver {number} did not start listening within {READY_TIMEOUT_S:g} s."
                    )
        except BaseException:
            self.stop()
            raise
        logger.info(
            "SCP receivers listening", extra={"event": "scp.receivers", "processes": len(self._procs) + 1}
        )

    def _handoffs(self, end: socket.socket, number: int, ready: threading.Event) -> None:
        """Serve each connection receiver ``number`` hands over, as if this process had accepted it."""
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(end, _MAX_MESSAGE, 1)
            except OSError:
                message, fds = b"", []
            if not message:
                for fd in fds:
                    os.close(fd)
                if not self._stopping.is_set():
                    logger.error(
                        "SCP receiver exited", extra={"event": "scp.receiver_exited", "receiver": number}
                    )
                return
            if message == _READY:
                ready.set()
                continue
            if not fds:
                continue
            sock = socket.socket(fileno=fds[0])
            for fd in fds[1:]:
                os.close(fd)
            address = tuple(json.loads(message))
            try:
                if self.server.verify_request(sock, address):
                    self.server.process_request(sock, address)
                else:
                    self.server.shutdown_request(sock)
            except Exception:  # noqa: BLE001 - one bad hand-over must not stop the others
                logger.error("SCP hand-over failed", exc_info=True, extra={"event": "scp.handoff_error"})
                self.server.shutdown_request(sock)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every receiver (SIGTERM: its associations end, nothing partial is kept), then wait."""
        self._stopping.set()
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode != 0:  # killed, or rows left unindexed (_serve): not a clean stop
                self.all_indexed = False
        for end in self._ends:
            with contextlib.suppress(OSError):
                end.close()
        for thread in self._threads:
            thread.join(timeout_s)


class Handoff:
    """A receiver's side of its Unix socket: hands connections to the node process."""

    def __init__(self, end: socket.socket) -> None:
        self.end = end
        self._lock = threading.Lock()

    def __call__(self, request: socket.socket, client_address: Any) -> None:
        """Send the connection, unread, to the node process; only our descriptor is closed (no
        shutdown: the connection lives on in the node)."""
        try:
            with self._lock:
                socket.send_fds(self.end, [json.dumps(list(client_address)).encode()], [request.fileno()])
        finally:
            request.close()

    def ready(self) -> None:
        with self._lock:
            self.end.send(_READY)


def _serve(spec: ReceiverSpec, end: socket.socket) -> None:
    from dicom_node.index import Index
    from dicom_node.scp import start_scp
    from radbridge_common import logs

    logs.configure(spec.log_level, spec.log_json)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    spool = Spool(spec.spool_root, spec.min_free_bytes)
    index = Index(spool.index_path)
    handoff = Handoff(end)
    server = start_scp(spec.scp, spool, index, handoff=handoff)
    handoff.ready()

    def watch_node() -> None:  # the node process is gone (or closed our socket): stop
        with contextlib.suppress(OSError):
            while end.recv(_MAX_MESSAGE):
                pass
        stop.set()

    threading.Thread(target=watch_node, name="watch-node", daemon=True).start()
    logger.info("SCP receiver started", extra={"event": "scp.receiver_start", "receiver": spec.number})
    stop.wait()
    server.shutdown()
    index.close()
    if not server.all_indexed:
        sys.exit(UNINDEXED_EXIT)


def main(argv: list[str]) -> None:
    end = socket.socket(fileno=int(argv[0]))
    spec = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 - written by our own parent process
    _serve(spec, end)


if __name__ == "__main__":
    main(sys.argv[1:])
