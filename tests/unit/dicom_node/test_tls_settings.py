"""TLS keys of the node's settings: shape checks at load, file checks at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.client import channel_credentials
from dicom_node.config import ExportTarget, InferenceSection, ScpSection, load_settings
from dicom_node.export import tls_args
from dicom_node.scp import scp_tls_context
from radbridge_common.tls import TlsConfigError
from tests.tls_ca import Pki

CRT, KEY = Path("server.crt"), Path("server.key")


class TestScpSection:
    def test_defaults_check_the_called_aet_without_tls(self) -> None:
        section = ScpSection()
        assert section.require_called_aet and section.tls_cert_file is None
        assert scp_tls_context(section) is None

    @pytest.mark.parametrize(
        ("keys", "message"),
        [
            ({"tls_cert_file": CRT}, "both tls_cert_file and tls_key_file"),
            ({"tls_key_file": KEY}, "both tls_cert_file and tls_key_file"),
            ({"tls_ca_file": CRT}, "need scp.tls_cert_file"),
            ({"tls_require_client_cert": True}, "need scp.tls_cert_file"),
            ({"tls_cert_file": CRT, "tls_key_file": KEY, "tls_require_client_cert": True}, "needs scp.tls_ca_file"),
        ],
    )
    def test_invalid_combinations(self, keys: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            ScpSection(**keys)  # type: ignore[arg-type]

    def test_from_toml_and_env(self, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        config = tmp_path / "node.toml"
        config.write_text(
            f'[scp]\ntls_cert_file = "{pki.server_crt}"\ntls_key_file = "{pki.server_key}"\n'
            f'tls_ca_file = "{pki.ca_crt}"\n'
        )
        monkeypatch.setenv("RADBRIDGE_SCP__TLS_REQUIRE_CLIENT_CERT", "true")
        monkeypatch.setenv("RADBRIDGE_SCP__REQUIRE_CALLED_AET", "false")
        scp = load_settings(config).scp
        assert scp.tls_require_client_cert and not scp.require_called_aet
        assert scp.tls_ca_file == pki.ca_crt
        context = scp_tls_context(scp)
        assert context is not None and context.verify_mode.name == "CERT_REQUIRED"

    def test_bad_file_stops_the_scp_before_it_listens(self, pki: Pki, tmp_path: Path) -> None:
        section = ScpSection(port=0, tls_cert_file=pki.server_crt, tls_key_file=pki.other_client_key)
        with pytest.raises(TlsConfigError, match="does not belong"):
            scp_tls_context(section)


class TestInferenceSection:
    def test_tls_is_implied_by_files(self, pki: Pki) -> None:
        assert not InferenceSection().uses_tls and channel_credentials(InferenceSection()) is None
        assert InferenceSection(tls=True).uses_tls
        assert InferenceSection(tls_ca_file=pki.ca_crt).uses_tls
        assert channel_credentials(InferenceSection(tls_ca_file=pki.ca_crt)) is not None

    def test_certificate_needs_its_key(self) -> None:
        with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
            InferenceSection(tls_cert_file=CRT)

    def test_bad_files_raise_at_credentials(self, pki: Pki, tmp_path: Path) -> None:
        with pytest.raises(TlsConfigError, match="absent.crt cannot be read"):
            channel_credentials(InferenceSection(tls_ca_file=tmp_path / "absent.crt"))
        with pytest.raises(TlsConfigError, match="does not belong"):
            channel_credentials(InferenceSection(tls_cert_file=pki.client_crt, tls_key_file=pki.server_key))


class TestExportTarget:
    def test_dicom_target_tls_args(self, pki: Pki) -> None:
        assert tls_args(ExportTarget()) is None
        args = tls_args(ExportTarget(host="pacs", tls_ca_file=pki.ca_crt))
        assert args is not None and args[1] == "pacs" and args[0].check_hostname
        named = tls_args(ExportTarget(host="10.0.0.5", tls=True, tls_server_name="pacs.example"))
        assert named is not None and named[1] == "pacs.example"

    @pytest.mark.parametrize(
        ("keys", "message"),
        [
            ({"tls_key_file": KEY}, "both tls_cert_file and tls_key_file"),
            ({"type": "dicomweb", "url": "http://pacs/dicom-web", "tls": True}, "needs an https url"),
            ({"type": "dicomweb", "url": "https://pacs/dicom-web", "tls_server_name": "x"}, "dicom export targets"),
        ],
    )
    def test_invalid(self, keys: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            ExportTarget(**keys)  # type: ignore[arg-type]

    def test_bad_file_raises_at_tls_args(self, tmp_path: Path) -> None:
        with pytest.raises(TlsConfigError, match="gone.crt cannot be read"):
            tls_args(ExportTarget(tls_ca_file=tmp_path / "gone.crt"))
