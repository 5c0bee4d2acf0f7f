"""gRPC TLS and mutual TLS between the node's client and the inference service (reference backend).

The service requires client certificates from our CA (tls_client_ca_file); the
node's InferenceClient gets its credentials from [inference] settings, as Node does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.client import InferenceClient, channel_credentials
from dicom_node.config import InferenceSection, NodeSettings, SpoolSection
from dicom_node.errors import InferenceUnavailable
from dicom_node.node import Node
from inference_service.config import ServiceSection, ServiceSettings
from radbridge.embedded import EmbeddedInferenceService
from radbridge_common.tls import TlsConfigError
from tests.tls_ca import Pki

pytestmark = pytest.mark.integration
TIMEOUT_S = 1.5


#: Clients the service must refuse: [inference] keys built from the test PKI.
REFUSED: dict[str, Callable[[Pki], dict[str, object]]] = {
    "plaintext": lambda p: {},
    "no-client-certificate": lambda p: {"tls_ca_file": p.ca_crt},
    "certificate-of-another-ca": lambda p: {
        "tls_ca_file": p.ca_crt,
        "tls_cert_file": p.other_client_crt,
        "tls_key_file": p.other_client_key,
    },
    "server-not-trusted": lambda p: {"tls": True, "tls_cert_file": p.client_crt, "tls_key_file": p.client_key},
}


@pytest.fixture(scope="module")
def mtls_port(pki: Pki) -> Iterator[int]:
    section = ServiceSection(
        port=0, tls_cert_file=pki.server_crt, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca_crt
    )
    with EmbeddedInferenceService(ServiceSettings(inference_service=section)) as service:
        yield int(service.address.rsplit(":", 1)[1])


def _models(address: str, section: InferenceSection) -> list[str]:
    client = InferenceClient(
        address, connect_retries=0, credentials=channel_credentials(section), server_name=section.tls_server_name
    )
    try:
        return [m.identity.name for m in client.list_models(timeout_s=TIMEOUT_S).models]
    finally:
        client.close()


class TestMutualTls:
    def test_our_client_certificate_is_accepted(self, mtls_port: int, pki: Pki) -> None:
        section = InferenceSection(tls_ca_file=pki.ca_crt, tls_cert_file=pki.client_crt, tls_key_file=pki.client_key)
        assert "reference" in _models(f"localhost:{mtls_port}", section)

    def test_server_name_override(self, mtls_port: int, pki: Pki) -> None:
        ours = {"tls_ca_file": pki.ca_crt, "tls_cert_file": pki.client_crt, "tls_key_file": pki.client_key}
        assert "reference" in _models(f"127.0.0.1:{mtls_port}", InferenceSection(**ours, tls_server_name="localhost"))
        with pytest.raises(InferenceUnavailable):
            _models(f"127.0.0.1:{mtls_port}", InferenceSection(**ours, tls_server_name="pacs.example"))

    @pytest.mark.parametrize("case", list(REFUSED))
    def test_refused(self, mtls_port: int, pki: Pki, case: str) -> None:
        with pytest.raises(InferenceUnavailable) as info:
            _models(f"localhost:{mtls_port}", InferenceSection(**REFUSED[case](pki)))  # type: ignore[arg-type]
        assert str(info.value).startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
        if case != "plaintext":
            assert "check the service's certificate" in str(info.value)


class TestNode:
    def test_node_wires_its_inference_tls_settings(self, mtls_port: int, pki: Pki, tmp_path: Path) -> None:
        inference = InferenceSection(
            tls_ca_file=pki.ca_crt, tls_cert_file=pki.client_crt, tls_key_file=pki.client_key
        )
        settings = NodeSettings(spool=SpoolSection(directory=tmp_path / "spool"), inference=inference)
        node = Node(settings, f"localhost:{mtls_port}")
        try:
            assert node.check_rules() == []  # the routing rules were checked against the service's models
            pooled = node.ctx.client_factory()  # the replica pool's client of the one replica
            try:
                client = pooled.client
                assert client.tls and "reference" in [m.identity.name for m in client.list_models().models]
            finally:
                pooled.close()
        finally:
            node.index.close()


class TestStartUp:
    def test_node_refuses_to_start_with_an_unreadable_ca(self, pki: Pki, tmp_path: Path) -> None:
        settings = NodeSettings(
            spool=SpoolSection(directory=tmp_path / "spool"),
            inference=InferenceSection(tls_ca_file=tmp_path / "missing.crt"),
        )
        with pytest.raises(TlsConfigError, match="missing.crt cannot be read"):
            Node(settings, "localhost:1")
        assert not (tmp_path / "spool").exists()  # checked before anything is created

    def test_service_refuses_a_key_of_another_certificate(self, pki: Pki) -> None:
        section = ServiceSection(port=0, tls_cert_file=pki.server_crt, tls_key_file=pki.client_key)
        service = EmbeddedInferenceService(ServiceSettings(inference_service=section))
        try:
            with pytest.raises(TlsConfigError, match="does not belong to the certificate"):
                service.start()
        finally:
            service.stop()
