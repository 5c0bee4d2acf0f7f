"""Group commit: many instances made durable with one directory fsync per directory, and indexed
with one SQLite transaction, each caller still answered only once ITS instance is durable.

Each caller has already fsynced its staged file and renamed it into place (Spool.place_staged,
in its own thread, so file fsyncs of concurrent associations overlap). Then, in ``commit``:
the first caller to find no commit running becomes the leader: it takes every instance waiting
(its own and those that arrived while the previous group was committed), fsyncs each directory
they were renamed into once, and wakes the others. A caller returns only when its group is done;
if the directory fsync fails, every instance of that group gets the error (never success). With
one association there is no one to wait for: the caller is its own leader, no thread hand-off.

The index rows (WAL, not synced: the fsynced spool files are the record, and an unclean stop
re-indexes any file whose row was lost, dicom_node.recovery) go in one of two ways:

- ``commit(..., index_now=True)`` (pynetdicom's handler, which answers when it returns): the
  leader records its group's rows before anyone returns; a failed transaction fails the group.
- ``index_now=False`` (the lean acceptor): the rows wait in the committer and the caller answers
  the peer first, then calls ``index_pending``. The row is not what makes the instance safe, and
  with one association the peer is preparing its next instance meanwhile: the insert (0.16 ms,
  a tenth of the time per 512 KB CT instance) leaves the acknowledgement's path.
  The rows are in before that association reads its next PDU, so a released association's
  instances are all indexed. A failed insert keeps its rows waiting; the next ``commit`` retries
  them first and, while that fails, refuses its own instance (as ``index_now=True`` would).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import StorageError
from dicom_node.index import Index, ReceivedInstance
from dicom_node.spool import fsync_dir

logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    received: ReceivedInstance
    index_now: bool
    done: bool = False
    error: BaseException | None = None


class GroupCommitter:
    """fsync(dir) + index insert for instances already fsynced and renamed into the spool."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._committing = False
        self._unindexed: list[ReceivedInstance] = []  # durable, acknowledged or about to be; no row yet
        self._indexing = threading.Lock()
        self._index_failed = False

    def commit(self, received: ReceivedInstance, *, index_now: bool = True) -> None:
        """Return once ``received`` is durable (its directory fsynced) and, with ``index_now``,
        indexed; else raise. Without it the caller must call ``index_pending`` once it has answered."""
        if self._index_failed:
            with self._indexing:
                retried = self._index_waiting()
            if not retried:
                raise StorageError("Out of resources: cannot index received instances")
        mine = _Waiting(received, index_now)
        with self._cond:
            self._waiting.append(mine)
            while not mine.done:
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                group, self._waiting = self._waiting, []
                self._cond.release()
                try:
                    self._commit(group)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error

    def index_pending(self) -> None:
        """Record the rows ``commit(index_now=False)`` left waiting, in one transaction. If another
        thread is recording, it takes these too (it looks again before it lets go)."""
        while True:
            if not self._indexing.acquire(blocking=False):
                return
            try:
                self._index_waiting()
            finally:
                self._indexing.release()
            with self._cond:
                if not self._unindexed or self._index_failed:
                    return

    def drain(self) -> bool:
        """At a stop, after the last association: record what is still waiting; True if nothing is
        left unindexed (else the files are found by the next start's recovery, if the stop is not
        marked clean)."""
        with self._indexing:
            if self._index_waiting():
                return True
        with self._cond:
            left = len(self._unindexed)
        logger.error(
            "received instances left unindexed at stop",
            extra={"event": "scp.unindexed_at_stop", "instances": left},
        )
        return False

    def _index_waiting(self) -> bool:
        """Insert the waiting rows (the caller holds ``_indexing``, or none can); True if none is left."""
        with self._cond:
            batch, self._unindexed = self._unindexed, []
        if not batch:
            return True
        try:
            self.index.add_instances(batch, synced=False)
        except Exception as exc:  # noqa: BLE001 - kept for the next try; the next commit refuses
            with self._cond:
                self._unindexed[:0] = batch
                self._index_failed = True
            logger.error(
                "index insert failed; rows kept for the next try",
                extra={"event": "scp.index_failed", "instances": len(batch), "error": type(exc).__name__},
            )
            return False
        self._index_failed = False
        return True

    def _commit(self, group: list[_Waiting]) -> None:
        try:
            directories: set[Path] = {w.received.ref.path.parent for w in group}
            try:
                for directory in directories:
                    fsync_dir(directory)
            except OSError as exc:
                raise StorageError(f"Out of resources: cannot write spool ({exc.strerror})") from exc
            now = [w.received for w in group if w.index_now]
            if now:
                # Not synced: each file and its directory are, and they are the record (dicom_node.recovery).
                self.index.add_instances(now, synced=False)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the group, re-raised there
            for w in group:
                w.error = exc
        else:
            later = [w.received for w in group if not w.index_now]
            if later:
                with self._cond:
                    self._unindexed.extend(later)
        for w in group:
            w.done = True
