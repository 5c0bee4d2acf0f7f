"""STOW-RS export with a bearer token (from a file or an environment variable) to a protected RadBridge node.

The destination is the node's own HTTP app behind ``dicom_node.auth`` on a loopback
port; it answers 401 without the token and stores the instance with it.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.config import ExportTarget, HttpSection, NodeSettings, SpoolSection
from dicom_node.errors import PermanentExportError
from dicom_node.export import send_stow
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index
from dicom_node.spool import Spool


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[tuple[str, str, Index]]:
    """(DICOMweb root, a write token, the destination's index)."""
    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "node-tokens"
    token_file.write_text(f"{token} write\n")
    settings = NodeSettings(
        http=HttpSection(token_file=token_file), spool=SpoolSection(directory=tmp_path / "dest")
    )
    spool = Spool(settings.spool.directory)
    index = Index(spool.index_path)
    server = HttpServer(create_app(settings, spool, index), "127.0.0.1", 0)
    server.start()
    try:
        yield f"{server.url}/dicom-web", token, index
    finally:
        server.stop()
        index.close()


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    path = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    return path


def _stored(index: Index) -> int:
    return index.count_instances()


def _study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_token_from_a_file(tmp_path: Path, protected: tuple[str, str, Index], instance: Path) -> None:
    url, token, index = protected
    (tmp_path / "pacs-token").write_text(f"# for the test node\n{token}\n")
    send_stow([instance], ExportTarget(type="dicomweb", url=url, token_file=tmp_path / "pacs-token"), "RB")
    assert _stored(index) == 1
    assert [s["study_instance_uid"] for s in index.studies()] == [_study(instance)]


def test_token_from_the_environment(
    protected: tuple[str, str, Index], instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, token, index = protected
    monkeypatch.setenv("PACS_TOKEN", token)
    send_stow([instance], ExportTarget(type="dicomweb", url=url, token_env="PACS_TOKEN"), "RB")
    assert _stored(index) == 1


def test_without_or_with_a_wrong_token_is_permanent(
    tmp_path: Path, protected: tuple[str, str, Index], instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, token, index = protected
    with pytest.raises(PermanentExportError, match="HTTP 401"):
        send_stow([instance], ExportTarget(type="dicomweb", url=url), "RB")
    (tmp_path / "wrong").write_text(secrets.token_urlsafe(32))
    with pytest.raises(PermanentExportError, match="HTTP 401"):
        send_stow([instance], ExportTarget(type="dicomweb", url=url, token_file=tmp_path / "wrong"), "RB")
    monkeypatch.delenv("PACS_TOKEN", raising=False)
    with pytest.raises(PermanentExportError, match="PACS_TOKEN is not set"):
        send_stow([instance], ExportTarget(type="dicomweb", url=url, token_env="PACS_TOKEN"), "RB")
    with pytest.raises(PermanentExportError, match="token file .* cannot be read"):
        send_stow([instance], ExportTarget(type="dicomweb", url=url, token_file=tmp_path / "absent"), "RB")
    assert _stored(index) == 0


def test_token_file_and_env_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        ExportTarget(type="dicomweb", url="http://pacs/dicom-web", token_file=Path("t"), token_env="T")
