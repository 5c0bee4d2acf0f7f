from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import NodeSettings, load_settings, settings_from
from inference_service.config import ServiceSettings
from inference_service.config import settings_from as service_settings_from
from radbridge_common.settings import ConfigError, read_layers, redacted


def test_defaults_are_safe_single_machine() -> None:
    s = NodeSettings()
    assert s.scp.host == "127.0.0.1"
    assert s.inference.address == ""  # embedded service
    assert s.export.targets == {}  # results kept in the local store
    assert ServiceSettings().inference_service.default_model == "reference"


def test_toml_then_env_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[scp]\nport = 4242\nae_title = "FROMFILE"\n'
        '[export.targets.pacs]\nhost = "127.0.0.1"\nport = 4243\nae_title = "ORTHANC"\n'
        '[[routing.rules]]\nname = "ct"\ntasks = ["segment"]\nmatch = { modality = ["CT"], body_part = "chest" }\n'
    )
    env = {"RADBRIDGE_SCP__PORT": "5000", "RADBRIDGE_COMPLETION__QUIET_WINDOW_S": "1.5"}
    s = settings_from(read_layers(cfg, env))
    assert s.scp.port == 5000  # env wins over file
    assert s.scp.ae_title == "FROMFILE"
    assert s.completion.quiet_window_s == 1.5
    assert s.export.targets["pacs"].port == 4243
    assert s.routing.rules[0].match.body_part == "chest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[scp]\nprot = 1\n", "scp.prot"),
        ("[scp]\nport = 'x'\n", "Not a valid int"),
        ("[scp]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", "AE title"),
        ("[[routing.rules]]\nname = 'r'\ntasks = ['paint']\n", "unknown task"),
        ("[[routing.rules]]\nname = 'r'\nmatch = { body_part = '(' }\n", "Invalid regular expression"),
        ("[completion]\nquiet_window_s = -1\n", "must not be negative"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_layers(tmp_path / "nope.toml", {})
    (tmp_path / "x.toml").write_text("[scp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_layers(tmp_path / "x.toml", {})


def test_service_default_model_must_exist() -> None:
    with pytest.raises(ConfigError, match="default_model"):
        service_settings_from({"inference_service": {"default_model": "ghost"}})


def test_redaction_hides_secrets() -> None:
    view = redacted({"api_token": "abc", "port": 1})
    assert view == {"api_token": "***", "port": 1}


def test_model_entries_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="Unknown backend"):
        service_settings_from({"models": {"x": {"backend": "nonesuch"}}})
    with pytest.raises(ConfigError, match="needs a local checkpoint"):
        service_settings_from({"models": {"mg": {"backend": "medgemma"}}})


def test_registry_implements_every_declared_backend_kind() -> None:
    from inference_service.backends.registry import BACKEND_TYPES
    from inference_service.config import BACKEND_KINDS

    assert set(BACKEND_TYPES) == set(BACKEND_KINDS)
