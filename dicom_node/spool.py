"""The durable spool: instance bytes on disk before anyone is told "stored".

Write to a temporary file, fsync it, rename it into place, fsync the directory.
Only then may the index record it and the SCP answer success.

Everything here holds patient data: files are created owner-only (0600) and
directories 0700, by explicit modes rather than by trusting the process umask.
File and directory names are hashes of the UIDs (uid_key), never the UIDs
themselves: a UID from the wire cannot name a path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicom_node.errors import SpoolFull, StorageError

INSTANCES = "instances"
OUTPUTS = "outputs"
INDEX_DB = "index.sqlite3"
STAGING = "staging"  # STOW-RS parts being received; never acknowledged until moved out
TMP_SUFFIX = ".partial"
FILE_MODE = 0o600  # spool files, outputs, the index: owner only
DIR_MODE = 0o700
_SERIES_DIRS_KEPT = 1024  # Spool.series_dir's memory; cleared when full


def uid_key(uid: str, length: int = 16) -> str:
    """A stable, non-identifying key for a UID (for paths and logs).

    UTF-8 with surrogateescape: the same key as ASCII for every valid UID, and two
    different (invalid) UIDs never share a key, as they did when non-ASCII became "?".
    """
    return hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def make_private_dirs(directory: Path, *, durable: bool = False) -> None:
    """Create ``directory`` and its missing parents with mode 0700 (mkdir(parents=True) would
    give the parents the umask's mode).

    ``durable``: also fsync the parent of each directory that was missing, so the new entries
    survive a power loss. Whoever then renames a file into ``directory`` fsyncs only
    ``directory``; POSIX does not make that cover the directory's own entry in its parent (ext4
    with a journal happens to, as does ext4 without one for a directory just made; other file
    systems need not). Once per new study or series, so its cost does not matter."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another thread made it first
            os.mkdir(d, DIR_MODE)
    if durable:  # also where another thread made it: it may not have synced its parent yet
        for d in reversed(missing):
            fsync_dir(d.parent)


def open_private(path: Path) -> BinaryIO:
    """Open ``path`` for writing, created (or truncated) with mode 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode through O_CREAT
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class InstanceRef:
    """Where a spooled instance lives and what identifies it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux (or no libc symbol): start_writeback does nothing
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting (Linux
    sync_file_range SYNC_FILE_RANGE_WRITE). Not a durability step: the fsync before the ack still
    makes the file durable, it just has less left to wait for when the data set's last bytes
    arrive. Errors are ignored (the fsync reports what matters)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _fsync_file(path: Path) -> int:
    """fsync a file by its path; its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """tmp -> fsync -> rename -> fsync(dir). Raises StorageError on any failure."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        make_private_dirs(path.parent, durable=True)
        with open_private(tmp) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StorageError(f"Out of resources: cannot write spool ({exc.strerror})") from exc


class Spool:
    """The spool directory tree: instances/<study>/<series>/<sop>.dcm, outputs/<study>/."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_bytes)
        self._series_dirs: dict[tuple[str, str], Path] = {}
        for directory in (self.root, self.root / INSTANCES, self.root / OUTPUTS, self.root / STAGING):
            make_private_dirs(directory)
        with contextlib.suppress(PermissionError):  # a root we do not own keeps its mode
            os.chmod(self.root, DIR_MODE)

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_DB

    def check_space(self, incoming: int = 0) -> None:
        """Raise SpoolFull when writing ``incoming`` bytes would leave less than the watermark free:
        a sender is refused (and retries later) rather than accepted and then lost."""
        if self.min_free_bytes <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise SpoolFull(
                "Out of resources: spool disk below its free-space watermark",
                free_bytes=free,
                min_free_bytes=self.min_free_bytes,
            )

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """instances/<study>/<series>: remembered per series, as every instance of one needs it
        (its two hashes and three path joins were 2.6% of the C-STORE thread's samples)."""
        key = (study_uid, series_uid)
        directory = self._series_dirs.get(key)
        if directory is None:
            if len(self._series_dirs) >= _SERIES_DIRS_KEPT:
                self._series_dirs.clear()
            directory = self._series_dirs[key] = self.root / INSTANCES / uid_key(study_uid) / uid_key(series_uid)
        return directory

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(study_uid, series_uid) / f"{uid_key(sop_uid, 32)}.dcm"

    def output_dir(self, study_uid: str) -> Path:
        return self.root / OUTPUTS / uid_key(study_uid)

    def store(
        self,
        data: bytes,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        transfer_syntax_uid: str,
    ) -> InstanceRef:
        self.check_space(len(data))
        path = self.instance_path(study_instance_uid, series_instance_uid, sop_instance_uid)
        write_durably(path, data)
        return InstanceRef(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=path,
            size=len(data),
        )

    def staging_path(self) -> Path:
        """A fresh file name for a part being streamed in (same file system as the spool)."""
        return self.root / STAGING / f"{uuid.uuid4().hex}{TMP_SUFFIX}"

    @property
    def staging_dir(self) -> Path:
        return self.root / STAGING

    def store_staged(
        self,
        staged: Path,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        transfer_syntax_uid: str,
    ) -> InstanceRef:
        """Move a fully written staged file into place durably: fsync -> rename -> fsync(dir)."""
        ref = self.place_staged(
            staged,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
        )
        try:
            fsync_dir(ref.path.parent)
        except OSError as exc:
            raise StorageError(f"Out of resources: cannot write spool ({exc.strerror})") from exc
        return ref

    def place_staged(
        self,
        staged: Path,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        transfer_syntax_uid: str,
        fd: int | None = None,
    ) -> InstanceRef:
        """fsync a fully written staged file and rename it into place. NOT yet durable: the
        caller must fsync ``ref.path.parent`` (store_staged, or a group commit that fsyncs each
        directory once for many instances) before anyone is told "stored". ``fd``: the staged
        file, still open (the caller closes it), else it is opened here for its fsync."""
        self.check_space()
        path = self.instance_path(study_instance_uid, series_instance_uid, sop_instance_uid)
        try:
            if fd is not None:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            else:
                size = _fsync_file(staged)
            try:
                try:
                    os.replace(staged, path)
                except FileNotFoundError:
                    # The series' first instance (or its directory was removed since): tried
                    # after the rename, so the other instances cost no stat.
                    make_private_dirs(path.parent, durable=True)
                    os.replace(staged, path)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Staged on another file system (not this spool's staging dir): copy, then the
                # same tmp -> fsync -> rename; the caller's fsync(dir) follows as for a rename.
                # The staged file goes, as a rename would have taken it.
                tmp = path.with_name(path.name + TMP_SUFFIX)
                with open(staged, "rb") as src, open_private(tmp) as dst:
                    shutil.copyfileobj(src, dst)
                _fsync_file(tmp)
                os.replace(tmp, path)
                Path(staged).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"Out of resources: cannot write spool ({exc.strerror})") from exc
        return InstanceRef(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=path,
            size=size,
        )

    def remove_partials(self) -> int:
        """Delete leftovers of writes interrupted by a crash (never acknowledged)."""
        count = 0
        for tmp in self.root.rglob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            count += 1
        return count
