"""Group commit: many instances made durable and indexed with one directory fsync and one SQLite
transaction, each caller still answered only once ITS instance is durable and indexed.

Each caller has already fsynced its staged file and renamed it into place (Spool.place_staged,
in its own thread, so file fsyncs of concurrent associations overlap). Then, in ``commit``:
the first caller to find no commit running becomes the leader: it takes every instance waiting
(its own and those that arrived while the previous group was committed), fsyncs each directory
they were renamed into once, records them all in one transaction (WAL, not synced: the fsynced
spool files are the record, and an unclean stop re-indexes any file whose row was lost,
dicom_node.recovery), and wakes the others. A caller returns only when its group is done; if the directory fsync or the
transaction fails, every instance of that group gets the error (never success). With one
association there is no one to wait for: the caller is its own leader, no thread hand-off.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import StorageError
from dicom_node.index import Index, ReceivedInstance
from dicom_node.spool import fsync_dir


@dataclass
class _Waiting:
    received: ReceivedInstance
    done: bool = False
    error: BaseException | None = None


class GroupCommitter:
    """fsync(dir) + index insert for instances already fsynced and renamed into the spool."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._committing = False

    def commit(self, received: ReceivedInstance) -> None:
        """Return once ``received`` is durable (its directory fsynced) and indexed; else raise."""
        mine = _Waiting(received)
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

    def _commit(self, group: list[_Waiting]) -> None:
        try:
            directories: set[Path] = {w.received.ref.path.parent for w in group}
            try:
                for directory in directories:
                    fsync_dir(directory)
            except OSError as exc:
                raise StorageError(f"Out of resources: cannot write spool ({exc.strerror})") from exc
            # Not synced: each file and its directory are, and they are the record (dicom_node.recovery).
            self.index.add_instances([w.received for w in group], synced=False)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the group, re-raised there
            for w in group:
                w.error = exc
        for w in group:
            w.done = True
