"""scp.receivers: receiver processes behind the node's one port (SO_REUSEPORT), real dcmtk peers.

The kernel picks the listening socket of each new connection by a hash of its addresses, so
each test makes enough connections (16) that both processes get some: all 16 in one process
has probability 2 x 2^-16.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import ScpSection
from dicom_node.index import Index
from dicom_node.metrics import ASSOCIATIONS
from dicom_node.scp import start_scp
from dicom_node.spool import Spool
from tests.conftest import StartScp, staged_data
from tests.peers import dcmtk_env, free_port, missing_tools, storescu

pytestmark = [pytest.mark.integration]
CONNECTIONS = 16


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    missing = missing_tools("storescu", "findscu", "echoscu")
    if missing:
        pytest.skip(f"dcmtk tools missing: {', '.join(missing)}; apt-get install dcmtk")


def _served_here(acceptor: str) -> float:
    return ASSOCIATIONS.labels(acceptor=acceptor)._value.get()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_storage_associations_are_spread_over_the_processes_and_all_indexed(
    start_node_scp: StartScp, small_ct_files: list[Path]
) -> None:
    port, spool, index = start_node_scp(receivers=2)
    before = _served_here("lean")
    for path in small_ct_files[:CONNECTIONS]:  # one association each: a new source port, a new hash
        result = storescu([path], "127.0.0.1", port, "RADBRIDGE")
        assert result.returncode == 0 and not result.errors, result.stdout + result.stderr
    here = _served_here("lean") - before
    assert 0 < here < CONNECTIONS  # the rest were served by the receiver process
    assert index.count_instances() == CONNECTIONS
    assert staged_data(spool.staging_dir) == []  # nothing left half-written
    for ref in index.study_instances(str(pydicom.dcmread(small_ct_files[0]).StudyInstanceUID)):
        assert ref.path.stat().st_size > 512 * 512 * 2


def test_a_query_reaching_a_receiver_is_handed_to_the_node_process(
    start_node_scp: StartScp, small_ct_files: list[Path], tmp_path: Path
) -> None:
    """C-FIND is not the lean acceptor's: a receiver passes the unread connection over (SCM_RIGHTS)."""
    port, _, _ = start_node_scp(receivers=2)
    result = storescu(small_ct_files[:2], "127.0.0.1", port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors
    before = _served_here("pynetdicom")
    for i in range(CONNECTIONS):
        out = tmp_path / f"find-{i}"
        out.mkdir()
        args = ["findscu", "-S", "-aet", "FINDSCU", "-aec", "RADBRIDGE", "-X", "-od", str(out)]
        args += [
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "-k",
            "NumberOfStudyRelatedInstances",
        ]
        proc = subprocess.run(
            [*args, "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (answer,) = [pydicom.dcmread(p) for p in out.glob("rsp*.dcm")]
        assert int(answer.NumberOfStudyRelatedInstances) == 2
    assert _served_here("pynetdicom") - before == CONNECTIONS  # every one, wherever it landed


def test_stopping_the_node_stops_its_receivers_and_frees_the_port(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    server = start_scp(ScpSection(port=0, ae_title="RADBRIDGE", receivers=3), spool, index)
    port = server.server_address[1]
    try:
        receivers = [pid for pid in _children(os.getpid()) if b"dicom_node.receivers" in _cmdline(pid)]
        assert len(receivers) == 2
    finally:
        server.shutdown()
        index.close()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in receivers):
        assert time.monotonic() < deadline, "a receiver outlived the node's SCP"
        time.sleep(0.05)
    proc = subprocess.run(
        ["echoscu", "-aec", "RADBRIDGE", "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode != 0  # nobody listens on the port any more


def test_receivers_exit_when_the_node_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no stop to run: a receiver notices its Unix socket close and stops itself."""
    port = free_port()
    node = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from dicom_node.config import ScpSection
                from dicom_node.index import Index
                from dicom_node.scp import start_scp
                from dicom_node.spool import Spool
                spool = Spool(Path({str(tmp_path / "spool")!r}))
                start_scp(ScpSection(port={port}, receivers=2), spool, Index(spool.index_path))
                print("listening", flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert node.stdout is not None and node.stdout.readline().strip() == "listening"
        (receiver,) = _children(node.pid)
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        deadline = time.monotonic() + 10
        while _alive(receiver):
            assert time.monotonic() < deadline, "the receiver outlived the node process"
            time.sleep(0.05)
    finally:
        node.kill()
        node.wait()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"receivers": 0}, "scp.receivers must be a whole number from 1 to 64"),
        ({"receivers": 2, "lean_store": False}, "scp.receivers > 1 needs plaintext DICOM and scp.lean_store"),
    ],
)
def test_receiver_settings_are_checked(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScpSection(**keys)  # type: ignore[arg-type]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # Z: exited, not yet reaped by its parent
