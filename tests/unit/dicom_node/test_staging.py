"""Staging files made ahead: taken ready-made, made on the spot when none is, none left behind."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from dicom_node.spool import FILE_MODE, TMP_SUFFIX
from dicom_node.staging import StagingFiles


def _wait_for(condition: object, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


def test_files_are_made_ahead_and_handed_out_open_for_writing(tmp_path: Path) -> None:
    staging = StagingFiles(tmp_path, ahead=3)
    try:
        _wait_for(lambda: len(list(tmp_path.iterdir())) == 3)
        made = set(tmp_path.iterdir())
        path, fd = staging.take()
        assert path in made and path.name.endswith(TMP_SUFFIX)
        assert os.write(fd, b"DICM") == 4
        os.close(fd)
        assert path.read_bytes() == b"DICM"
        assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE  # private, as the spool's files
        _wait_for(lambda: len(list(tmp_path.iterdir())) == 4)  # the one taken is replaced
    finally:
        staging.close()
    assert list(tmp_path.iterdir()) == [path]  # the untaken ones are removed; the taken one is the caller's


def test_a_take_with_none_ready_makes_its_own(tmp_path: Path) -> None:
    staging = StagingFiles(tmp_path, ahead=1)
    try:
        taken = [staging.take() for _ in range(5)]  # faster than the filler
        assert len({p for p, _ in taken}) == 5
        for _, fd in taken:
            os.close(fd)
    finally:
        staging.close()


def test_a_missing_directory_fails_the_take_and_the_filler_keeps_trying(tmp_path: Path) -> None:
    directory = tmp_path / "staging"
    staging = StagingFiles(directory, ahead=2)
    try:
        with pytest.raises(FileNotFoundError):
            staging.take()  # the C-STORE gets "cannot write spool" from its caller
        directory.mkdir()
        _wait_for(lambda: len(list(directory.iterdir())) == 2, within_s=5.0)
    finally:
        staging.close()
    assert list(directory.iterdir()) == []
