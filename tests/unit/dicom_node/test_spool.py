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
