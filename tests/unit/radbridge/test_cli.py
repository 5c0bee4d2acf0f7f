from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from radbridge.cli import main


def test_help_stands_on_its_own() -> None:
    out = subprocess.run([sys.executable, "-m", "radbridge.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("serve", "demo", "status", "models", "RADBRIDGE_SCP__PORT", "reference"):
        assert word in out.stdout


def test_models_lists_the_reference_backend(capsys) -> None:  # noqa: ANN001
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "reference (default) [non-clinical]" in out and "segment" in out


def test_bad_config_is_a_clear_cli_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg = tmp_path / "c.toml"
    cfg.write_text("[scpp]\nport = 1\n")
    assert main(["config", "show", "--config", str(cfg)]) == 2
    assert "Unknown config section(s): scpp" in capsys.readouterr().err


def test_unknown_backend_type_is_reported(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.x]\nbackend = "nonesuch"\n')
    assert main(["models", "--config", str(cfg)]) == 2
    assert "nonesuch" in capsys.readouterr().err


def test_standalone_inference_service_serves_health_and_models(tmp_path: Path) -> None:
    import os
    import signal

    from dicom_node.client import InferenceClient
    from tests.peers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference_service", "serve"],
        env={**os.environ, "RADBRIDGE_INFERENCE_SERVICE__PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = InferenceClient(f"127.0.0.1:{port}")
        models = client.list_models(timeout_s=30)
        client.close()
        assert [m.identity.name for m in models.models] == ["reference"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
