"""The memory the node's analyses may hold at once, shared by the analysis threads.

A per-thread share (the machine's memory / threads) refuses a study that would fit in the
machine if it ran alone: two threads on 24 GB gave each 6 GB, so a 4 GB CT (≈ 9 GB while
analysed) was refused although nothing else was running. Here the budget is one pool: an
analysis reserves what its volume will need (its voxel bytes × ANALYSIS_MEMORY_FACTOR) before
any pixel is read, waits while other analyses hold the rest, and gives it back when its SEG and
SRs are written. Only a volume larger than the whole pool is refused (``VolumeTooLarge``, from
``volume.read_series``, with its reason). One analysis alone always fits: no wait can deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dicom_node.errors import RadBridgeError

logger = logging.getLogger(__name__)

#: Peak memory of one analysis as a multiple of its volume's voxel bytes (node + embedded
#: reference engine, one process): 2.2-2.5x measured with bench/bench_e2e.py at 1000-2000
#: slices, 3 keeps a margin for the model backends' own copies.
ANALYSIS_MEMORY_FACTOR = 3


class MemoryWaitInterrupted(RadBridgeError):
    """The node stopped while an analysis waited for memory: the job runs again later."""

    retryable = True


Admit = Callable[[int], None]


class MemoryBudget:
    """A pool of ``total_bytes`` (0 = no limit) that analyses reserve from and wait on."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self._held = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def held_bytes(self) -> int:
        return self._held

    def max_voxel_bytes(self) -> int:
        """The largest volume one analysis may read (0 = no limit)."""
        return self.total_bytes // ANALYSIS_MEMORY_FACTOR if self.total_bytes else 0

    @contextmanager
    def admission(self, on_wait: Callable[[int, int], None] | None = None) -> Iterator[Admit]:
        """Yield ``admit(voxel_bytes)``: it reserves that volume's analysis memory, waiting while
        other analyses hold it (``on_wait(needed, held)`` is called once before waiting). Whatever
        was reserved is given back when the block ends, however it ends."""
        reserved = 0

        def admit(voxel_bytes: int) -> None:
            nonlocal reserved
            if not self.total_bytes:
                return
            # read_series refused anything over max_voxel_bytes, so this never exceeds the pool.
            needed = min(self.total_bytes, voxel_bytes * ANALYSIS_MEMORY_FACTOR)
            with self._cond:
                if self._held + needed > self.total_bytes and on_wait is not None:
                    on_wait(needed, self._held)
                started = time.monotonic()
                while self._held + needed > self.total_bytes:
                    if self._closed:
                        raise MemoryWaitInterrupted("The node stopped while this analysis waited for memory.")
                    self._cond.wait()
                self._held += needed
                reserved += needed
            if time.monotonic() - started > 0.001:
                logger.info(
                    "memory admitted",
                    extra={
                        "event": "memory.admitted",
                        "bytes": needed,
                        "waited_ms": round(1000 * (time.monotonic() - started)),
                    },
                )

        try:
            yield admit
        finally:
            if reserved:
                with self._cond:
                    self._held -= reserved
                    self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting analysis with MemoryWaitInterrupted (the node is stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
