"""The node's requestor against a peer that answers at once (dcmtk storescp, TCP_NODELAY on both
sides): pynetdicom's reactor must never take a response its send_*() waits for.

With Nagle on, a response came 40 ms late and hid the race; with TCP_NODELAY (dicom_node.nodelay)
it came within a GIL switch and, without dicom_node.reactor's guard, about one C-ECHO in a
thousand here went to the reactor ("Received unexpected C-ECHO service message") and its
send_c_echo() timed out.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node import reactor
from tests import peers
from tests.peers import missing_tools

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    if missing_tools("storescp"):
        pytest.skip("dcmtk storescp missing; apt-get install dcmtk")
    with peers.storescp(tmp_path / "in") as port:
        yield port


def test_thousands_of_fast_answers_all_reach_their_request(
    storescp: int, caplog: pytest.LogCaptureFixture
) -> None:
    reactor.install()
    ae = AE(ae_title="RADBRIDGE")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 2
    statuses: list[int | None] = []
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        for _ in range(30):
            assoc = ae.associate("127.0.0.1", storescp, ae_title="STORESCP")
            assert assoc.is_established
            sock = assoc.dul.socket.socket  # reactor's socket wrapper turned Nagle off
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for _ in range(200):
                statuses.append(getattr(assoc.send_c_echo(), "Status", None))
                if statuses[-1] != 0:
                    break
            if assoc.is_established:
                assoc.release()
    assert statuses == [0] * 6000
    assert not [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage()]
