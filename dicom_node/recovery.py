"""After an unclean stop: index the spooled instances whose index rows were lost.

Why this exists: a C-STORE is answered once its file is fsynced into the spool and its directory
fsynced, and its index row committed without a sync of its own (dicom_node.group_commit): one
fsync fewer on every instance's path. The row survives a crash of the process (it is in the
WAL, written), but a power loss can lose the last unsynced commits. The files are the record:
at the next start, if the previous stop was not clean (Index.mark_running), every instance file
the index does not know is read and indexed, as received, with an event on its study.

A file that cannot be read is left where it is and counted in the log (it was acknowledged
whole; only damage on the disk since could do that).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread

from dicom_node.attributes import check_identifiers, identifiers, searchable_attributes
from dicom_node.index import Index, ReceivedInstance
from dicom_node.spool import INSTANCES, InstanceRef, Spool, uid_key

logger = logging.getLogger(__name__)

#: Rows recorded per transaction while recovering.
BATCH = 500


def _study_dirs(spool: Spool) -> Iterator[os.DirEntry[str]]:
    """instances/<study key>/, without following links."""
    for study in os.scandir(spool.root / INSTANCES):
        if study.is_dir(follow_symlinks=False):
            yield study


def _instance_files(study: os.DirEntry[str]) -> Iterator[Path]:
    """<study key>/<series>/<instance>.dcm, without following links."""
    for series in os.scandir(study.path):
        if not series.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(series.path):
            if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def _received(path: Path) -> ReceivedInstance:
    ds = dcmread(path, stop_before_pixels=True)
    values = check_identifiers(identifiers(ds))
    ref = InstanceRef(
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        path=path,
        size=path.stat().st_size,
    )
    return ReceivedInstance(ref, values["Modality"], "", searchable_attributes(ds))


def reindex_spool(spool: Spool, index: Index) -> tuple[int, int]:
    """Index every instance file the index lacks; (indexed, unreadable).

    The index's paths are read one study at a time (a study's directory is named by its key), so
    memory follows the largest study rather than the whole spool."""
    study_uids = {uid_key(uid): uid for uid in index.indexed_study_uids()}
    batch: list[ReceivedInstance] = []
    indexed = unreadable = 0
    studies: set[str] = set()
    for study_dir in _study_dirs(spool):
        uid = study_uids.get(study_dir.name)
        known = index.indexed_paths(uid) if uid is not None else set()  # a study whose every row was lost
        for path in _instance_files(study_dir):
            if str(path) in known:
                continue
            try:
                item = _received(path)
            except Exception:  # noqa: BLE001 - any damage: leave the file, count it, go on
                unreadable += 1
                continue
            batch.append(item)
            studies.add(item.ref.study_instance_uid)
            if len(batch) >= BATCH:
                index.add_instances(batch)
                indexed += len(batch)
                batch = []
    if batch:
        index.add_instances(batch)
        indexed += len(batch)
    for study in studies:
        index.add_event(study, "recovered", "instances re-indexed from the spool after an unclean stop")
    return indexed, unreadable


def recover(spool: Spool, index: Index) -> None:
    """At start-up: if the last stop was not clean, re-index what the index lost."""
    if index.mark_running():
        return
    indexed, unreadable = reindex_spool(spool, index)
    log = logger.warning if indexed or unreadable else logger.info
    log(
        "spool checked after an unclean stop",
        extra={"event": "spool.recovered", "indexed": indexed, "unreadable": unreadable},
    )
