"""A flood of malformed connections must not stop the node's SCP serving a real sender.

Attackers on other loopback addresses (127.0.0.2-5) keep opening connections that send
random bytes, a PDU header announcing 0xFFFFFFFF bytes, a truncated A-ASSOCIATE-RQ, or
nothing, and hold them open; meanwhile dcmtk storescu (from 127.0.0.1) sends a small study
again and again with the node's default [scp] limits. Run with -s or -rA to see the figures.
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import StartScp
from tests.peers import GARBAGE_KINDS, echoscu, garbage_connection, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("require_dcmtk")]

ATTACKERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
GARBAGE_CONNECTIONS = 100
MIN_LEGIT_SENDS = 5
MAX_LATENCY_S = 2.0


class Flood:
    """One thread per attacker address, each opening every kind of garbage in turn until
    ``total`` connections are made; the sockets stay open until ``close()``."""

    def __init__(self, port: int, total: int, interval_s: float = 0.1) -> None:
        self.port, self.total, self.interval_s = port, total, interval_s
        self.sockets: list[socket.socket] = []
        self.failed_connects = 0
        self._reserved = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._attack, args=(source, random.Random(i)), daemon=True)
            for i, source in enumerate(ATTACKERS)
        ]

    @property
    def made(self) -> int:
        with self._lock:
            return len(self.sockets) + self.failed_connects

    def _attack(self, source: str, rng: random.Random) -> None:
        n = 0
        while not self._stop.is_set():
            with self._lock:
                if self._reserved >= self.total:
                    return
                self._reserved += 1
            try:
                sock = garbage_connection(GARBAGE_KINDS[n % len(GARBAGE_KINDS)], self.port, source, rng)
            except OSError:
                with self._lock:
                    self.failed_connects += 1
            else:
                with self._lock:
                    self.sockets.append(sock)
            n += 1
            time.sleep(self.interval_s)

    def start(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def close(self) -> None:
        self._stop.set()
        self.join()
        for sock in self.sockets:
            sock.close()


def _timed_storescu(paths: list[Path], port: int) -> tuple[float, str | None]:
    """(seconds, None) for a clean send, else (seconds, why it failed)."""
    started = time.monotonic()
    try:
        result = storescu(paths, "127.0.0.1", port, "RADBRIDGE", timeout_s=30)
    except subprocess.TimeoutExpired:
        return time.monotonic() - started, "storescu still running after 30 s"
    failure = None
    if result.returncode != 0 or result.errors:
        failure = f"exit {result.returncode}: " + " | ".join(result.errors or result.stderr.splitlines()[-3:])
    return time.monotonic() - started, failure


def test_garbage_flood_does_not_delay_a_real_sender(
    start_node_scp: StartScp, small_ct_files: list[Path]
) -> None:
    port, _, index = start_node_scp()  # the default [scp] limits
    study = small_ct_files[:4]
    sends: list[tuple[float, str | None]] = []
    flood = Flood(port, GARBAGE_CONNECTIONS).start()
    try:
        while flood.made < 10:
            time.sleep(0.01)
        while flood.running or len(sends) < MIN_LEGIT_SENDS:
            sends.append(_timed_storescu(study, port))
            time.sleep(0.1)
        # The flood is over, but the attackers still hold every connection they opened.
        started = time.monotonic()
        echo = echoscu("127.0.0.1", port, "RADBRIDGE")
        echo_s = time.monotonic() - started
    finally:
        flood.close()

    worst = max(s for s, _ in sends)
    print(
        f"\nflood: {flood.made} garbage connections from {len(ATTACKERS)} addresses "
        f"({flood.failed_connects} connects failed); {len(sends)} storescu sends of {len(study)} instances, "
        f"{sum(f is None for _, f in sends)} succeeded, worst latency {worst:.2f} s; "
        f"echoscu right after the flood: exit {echo.returncode} in {echo_s:.2f} s"
    )
    assert flood.made >= GARBAGE_CONNECTIONS
    assert [f for _, f in sends if f is not None] == []
    assert worst < MAX_LATENCY_S
    assert echo.returncode == 0 and not echo.errors, echo.stderr
    assert echo_s < MAX_LATENCY_S
    assert index.count_instances() == len(study)
