from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import StorageError
from dicom_node.spool import TMP_SUFFIX, Spool, uid_key, write_durably


def test_write_durably_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.dcm"
    write_durably(path, b"one")
    write_durably(path, b"two")
    assert path.read_bytes() == b"two"
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))


def test_write_failure_is_storage_error_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(StorageError, match="cannot write spool"):
        write_durably(blocker / "child.dcm", b"data")  # parent is a file


def test_spool_paths_hide_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ref = spool.store(
        b"bytes",
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.5",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    assert ref.path.read_bytes() == b"bytes"
    assert "1.2.3" not in str(ref.path.relative_to(tmp_path))
    assert uid_key("1.2.3") in str(ref.path)


def test_remove_partials(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    leftover = tmp_path / "instances" / f"x.dcm{TMP_SUFFIX}"
    leftover.write_bytes(b"half")
    assert spool.remove_partials() == 1
    assert not leftover.exists()


def _place(spool: Spool, sop: str, series: str = "1.2.3.5", *, fd: bool = False) -> Path:
    staged = spool.staging_path()
    staged.write_bytes(sop.encode())
    if not fd:
        return spool.place_staged(
            staged, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
            series_instance_uid=series, transfer_syntax_uid="1.2.840.10008.1.2.1",
        ).path
    with open(staged, "ab") as fh:  # the lean acceptor's way: its open file is fsynced, not reopened
        return spool.place_staged(
            staged, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
            series_instance_uid=series, transfer_syntax_uid="1.2.840.10008.1.2.1", fd=fh.fileno(),
        ).path


def test_a_new_series_directory_is_made_with_its_parents_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """place_staged leaves fsync(series dir) to its caller; the entries of the study and series
    directories it had to make are synced here, so a power loss cannot drop the directory the
    acknowledged file was renamed into."""
    import dicom_node.spool as spool_module

    synced: list[Path] = []
    real = spool_module.fsync_dir
    monkeypatch.setattr(spool_module, "fsync_dir", lambda d: (synced.append(Path(d)), real(d)))
    spool = Spool(tmp_path)
    first = _place(spool, "1.2.3.5.1")
    series_dir, study_dir = first.parent, first.parent.parent
    assert synced == [study_dir.parent, study_dir]  # instances/ gained the study, the study the series
    assert first.read_bytes() == b"1.2.3.5.1"
    assert (series_dir.stat().st_mode & 0o777, study_dir.stat().st_mode & 0o777) == (0o700, 0o700)

    synced.clear()
    second = _place(spool, "1.2.3.5.2", fd=True)
    assert second.parent == series_dir and second.read_bytes() == b"1.2.3.5.2"
    assert synced == []  # nothing new: the caller's fsync(series dir) is all the rename needs

    for path in series_dir.iterdir():  # the series directory removed (retention) while the node runs
        path.unlink()
    series_dir.rmdir()
    third = _place(spool, "1.2.3.5.3")
    assert third.parent == series_dir and third.read_bytes() == b"1.2.3.5.3"
    assert synced == [study_dir]


def test_a_staged_file_that_is_gone_is_a_storage_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(StorageError, match="cannot write spool"):
        spool.place_staged(
            spool.staging_path(), sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3", series_instance_uid="1.2.3.5", transfer_syntax_uid="1.2.840.10008.1.2.1",
        )


def test_a_staged_file_on_another_file_system_is_copied_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rename(2) across file systems fails with EXDEV: the bytes are copied, fsynced and renamed."""
    import errno
    import os

    real = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src: object, dst: object) -> None:
        calls.append((str(src), str(dst)))
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / "instances" / uid_key("1.2.3") / uid_key("1.2.3.5")).mkdir(parents=True)
    monkeypatch.setattr(os, "replace", replace)
    path = _place(spool, "1.2.3.5.9")
    assert path.read_bytes() == b"1.2.3.5.9"
    assert calls[1] == (str(path) + TMP_SUFFIX, str(path))  # the copy went through a tmp name
    assert not list(path.parent.glob(f"*{TMP_SUFFIX}"))
    assert not [p for p in spool.staging_dir.iterdir() if p.read_bytes()]  # not left where it was staged
