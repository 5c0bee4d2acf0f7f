"""Throw-away certificates for TLS tests, made with the openssl CLI (no pytest, no fixtures).

``make_pki(directory)`` writes a private CA, a server certificate for localhost /
127.0.0.1 (subjectAltName, serverAuth), a client certificate (clientAuth) from
the same CA, and a second, unrelated CA with its own client certificate: the
"certificate from a different CA" every mutual-TLS test needs. Keys are RSA
2048, unencrypted, valid for two days, and live only in the given directory.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_EXT = "subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n"
CLIENT_EXT = "extendedKeyUsage = clientAuth\n"


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files ``make_pki`` wrote."""

    ca_crt: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    other_ca_crt: Path  # an unrelated CA
    other_client_crt: Path  # a client certificate issued by the unrelated CA
    other_client_key: Path


def openssl_missing() -> bool:
    return shutil.which("openssl") is None


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=RadBridge test {name}",
             "-keyout", key, "-out", crt)  # fmt: skip
    return crt, key


def _leaf(d: Path, name: str, cn: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    crt, key, csr, ext_file = d / f"{name}.crt", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    ext_file.write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", key, "-out", csr)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "2",
             "-extfile", ext_file, "-out", crt)  # fmt: skip
    return crt, key


def make_pki(directory: Path) -> Pki:
    """Write the CA, server and client certificates into ``directory`` (which must exist)."""
    ca = _ca(directory, "ca")
    other = _ca(directory, "other-ca")
    server = _leaf(directory, "server", "localhost", ca, SERVER_EXT)
    client = _leaf(directory, "client", "radbridge-test-client", ca, CLIENT_EXT)
    stranger = _leaf(directory, "other-client", "radbridge-test-stranger", other, CLIENT_EXT)
    return Pki(ca[0], *server, *client, other[0], *stranger)
