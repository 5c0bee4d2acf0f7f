"""Group commit: every caller returns only once its own instance is durable and indexed."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import dicom_node.group_commit as group_commit
from dicom_node.errors import StorageError
from dicom_node.group_commit import GroupCommitter
from dicom_node.index import Index, ReceivedInstance
from dicom_node.spool import Spool


def _placed(spool: Spool, n: int, study: str = "1.2.3") -> list[ReceivedInstance]:
    received = []
    for i in range(n):
        staged = spool.staging_path()
        staged.write_bytes(b"instance %d" % i)
        ref = spool.place_staged(
            staged,
            sop_instance_uid=f"1.2.3.4.{i}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study,
            series_instance_uid="1.2.3.5",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        received.append(ReceivedInstance(ref, "CT", "PEER"))
    return received


def test_concurrent_commits_are_grouped_and_all_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    index = Index(spool.index_path)
    committer = GroupCommitter(index)
    dir_syncs: list[Path] = []
    real = group_commit.fsync_dir
    gate = threading.Event()

    def slow_fsync_dir(directory: Path) -> None:
        dir_syncs.append(directory)
        gate.wait(5)  # the first group holds the lead while the others queue up
        real(directory)

    monkeypatch.setattr(group_commit, "fsync_dir", slow_fsync_dir)
    received = _placed(spool, 8)
    done: list[str] = []
    threads = [
        threading.Thread(target=lambda r=r: (committer.commit(r), done.append(r.ref.sop_instance_uid)))
        for r in received
    ]
    for t in threads:
        t.start()
    while len(dir_syncs) < 1:
        threading.Event().wait(0.01)
    assert not done  # nobody is answered before its directory is synced and its row committed
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(done) == sorted(r.ref.sop_instance_uid for r in received)
    assert len(dir_syncs) < len(received)  # grouped: fewer directory syncs than instances
    assert index.count_instances() == 8
    index.close()


def test_a_failed_group_fails_every_caller_and_indexes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    index = Index(spool.index_path)
    committer = GroupCommitter(index)
    (received,) = _placed(spool, 1)

    def broken_fsync_dir(directory: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(group_commit, "fsync_dir", broken_fsync_dir)
    with pytest.raises(StorageError, match="cannot write spool"):
        committer.commit(received)
    monkeypatch.undo()

    def broken_insert(items: list[ReceivedInstance], now: float | None = None, *, synced: bool = True) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(index, "add_instances", broken_insert)
    with pytest.raises(sqlite3.OperationalError):
        committer.commit(received)
    monkeypatch.undo()
    assert index.count_instances() == 0
    committer.commit(received)  # the committer is usable after a failure
    assert index.count_instances() == 1
    index.close()


Node = tuple[Spool, Index, GroupCommitter]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    spool = Spool(tmp_path)
    index = Index(spool.index_path)
    yield spool, index, GroupCommitter(index)
    index.close()


def _broken_insert(items: list[ReceivedInstance], now: float | None = None, *, synced: bool = True) -> None:
    raise sqlite3.OperationalError("disk I/O error")


def test_deferred_rows_are_recorded_by_index_pending(node: Node) -> None:
    """``index_now=False`` (the lean acceptor): durable on return, the row after the answer."""
    spool, index, committer = node
    first, second = _placed(spool, 2)
    committer.commit(first, index_now=False)
    committer.commit(second, index_now=False)
    assert index.count_instances() == 0
    committer.index_pending()
    assert index.count_instances() == 2
    assert committer.drain()


def test_a_failed_deferred_insert_is_kept_retried_and_refuses_while_it_fails(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, index, committer = node
    a, b, c = _placed(spool, 3)
    monkeypatch.setattr(index, "add_instances", _broken_insert)
    committer.commit(a, index_now=False)  # durable: the peer is told so
    committer.index_pending()  # fails; a's row is kept
    with pytest.raises(StorageError, match="cannot index"):
        committer.commit(b, index_now=False)  # the retry fails too: no more "stored" while so
    assert not committer.drain()
    monkeypatch.undo()
    committer.commit(c, index_now=False)  # the retry succeeds: a is recorded first
    assert index.indexed_paths("1.2.3") == {str(a.ref.path)}
    committer.index_pending()
    assert index.indexed_paths("1.2.3") == {str(a.ref.path), str(c.ref.path)}
    assert committer.drain()


def test_rows_queued_while_another_thread_records_are_not_left_behind(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, index, committer = node
    first, second = _placed(spool, 2)
    real = index.add_instances
    inside, gate = threading.Event(), threading.Event()
    batches: list[int] = []

    def slow_insert(items: list[ReceivedInstance], now: float | None = None, *, synced: bool = True) -> None:
        batches.append(len(items))
        inside.set()
        gate.wait(5)
        real(items, now, synced=synced)

    monkeypatch.setattr(index, "add_instances", slow_insert)
    committer.commit(first, index_now=False)
    recorder = threading.Thread(target=committer.index_pending)
    recorder.start()
    assert inside.wait(5)
    committer.commit(second, index_now=False)
    committer.index_pending()  # returns at once: the other thread is recording, and looks again
    assert index.count_instances() == 0
    gate.set()
    recorder.join(5)
    assert batches == [1, 1]
    assert index.count_instances() == 2
