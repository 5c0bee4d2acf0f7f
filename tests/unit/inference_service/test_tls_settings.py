"""TLS keys of the service's settings: mutual TLS needs a certificate; files are checked at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_service.config import ServiceSection
from inference_service.config import load_settings as load_service_settings
from inference_service.server import server_credentials
from radbridge_common.settings import ConfigError
from radbridge_common.tls import TlsConfigError
from tests.tls_ca import Pki

CRT = Path("server.crt")


class TestServiceSection:
    def test_client_ca_needs_a_server_certificate(self) -> None:
        with pytest.raises(ValueError, match="tls_client_ca_file .* needs tls_cert_file"):
            ServiceSection(tls_client_ca_file=CRT)

    def test_from_toml(self, pki: Pki, tmp_path: Path) -> None:
        config = tmp_path / "service.toml"
        config.write_text(
            f'[inference_service]\ntls_cert_file = "{pki.server_crt}"\ntls_key_file = "{pki.server_key}"\n'
            f'tls_client_ca_file = "{pki.ca_crt}"\n'
        )
        section = load_service_settings(config).inference_service
        assert section.tls_client_ca_file == pki.ca_crt
        assert server_credentials(section) is not None

    def test_unknown_key_is_a_config_error(self, tmp_path: Path) -> None:
        config = tmp_path / "service.toml"
        config.write_text(
            '[inference_service]\ntls_ca_file = "ca.crt"\n'
        )  # the node's key, not the service's
        with pytest.raises(ConfigError, match="inference_service.tls_ca_file"):
            load_service_settings(config)

    def test_bad_client_ca_raises_at_credentials(self, pki: Pki, tmp_path: Path) -> None:
        junk = tmp_path / "junk.crt"
        junk.write_text("-----BEGIN NOTHING-----\n")
        section = ServiceSection(
            tls_cert_file=pki.server_crt, tls_key_file=pki.server_key, tls_client_ca_file=junk
        )
        with pytest.raises(TlsConfigError, match="junk.crt holds no PEM certificate"):
            server_credentials(section)
