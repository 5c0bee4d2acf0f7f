"""Nagle is off on both ends of the node's DICOM connections (a C-STORE is two writes)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dicom_node.config import ExportTarget, ScpSection
from dicom_node.export import send_cstore
from dicom_node.index import Index
from dicom_node.scp import start_scp
from dicom_node.spool import Spool


@pytest.mark.parametrize("lean_store", [True, False])
def test_export_and_the_scp_set_tcp_nodelay(
    tmp_path: Path, small_ct_files: list[Path], lean_store: bool
) -> None:
    """The exporting association (pynetdicom SCU) and the accepted socket (lean or pynetdicom path)."""
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    server = start_scp(ScpSection(port=0, ae_title="RADBRIDGE", lean_store=lean_store), spool, index)
    seen: dict[str, list[int]] = {}

    def inspect(assoc) -> None:  # noqa: ANN001 - runs on the export's association, after its C-STOREs
        ours = assoc.dul.socket.socket
        seen["requestor"] = [ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)]
        accepted = list(server._lean_sockets) + [a.dul.socket.socket for a in server.active_associations]
        seen["acceptor"] = [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted]

    try:
        target = ExportTarget(
            type="dicom", host="127.0.0.1", port=server.server_address[1], ae_title="RADBRIDGE"
        )
        send_cstore(small_ct_files[:2], target, "EXPORTER", then=inspect)
    finally:
        server.shutdown()
        index.close()
    assert seen["requestor"] == [1]
    assert seen["acceptor"] and all(v == 1 for v in seen["acceptor"]), seen
    assert index is not None and len(list((spool.root / "instances").rglob("*.dcm"))) == 2
