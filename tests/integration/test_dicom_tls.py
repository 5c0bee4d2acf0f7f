"""DICOM TLS with dcmtk peers: storescu/echoscu into the node's SCP, our C-STORE export into storescp.

Certificates come from tests/tls_ca.py (a private CA made with openssl at run time).
Also the called-AE check, which holds with or without TLS.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import ExportTarget
from dicom_node.errors import ExportError
from dicom_node.export import send_cstore
from radbridge.synth import ct_series, write_series
from radbridge_common.tls import client_context
from tests.conftest import StartScp
from tests.peers import dcmtk_env, echoscu, free_port, missing_tools, storescu
from tests.tls_ca import Pki

pytestmark = pytest.mark.integration


def _tls(key: Path, crt: Path, ca: Path) -> list[str]:
    """dcmtk options: authenticated TLS with our key + certificate, trusting ``ca``."""
    return ["+tls", str(key), str(crt), "+cf", str(ca)]


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(ct_series(n_slices=2), tmp_path_factory.mktemp("ct-tls"))


@pytest.fixture
def tls_scp(require_dcmtk: None, pki: Pki, start_node_scp: StartScp) -> StartScp:
    """start_node_scp with the server certificate; extra [scp] keys pass through."""

    def start(**keys: object) -> tuple:
        return start_node_scp(tls_cert_file=pki.server_crt, tls_key_file=pki.server_key, **keys)

    return start


class TestScpTls:
    def test_storescu_over_tls_is_spooled(self, tls_scp: StartScp, pki: Pki, ct_files: list[Path]) -> None:
        port, spool, index = tls_scp()
        # Anonymous client (no certificate of its own) verifying our server certificate.
        result = storescu(
            ct_files, "localhost", port, "RADBRIDGE", extra=["+tla", "+cf", str(pki.ca_crt)], timeout_s=60
        )
        assert result.returncode == 0 and not result.errors, result.stdout + result.stderr
        for path in ct_files:
            assert index.has_instance(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assert index.count_instances() == len(ct_files)

    def test_plaintext_to_the_tls_port_is_refused(self, tls_scp: StartScp, ct_files: list[Path]) -> None:
        port, _, index = tls_scp()
        result = storescu(ct_files[:1], "127.0.0.1", port, "RADBRIDGE", timeout_s=60)
        assert result.returncode != 0
        assert any("Association Request Failed" in line for line in result.errors), result.errors
        assert index.count_instances() == 0

    def test_client_that_does_not_trust_our_ca_gives_up(self, tls_scp: StartScp, pki: Pki) -> None:
        port, _, _ = tls_scp()
        result = echoscu("localhost", port, "RADBRIDGE", extra=["+tla", "+cf", str(pki.other_ca_crt)])
        assert result.returncode != 0 and result.errors

    def test_required_client_certificate(self, tls_scp: StartScp, pki: Pki) -> None:
        port, _, _ = tls_scp(tls_ca_file=pki.ca_crt, tls_require_client_cert=True)
        ours = echoscu("localhost", port, "RADBRIDGE", extra=_tls(pki.client_key, pki.client_crt, pki.ca_crt))
        assert ours.returncode == 0 and not ours.errors, ours.stdout + ours.stderr
        anonymous = echoscu("localhost", port, "RADBRIDGE", extra=["+tla", "+cf", str(pki.ca_crt)])
        assert anonymous.returncode != 0 and anonymous.errors
        stranger = echoscu(
            "localhost", port, "RADBRIDGE", extra=_tls(pki.other_client_key, pki.other_client_crt, pki.ca_crt)
        )
        assert stranger.returncode != 0 and stranger.errors

    def test_optional_client_certificate(self, tls_scp: StartScp, pki: Pki) -> None:
        """With a CA but no requirement: anonymous peers and ours pass, a stranger's certificate fails."""
        port, _, _ = tls_scp(tls_ca_file=pki.ca_crt)
        for extra in (["+tla", "+cf", str(pki.ca_crt)], _tls(pki.client_key, pki.client_crt, pki.ca_crt)):
            result = echoscu("localhost", port, "RADBRIDGE", extra=extra)
            assert result.returncode == 0 and not result.errors, result.stdout + result.stderr
        stranger = echoscu(
            "localhost", port, "RADBRIDGE", extra=_tls(pki.other_client_key, pki.other_client_crt, pki.ca_crt)
        )
        assert stranger.returncode != 0

    def test_a_silent_tls_peer_does_not_block_others(self, tls_scp: StartScp, pki: Pki) -> None:
        """The handshake runs in the connection's thread: a peer that connects and says nothing
        neither stalls the accepting thread nor outlives scp.first_pdu_timeout_s."""
        port, _, _ = tls_scp(first_pdu_timeout_s=1.0)
        with socket.create_connection(("127.0.0.1", port)) as silent:
            result = echoscu("localhost", port, "RADBRIDGE", extra=["+tla", "+cf", str(pki.ca_crt)])
            assert result.returncode == 0 and not result.errors, result.stdout + result.stderr
            silent.settimeout(5)
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the node
            assert time.monotonic() - started < 3


    @pytest.mark.parametrize(
        ("first_pdu", "what"),
        [
            (struct.pack(">BBL", 0x01, 0, 64 * 1024 * 1024), "an A-ASSOCIATE-RQ announcing 64 MiB"),
            (struct.pack(">BBL", 0x04, 0, 4) + b"abcd", "a P-DATA-TF before any association"),
        ],
    )
    def test_first_pdu_is_checked_through_tls(
        self, tls_scp: StartScp, pki: Pki, first_pdu: bytes, what: str
    ) -> None:
        """The guard's first-PDU checks hold inside TLS: the node closes without reading on."""
        port, _, _ = tls_scp()
        context = client_context(pki.ca_crt)
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            tls.settimeout(5)
            tls.sendall(first_pdu)
            started = time.monotonic()
            try:
                answer = tls.recv(1)
            except ConnectionResetError:
                answer = b""  # closed with our bytes unread: also a refusal
            assert answer == b"", f"{what}: answered {answer!r} instead of closing"
            assert time.monotonic() - started < 2, f"{what}: not refused at once"


class TestCalledAet:
    def test_wrong_called_aet_is_rejected(self, require_dcmtk: None, start_node_scp: StartScp) -> None:
        port, _, _ = start_node_scp()
        result = echoscu("127.0.0.1", port, "WRONG")
        assert result.returncode != 0
        text = result.stdout + result.stderr
        assert "Called AE Title Not Recognized" in text, text
        assert echoscu("127.0.0.1", port, "RADBRIDGE").returncode == 0

    def test_check_can_be_turned_off(self, require_dcmtk: None, start_node_scp: StartScp) -> None:
        port, _, _ = start_node_scp(require_called_aet=False)
        result = echoscu("127.0.0.1", port, "ANY-SCP")
        assert result.returncode == 0 and not result.errors, result.stdout + result.stderr


# -- export: our C-STORE SCU into dcmtk storescp +tls --------------------------------------------


@pytest.fixture
def storescp_tls(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp with TLS that requires a client certificate from our CA (its default -rc)."""
    if missing_tools("storescp"):
        pytest.skip("dcmtk storescp missing; apt-get install dcmtk")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    args = ["storescp", "-aet", "PACS", "-od", str(out), *_tls(pki.server_key, pki.server_crt, pki.ca_crt)]
    proc = subprocess.Popen(
        [*args, str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if _listening(port):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"storescp did not listen on {port} (exit {proc.poll()})")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    """Whether something listens on the loopback port (probed without connecting to it)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _target(port: int, host: str = "localhost", **keys: object) -> ExportTarget:
    return ExportTarget(host=host, port=port, ae_title="PACS", **keys)  # type: ignore[arg-type]


class TestExportTls:
    def test_export_over_mutual_tls_is_received(
        self, storescp_tls: tuple[int, Path], pki: Pki, ct_files: list[Path]
    ) -> None:
        port, out = storescp_tls
        target = _target(port, tls_ca_file=pki.ca_crt, tls_cert_file=pki.client_crt, tls_key_file=pki.client_key)
        send_cstore(ct_files, target, "RADBRIDGE")
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
        sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_files}
        assert received == sent

    def test_plaintext_export_to_a_tls_peer_fails_clearly(
        self, storescp_tls: tuple[int, Path], ct_files: list[Path]
    ) -> None:
        port, out = storescp_tls
        with pytest.raises(ExportError, match="not established.*set tls = true"):
            send_cstore(ct_files[:1], _target(port), "RADBRIDGE")
        assert list(out.iterdir()) == []

    def test_export_without_our_certificate_or_trust_fails(
        self, storescp_tls: tuple[int, Path], pki: Pki, ct_files: list[Path]
    ) -> None:
        port, out = storescp_tls
        for target in (
            _target(port, tls_ca_file=pki.ca_crt),  # the peer requires a client certificate
            _target(port, tls_ca_file=pki.other_ca_crt, tls_cert_file=pki.client_crt, tls_key_file=pki.client_key),
            _target(port, host="127.0.0.1", tls_ca_file=pki.ca_crt, tls_server_name="pacs.example"),
        ):
            with pytest.raises(ExportError, match=r"\(TLS\).*not established.*TLS handshake"):
                send_cstore(ct_files[:1], target, "RADBRIDGE")
        assert list(out.iterdir()) == []
