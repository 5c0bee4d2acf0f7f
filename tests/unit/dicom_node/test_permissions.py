"""Everything the node writes holds patient data: files 0600, directories 0700, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.index import Index
from dicom_node.spool import Spool, open_private, write_durably
from dicom_node.worker import keep_output
from radbridge.synth import ct_series

SOP = dict(
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    study_instance_uid="1.2.3",
    series_instance_uid="1.2.3.5",
    transfer_syntax_uid="1.2.840.10008.1.2.1",
)


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def permissive_umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """A umask that would leave files world-readable: the modes must come from the code."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of root and of everything below it, by relative path."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(root: Path) -> None:
    wrong = {
        name: oct(mode)
        for name, mode in modes(root).items()
        if mode != (0o700 if (root / name).is_dir() else 0o600)
    }
    assert not wrong, f"not owner-only: {wrong}"


@pytest.mark.usefixtures("permissive_umask")
def test_spool_index_instances_outputs_and_staging_are_owner_only(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "spool"
    spool = Spool(root)
    index = Index(spool.index_path)
    try:
        ref = spool.store(b"instance", sop_instance_uid="1.2.3.4", **SOP)  # C-STORE / tmp -> rename
        index.add_instance(ref, "CT", "PEER", attributes={})
        staged = spool.staging_path()  # STOW-RS part / pynetdicom-less C-STORE staging
        with open_private(staged) as fh:
            fh.write(b"part")
        assert stat.S_IMODE(staged.stat().st_mode) == 0o600
        spool.store_staged(staged, sop_instance_uid="1.2.3.6", **SOP)
        ds = ct_series(n_slices=1)[0]
        keep_output(spool, index, "narrative", ds)  # a result object, indexed
        assert (root / "index.sqlite3-wal").exists()  # WAL mode: the side files exist while open
        assert_private(root)
        assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o700  # parents made too
    finally:
        index.close()


@pytest.mark.usefixtures("permissive_umask")
def test_existing_files_and_spool_root_are_tightened(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    db = root / "index.sqlite3"
    Index(db).close()
    os.chmod(db, 0o644)
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        side.touch()
        os.chmod(side, 0o644)
    old = root / "old.dcm"
    old.write_bytes(b"x")
    os.chmod(old, 0o644)

    Spool(root)
    Index(db).close()
    write_durably(old, b"y")  # a rewrite replaces the file with a private one
    assert_private(root)


def test_open_private_tightens_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    os.chmod(path, 0o666)
    with open_private(path) as fh:
        fh.write(b"y")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"y"
