"""Index rows lost with an unsynced WAL tail come back from the spool's files at the next start."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import HttpSection, NodeSettings, ScpSection, SpoolSection
from dicom_node.index import Index
from dicom_node.node import Node
from dicom_node.recovery import recover, reindex_spool
from dicom_node.spool import InstanceRef, Spool
from tests.conftest import StartScp
from tests.peers import missing_tools, storescu

COLUMNS = "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, transfer_syntax_uid, modality, path, size, attributes"


def _rows(index: Index) -> dict[str, tuple]:
    with sqlite3.connect(index.path) as db:
        return {r[0]: r for r in db.execute(f"SELECT {COLUMNS} FROM instances")}


def _lose_rows(index: Index, sop_uids: list[str]) -> None:
    """What a power loss does to the commits made after the last WAL sync."""
    with sqlite3.connect(index.path) as db:
        db.executemany("DELETE FROM instances WHERE sop_instance_uid=?", [(u,) for u in sop_uids])


@pytest.fixture
def received(start_node_scp: StartScp, small_ct_files: list[Path]) -> tuple[Spool, Index, dict[str, tuple]]:
    """Eight CT slices received over DICOM (dcmtk storescu), indexed as the SCP indexes them."""
    if missing_tools("storescu"):
        pytest.skip("dcmtk storescu missing; apt-get install dcmtk")
    port, spool, index = start_node_scp()
    result = storescu(small_ct_files[:8], "127.0.0.1", port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors
    rows = _rows(index)
    assert len(rows) == 8
    return spool, index, rows


def test_lost_rows_are_indexed_again_from_the_files_as_they_were(
    received: tuple[Spool, Index, dict[str, tuple]], small_ct_files: list[Path]
) -> None:
    spool, index, before = received
    lost = sorted(before)[:3]
    _lose_rows(index, lost)
    assert len(_rows(index)) == 5
    recover(spool, index)  # the last stop was not clean: nothing ever marked it
    assert _rows(index) == before  # same paths, sizes, identifiers and searchable attributes
    assert json.loads(before[lost[0]][-1])  # (the attributes are not empty)
    study = str(pydicom.dcmread(small_ct_files[0], stop_before_pixels=True).StudyInstanceUID)
    recovered = [e for e in index.events(study) if e["event"] == "recovered"]
    assert [e["detail"] for e in recovered] == ["instances re-indexed from the spool after an unclean stop"]


def test_a_study_whose_every_row_was_lost_comes_back_beside_one_that_lost_none(
    received: tuple[Spool, Index, dict[str, tuple]],
) -> None:
    """Recovery reads the index's paths a study at a time: a study the index no longer knows at
    all is scanned whole, and another study's known files are not read again."""
    spool, index, before = received
    study_b, series_b = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1"
    path_b = spool.instance_path(study_b, series_b, "1.2.826.0.1.3680043.8.498.7.1.1")
    path_b.parent.mkdir(parents=True)
    path_b.write_bytes(b"not read: its row is known")
    index.add_instance(
        InstanceRef("1.2.826.0.1.3680043.8.498.7.1.1", "1.2.840.10008.5.1.4.1.1.2", study_b, series_b,
                    "1.2.840.10008.1.2.1", path_b, 26),
        "CT", "SCU",
    )  # fmt: skip
    assert len(index.indexed_study_uids()) == 2 and index.indexed_paths(study_b) == {str(path_b)}
    _lose_rows(index, sorted(before))  # every row of the CT study
    assert reindex_spool(spool, index) == (8, 0)  # the other study's unreadable file was never opened
    rows = _rows(index)
    assert {k: v for k, v in rows.items() if k in before} == before


def test_after_a_clean_stop_the_spool_is_not_scanned(received: tuple[Spool, Index, dict[str, tuple]]) -> None:
    spool, index, before = received
    index.mark_running()
    index.mark_clean_stop()
    _lose_rows(index, sorted(before)[:1])  # (a clean stop cannot lose rows; this shows no scan ran)
    recover(spool, index)
    assert len(_rows(index)) == 7
    recover(spool, index)  # this start was not stopped cleanly: the next one scans
    assert len(_rows(index)) == 8


def test_an_unreadable_file_is_counted_and_left_in_place(
    received: tuple[Spool, Index, dict[str, tuple]],
) -> None:
    spool, index, before = received
    victim = Path(before[sorted(before)[0]][6])
    _lose_rows(index, [sorted(before)[0]])
    victim.write_bytes(b"not DICOM")
    assert reindex_spool(spool, index) == (0, 1)
    assert victim.exists() and len(_rows(index)) == 7


def test_the_node_marks_a_clean_stop_and_a_kill_leaves_it_unmarked(tmp_path: Path) -> None:
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"), scp=ScpSection(port=0), http=HttpSection(enabled=False)
    )
    node = Node(settings, "127.0.0.1:1").start()
    node.stop()
    index = Index(Spool(tmp_path / "spool").index_path)
    try:
        assert index.mark_running() is True  # the stop was clean
        assert index.mark_running() is False  # this "run" was never stopped: as after a kill
    finally:
        index.close()


def test_a_node_whose_rows_were_not_all_recorded_does_not_mark_its_stop_clean(
    tmp_path: Path, small_ct_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node.stop takes the server's ``all_indexed``: an instance answered "stored" whose row could
    not be inserted leaves the stop unmarked, and the next start indexes it from the spool."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE

    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"), scp=ScpSection(port=0), http=HttpSection(enabled=False)
    )
    node = Node(settings, "127.0.0.1:1").start()

    def broken(items: object, now: object = None, *, synced: bool = True) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(node.index, "add_instances", broken)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=settings.scp.ae_title)
        assert assoc.is_established
        assert assoc.send_c_store(small_ct_files[0]).Status == 0x0000  # the file is durable: "stored"
        assoc.release()
    finally:
        node.stop()
    monkeypatch.undo()

    again = Node(settings, "127.0.0.1:1").start()  # recovery runs: the stop was not marked clean
    try:
        (row,) = again.index.study_instances(pydicom.dcmread(small_ct_files[0]).StudyInstanceUID)
        assert row.sop_instance_uid == pydicom.dcmread(small_ct_files[0]).SOPInstanceUID
    finally:
        again.stop()
