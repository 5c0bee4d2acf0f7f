"""Several inference service replicas behind one node: each analysis goes to the least busy one.

Why here and not in a load balancer: the node already knows how many analyses it has in flight
on each replica (a gRPC stream per analysis, minutes long), which a connection-level balancer
does not; and a replica that stops answering is set aside for a while, so the job's retry goes to
another one instead of waiting on the dead one.

With several replicas the pool also asks each one's gRPC health service every
``health_interval_s``: one that is down or NOT_SERVING is set aside before a job
is sent to it. One set aside because a job failed on it comes back early only if the health
checks saw it go down and serve again (a restart); one that kept answering SERVING while its
analyses failed (overloaded, a broken model) waits out its cooldown, so jobs are not sent back
to it every ``health_interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from dicom_node.client import AnalysisOutcome, InferenceClient, ProgressHandler, Upload
from dicom_node.errors import InferenceUnavailable
from protos.radbridge.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)
DEFAULT_COOLDOWN_S = 30.0


class ReplicaPool:
    """Hands out clients: fewest analyses in flight first, then the longest idle; replicas that
    failed to answer within ``cooldown_s`` come last (they are still used when all have failed)."""

    def __init__(
        self,
        addresses: Sequence[str],
        make_client: Callable[[str], InferenceClient],
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        unique = list(dict.fromkeys(a.strip() for a in addresses if a.strip()))
        if not unique:
            raise ValueError("An inference service address (host:port) is required.")
        self.addresses = unique
        self._make_client = make_client
        self._cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._in_flight = dict.fromkeys(unique, 0)
        self._failed_at = dict.fromkeys(unique, float("-inf"))  # its last failed job
        self._down = dict.fromkeys(unique, False)  # the health service's view: down or NOT_SERVING
        self._restarted = dict.fromkeys(unique, False)  # seen down since its last failed job
        self._last_used = dict.fromkeys(unique, float("-inf"))
        self._stop = threading.Event()
        self._checker: threading.Thread | None = None
        self._probes: dict[str, InferenceClient] = {}

    def check_health(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """Ask every replica's health service; set aside the unhealthy, bring back the healthy."""
        states: dict[str, bool] = {}
        for address in self.addresses:
            probe = self._probes.get(address)
            if probe is None:
                probe = self._probes[address] = self._make_client(address)
            healthy = probe.healthy(timeout_s)
            states[address] = healthy
            with self._lock:
                was_down = self._down[address]
                self._down[address] = not healthy
                if not healthy:
                    self._restarted[address] = True
                elif self._restarted[address]:  # down, then serving again: its failed job is forgiven
                    self._failed_at[address] = float("-inf")
                    self._restarted[address] = False
            if healthy == was_down:
                logger.info(
                    "inference replica health changed",
                    extra={"event": "inference.replica_health", "address": address, "serving": healthy},
                )
        return states

    def start_health_checks(self, interval_s: float) -> None:
        """Probe in a background thread (only worth it with more than one replica)."""
        if interval_s <= 0 or len(self.addresses) < 2 or self._checker is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check_health(min(2.0, interval_s))
                except Exception:  # a probe must never take the node down
                    logger.exception("replica health check failed", extra={"event": "inference.health_error"})

        self._checker = threading.Thread(target=loop, name="replica-health", daemon=True)
        self._checker.start()

    def close(self) -> None:
        self._stop.set()
        if self._checker is not None:
            self._checker.join(timeout=5)
            self._checker = None
        for probe in self._probes.values():
            probe.close()
        self._probes.clear()

    def _pick(self) -> str:
        now = time.monotonic()
        with self._lock:
            address = min(
                self.addresses,
                key=lambda a: (
                    self._down[a] or now - self._failed_at[a] < self._cooldown_s,
                    self._in_flight[a],
                    self._last_used[a],
                ),
            )
            self._in_flight[address] += 1
            self._last_used[address] = now
        return address

    def _release(self, address: str, failed: bool) -> None:
        with self._lock:
            self._in_flight[address] -= 1
            if failed:
                self._failed_at[address] = time.monotonic()
                # Already seen down: the failure is that outage, and SERVING again ends it.
                self._restarted[address] = self._down[address]
        if failed and len(self.addresses) > 1:
            logger.warning(
                "inference replica set aside",
                extra={"event": "inference.replica_down", "address": address, "cooldown_s": self._cooldown_s},
            )

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    def client(self) -> PooledClient:
        """A client of the chosen replica; ``close()`` gives its slot back."""
        address = self._pick()
        try:
            return PooledClient(self, address, self._make_client(address))
        except Exception:
            self._release(address, failed=False)
            raise

    def list_models(self, timeout_s: float) -> list[pb.ModelInfo]:
        """The models of the first replica that answers (replicas are expected to serve the same)."""
        error: InferenceUnavailable | None = None
        for address in self.addresses:
            client = self._make_client(address)
            try:
                return list(client.list_models(timeout_s=timeout_s).models)
            except InferenceUnavailable as exc:
                error = exc
            finally:
                client.close()
        assert error is not None
        raise error


class PooledClient:
    """The part of ``InferenceClient`` the worker uses, with the pool's bookkeeping around it."""

    def __init__(self, pool: ReplicaPool, address: str, client: InferenceClient) -> None:
        self.address = address
        #: The replica's own client (its channel, TLS and all).
        self._pool = pool
        self.client = client
        self._failed = False
        self._closed = False

    def analyze_upload(self, upload: Upload, on_progress: ProgressHandler | None = None) -> AnalysisOutcome:
        try:
            return self.client.analyze_upload(upload, on_progress)
        except InferenceUnavailable:
            self._failed = True
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.close()
        self._pool._release(self.address, self._failed)
