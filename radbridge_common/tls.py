"""TLS settings shared by the node and the inference service: the BCP 195 profile, loaded once.

DICOM TLS (the node's SCP and its C-STORE export) uses ``ssl.SSLContext``
objects built here; gRPC (node <-> inference service) uses the same files as
PEM bytes, checked here the same way. Every file is read and checked when a
service starts, so a missing, unreadable, encrypted or mismatched certificate
or key is a :class:`TlsConfigError` naming the file, never a failure at the
first association. Key material never appears in a message or a log line.

The profile is DICOM PS3.15 Annex B.9 "BCP 195 TLS Secure Transport Connection
Profile" (RFC 7525 / RFC 9325): TLS 1.2 or later, TLS 1.2 limited to the AEAD
ECDHE/DHE suites below, TLS 1.3 with OpenSSL's default suites (all AEAD).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from radbridge_common.settings import ConfigError

#: TLS 1.2 suites of the BCP 195 profile (OpenSSL names); TLS 1.3 suites stay OpenSSL's default.
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(ConfigError):
    """A TLS file is missing, unreadable, not PEM, encrypted, or does not match its pair."""


def check_pair(cert_file: Path | None, key_file: Path | None, where: str) -> None:
    """Both a certificate and its key, or neither (a settings check, no file access)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError(f"{where} needs both tls_cert_file and tls_key_file (or neither).")


def _no_password() -> str:
    raise TlsConfigError(
        "the private key is encrypted; give an unencrypted key file (protect it by file mode)"
    )


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    for path in (cert_file, key_file):
        _readable(path)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except TlsConfigError as exc:
        raise TlsConfigError(f"TLS key {key_file}: {exc}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsConfigError(
                f"TLS key {key_file} does not belong to the certificate {cert_file}."
            ) from None
        raise TlsConfigError(
            f"TLS certificate {cert_file} or key {key_file} is not a PEM certificate chain and key"
            f" ({exc.reason or exc.__class__.__name__})."
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    _readable(ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"TLS CA file {ca_file} holds no PEM certificate ({exc.reason or exc.__class__.__name__})."
        ) from None


def _readable(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise TlsConfigError(f"TLS file {path} cannot be read ({exc.strerror}).") from None


def server_context(
    cert_file: Path, key_file: Path, ca_file: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A server context: our chain and key; client certificates verified against ``ca_file``
    when one is sent, and required when ``require_client_cert``."""
    if require_client_cert and ca_file is None:
        raise TlsConfigError("Requiring client certificates needs a tls_ca_file to verify them against.")
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, cert_file, key_file)
    if ca_file is not None:
        _load_ca(context, ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server (``ca_file``, else the system roots) and its
    host name, and presents our certificate when one is given."""
    check_pair(cert_file, key_file, "A TLS client")
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED + check_hostname
    if ca_file is not None:
        _load_ca(context, ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        _load_chain(context, cert_file, key_file)
    return context


def pem_pair(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """(certificate chain, private key) as PEM bytes for grpc credentials, after the same checks
    as the ssl contexts (gRPC itself reports a bad file only at the first handshake)."""
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_file, key_file)
    return cert_file.read_bytes(), key_file.read_bytes()


def pem_ca(ca_file: Path) -> bytes:
    """A CA bundle as PEM bytes for grpc credentials, checked to hold certificates."""
    _load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca_file)
    return ca_file.read_bytes()
