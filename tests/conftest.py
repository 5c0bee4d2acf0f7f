"""Fixtures for real peers; a missing peer is a skip that names what is missing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# hypothesis' pytest plugin imports hypothesis only at the end of a run that has no hypothesis test;
# after gRPC has run, CPython 3.11.7's ast (pytest rewrites hypothesis' modules on import) can then
# fail with "AST constructor recursion depth mismatch" (CPython gh-106905). Import it up front.
import hypothesis  # noqa: F401
import pytest

# Import hypothesis now, while pytest starts: its plugin otherwise imports it (assertion-rewritten)
# in pytest_terminal_summary, and on CPython 3.11.7 ast.parse there fails with "SystemError: AST
# constructor recursion depth mismatch" once any test has hit a RecursionError (torch, transformers),
# turning a green session into an INTERNALERROR.
with contextlib.suppress(ImportError):
    import hypothesis  # noqa: F401

from dicom_node.config import ScpSection
from dicom_node.index import Index
from dicom_node.scp import start_scp
from dicom_node.spool import Spool
from radbridge.synth import ct_series, write_series
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, OrthancServer, missing_tools
from tests.tls_ca import Pki, make_pki, openssl_missing


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    if not os.access(ORTHANC_BIN, os.X_OK):
        pytest.skip(f"Orthanc not installed ({ORTHANC_BIN}); apt-get install orthanc")
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(f"Orthanc DICOMweb plugin missing ({DICOMWEB_PLUGIN}); apt-get install orthanc-dicomweb")
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def require_dcmtk() -> None:
    missing = missing_tools("storescu", "echoscu", "dsrdump")
    if missing:
        pytest.skip(f"dcmtk tools missing: {', '.join(missing)}; apt-get install dcmtk")


@pytest.fixture
def require_dicom3tools() -> None:
    if missing_tools("dciodvfy"):
        pytest.skip("dciodvfy missing; apt-get install dicom3tools")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA, a localhost server certificate, client certificates (ours and a stranger's)."""
    if openssl_missing():
        pytest.skip("openssl missing; apt-get install openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def small_ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 512x512 synthetic CT series of 24 slices written to disk (slice order)."""
    return write_series(ct_series(n_slices=24), tmp_path_factory.mktemp("ct"))


def staged_data(directory: Path) -> list[Path]:
    """Staging files holding data: a data set being written, or one left behind. The empty ones
    are the spares dicom_node.staging keeps made ahead (removed when the SCP stops)."""
    found = []
    for path in directory.rglob("*.partial"):
        with contextlib.suppress(FileNotFoundError):  # placed or removed meanwhile
            if path.stat().st_size:
                found.append(path)
    return found


#: start_node_scp(**scp_keys) -> (port, spool, index): the node's SCP on a free loopback port.
StartScp = Callable[..., tuple[int, Spool, Index]]


@pytest.fixture
def start_node_scp(tmp_path: Path) -> Iterator[StartScp]:
    """Start the node's SCP (AE title RADBRIDGE) with [scp] keys; each is stopped after the test."""
    started: list[tuple[Any, Index]] = []

    def start(**scp_keys: Any) -> tuple[int, Spool, Index]:
        spool = Spool(tmp_path / f"spool-{len(started)}")
        index = Index(spool.index_path)
        server = start_scp(ScpSection(port=0, ae_title="RADBRIDGE", **scp_keys), spool, index)
        started.append((server, index))
        return server.server_address[1], spool, index

    yield start
    for server, index in started:
        server.shutdown()
        index.close()
