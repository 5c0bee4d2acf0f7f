"""A study whose analysis kills the node is run at most max_attempts times, then failed with its
reason, while a study sent meanwhile is delivered.

The kill stands in for what really takes a process down on such a study (the kernel's OOM killer,
a native decoder crash on hostile pixel data): a SIGKILL whenever that study's analysis is
running, and a supervisor that restarts `radbridge serve` each time.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.spool import Spool
from radbridge.synth import ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _study_objects, _wait_for_outputs, study_status
from tests.peers import OrthancServer, free_port, storescu

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]
MAX_ATTEMPTS = 3


def _started(index_path: Path, study_uid: str) -> int:
    """How many "analyze started" lines the study's history has, read-only."""
    db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(
            "SELECT COUNT(*) FROM study_events WHERE study_instance_uid=? AND event='analyze started'",
            (study_uid,),
        ).fetchone()[0]
    finally:
        db.close()


def _analysis(index_path: Path, study_uid: str) -> tuple[str, int, int] | None:
    """(state, attempts, interruptions) of the study's analysis job, read-only."""
    if not index_path.exists():
        return None
    db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute(
            "SELECT state, attempts, interruptions FROM jobs WHERE kind='analyze' AND study_instance_uid=?",
            (study_uid,),
        ).fetchone()
    except sqlite3.OperationalError:  # schema not there yet
        return None
    finally:
        db.close()
    return None if row is None else (row[0], row[1], row[2])


def test_poison_study_is_failed_after_max_attempts_and_the_node_carries_on(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    port = free_port()
    cfg = _config(tmp_path, port, orthanc)
    cfg.write_text(cfg.read_text().replace("[worker]\n", f"[worker]\nmax_attempts = {MAX_ATTEMPTS}\n"))
    index_path = Spool(tmp_path / "spool").index_path
    poison = write_series(ct_series(n_slices=60, seed=31), tmp_path / "poison")
    other = write_series(ct_series(n_slices=24, seed=32), tmp_path / "other")
    poison_uid = str(pydicom.dcmread(poison[0], stop_before_pixels=True).StudyInstanceUID)
    other_uid = str(pydicom.dcmread(other[0], stop_before_pixels=True).StudyInstanceUID)

    serve = Serve(cfg, tmp_path / "serve-0.log")
    assert storescu(poison, "127.0.0.1", port, "RADBRIDGE").returncode == 0
    kills, other_sent, starts = 0, False, 1
    deadline = time.monotonic() + 240
    try:
        while True:
            assert time.monotonic() < deadline, f"poison analysis still {_analysis(index_path, poison_uid)}"
            state = _analysis(index_path, poison_uid)
            if state is not None and state[0] == "FAILED":
                break
            # Killed once the attempt is under way: its "started" line follows the claim in a
            # transaction of its own, and a kill between the two would leave it out.
            if state is not None and state[0] == "RUNNING" and _started(index_path, poison_uid) == state[1]:
                serve.proc.send_signal(signal.SIGKILL)  # as the OOM killer would
                serve.proc.wait(30)
                serve.stop()
                kills += 1
                assert kills <= MAX_ATTEMPTS, "the poison analysis ran again after max_attempts"
                serve = Serve(cfg, tmp_path / f"serve-{starts}.log")  # the supervisor restarts it
                starts += 1
                if not other_sent:
                    assert storescu(other, "127.0.0.1", port, "RADBRIDGE").returncode == 0
                    other_sent = True
            time.sleep(0.02)
        # The node carries on: the other study is delivered while the poison one stays failed.
        objs = _wait_for_outputs(orthanc, other_uid, {"SEG": 1, "SR": 3})
        assert len(objs["SEG"]) == 1 and len(objs["SR"]) == 3
        time.sleep(2)  # a poison re-run would have started by now
        assert _analysis(index_path, poison_uid) == ("FAILED", MAX_ATTEMPTS, MAX_ATTEMPTS)
        assert not _study_objects(orthanc, poison_uid).get("SEG")
        study, _ = study_status(cfg, poison_uid)
        assert study["status"] == "FAILED"
        assert (
            f"the node stopped {MAX_ATTEMPTS} times while analysing this series "
            f"(attempt {MAX_ATTEMPTS} of {MAX_ATTEMPTS}); not run again" in study["reasons"][0]
        )
        assert [e["event"] for e in study["history"]].count("analyze started") == MAX_ATTEMPTS
        print(f"\npoison: {kills} kills, analysis runs {MAX_ATTEMPTS}, then FAILED; other study delivered")
    finally:
        assert serve.stop() == 0
