"""radbridge_common.tls: the BCP 195 contexts, and clear errors for bad files at start-up."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from radbridge_common.settings import ConfigError
from radbridge_common.tls import (
    BCP195_CIPHERS,
    TlsConfigError,
    client_context,
    pem_ca,
    pem_pair,
    server_context,
)
from tests.tls_ca import Pki


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str = "localhost") -> ssl.SSLSocket:
    """One loopback handshake; returns the client's socket, raises what either side raised."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=5)
        tls = client.wrap_socket(raw, server_hostname=name)
        tls.sendall(b"x")  # TLS 1.3: the server checks our certificate after the client's handshake
        thread.join(5)
        if errors:
            tls.close()
            raise errors[0]
        return tls
    finally:
        listener.close()


class TestServerContext:
    def test_bcp195_profile(self, pki: Pki) -> None:
        context = server_context(pki.server_crt, pki.server_key)
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and tls12 <= set(BCP195_CIPHERS.split(":"))
        assert all(c["aead"] for c in context.get_ciphers())
        assert context.verify_mode == ssl.CERT_NONE  # no CA file: client certificates are not asked for

    def test_handshake_with_our_client(self, pki: Pki) -> None:
        server = server_context(pki.server_crt, pki.server_key, pki.ca_crt, require_client_cert=True)
        client = client_context(pki.ca_crt, pki.client_crt, pki.client_key)
        with _handshake(server, client) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")

    def test_tls12_cipher_outside_the_profile_is_refused(self, pki: Pki) -> None:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(pki.ca_crt)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        client.set_ciphers("ECDHE-RSA-AES128-SHA256:AES128-SHA")  # CBC / static RSA: not BCP 195
        with pytest.raises(ssl.SSLError):
            _handshake(server_context(pki.server_crt, pki.server_key), client)

    def test_required_client_certificate(self, pki: Pki) -> None:
        server = server_context(pki.server_crt, pki.server_key, pki.ca_crt, require_client_cert=True)
        assert server.verify_mode == ssl.CERT_REQUIRED
        for client in (
            client_context(pki.ca_crt),
            client_context(pki.ca_crt, pki.other_client_crt, pki.other_client_key),
        ):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _handshake(server, client).recv(1)

    def test_optional_client_certificate(self, pki: Pki) -> None:
        server = server_context(pki.server_crt, pki.server_key, pki.ca_crt)
        assert server.verify_mode == ssl.CERT_OPTIONAL
        _handshake(server, client_context(pki.ca_crt)).close()

    def test_requiring_client_certificates_needs_a_ca(self, pki: Pki) -> None:
        with pytest.raises(TlsConfigError, match="needs a tls_ca_file"):
            server_context(pki.server_crt, pki.server_key, require_client_cert=True)


class TestClientContext:
    def test_verifies_server_and_host_name(self, pki: Pki) -> None:
        context = client_context(pki.ca_crt)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        server = server_context(pki.server_crt, pki.server_key)
        _handshake(server, context, "localhost").close()
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            _handshake(server, context, "pacs.example")
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(server, client_context(pki.other_ca_crt))

    def test_certificate_needs_its_key(self, pki: Pki) -> None:
        with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
            client_context(pki.ca_crt, cert_file=pki.client_crt)


class TestFileErrors:
    """Each bad file is a TlsConfigError (a ConfigError) naming the file, without its content."""

    def test_missing_file(self, pki: Pki, tmp_path: Path) -> None:
        missing = tmp_path / "nope.crt"
        for call in (
            lambda: server_context(missing, pki.server_key),
            lambda: client_context(missing),
            lambda: pem_ca(missing),
            lambda: pem_pair(pki.server_crt, missing),
        ):
            with pytest.raises(TlsConfigError, match=r"nope\.crt cannot be read \(No such file"):
                call()

    def test_unreadable_file(self, pki: Pki, tmp_path: Path) -> None:
        """A path that exists but cannot be read as a file (a directory: unreadable even for root)."""
        directory = tmp_path / "keys"
        directory.mkdir()
        with pytest.raises(TlsConfigError, match=r"keys cannot be read \(Is a directory\)"):
            server_context(pki.server_crt, directory)

    def test_key_of_another_certificate(self, pki: Pki) -> None:
        with pytest.raises(TlsConfigError, match="client.key does not belong to the certificate") as info:
            server_context(pki.server_crt, pki.client_key)
        assert "PRIVATE KEY" not in str(info.value)
        with pytest.raises(TlsConfigError, match="does not belong"):
            pem_pair(pki.server_crt, pki.client_key)

    def test_not_pem(self, pki: Pki, tmp_path: Path) -> None:
        junk = tmp_path / "junk.pem"
        junk.write_text("hello")
        with pytest.raises(TlsConfigError, match="junk.pem holds no PEM certificate"):
            pem_ca(junk)
        with pytest.raises(TlsConfigError, match="is not a PEM certificate chain and key"):
            server_context(junk, pki.server_key)

    def test_encrypted_key_is_refused_without_a_prompt(self, pki: Pki, tmp_path: Path) -> None:
        encrypted = tmp_path / "encrypted.key"
        subprocess.run(
            ["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
             "-out", str(encrypted)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        with pytest.raises(TlsConfigError, match="encrypted.key: the private key is encrypted"):
            server_context(pki.server_crt, encrypted)

    def test_is_a_config_error(self) -> None:
        assert issubclass(TlsConfigError, ConfigError)

