"""The durable spool: instance bytes on disk before anyone is told "stored".

Write to a temporary file, fsync it, rename it into place, fsync the directory.
Only then may the index record it and the SCP answer success.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import SpoolFull, StorageError

INSTANCES = "instances"
OUTPUTS = "outputs"
INDEX_DB = "index.sqlite3"
STAGING = "staging"  # STOW-RS parts being received; never acknowledged until moved out
TMP_SUFFIX = ".partial"


def uid_key(uid: str, length: int = 16) -> str:
    """A stable, non-identifying key for a UID (for paths and logs)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:length]


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
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
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
        (self.root / INSTANCES).mkdir(parents=True, exist_ok=True)
        (self.root / OUTPUTS).mkdir(parents=True, exist_ok=True)
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)

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

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.root / INSTANCES / uid_key(study_uid) / uid_key(series_uid) / f"{uid_key(sop_uid, 32)}.dcm"
        )

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
    ) -> InstanceRef:
        """fsync a fully written staged file and rename it into place. NOT yet durable: the
        caller must fsync ``ref.path.parent`` (store_staged, or a group commit that fsyncs each
        directory once for many instances) before anyone is told "stored"."""
        self.check_space()
        path = self.instance_path(study_instance_uid, series_instance_uid, sop_instance_uid)
        try:
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staged, path)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Staged on another file system (not this spool's staging dir): copy, then the
                # same tmp -> fsync -> rename; the caller's fsync(dir) follows as for a rename.
                tmp = path.with_name(path.name + TMP_SUFFIX)
                shutil.copyfile(staged, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
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
