"""The viewer behind bearer tokens, in headless Chromium: log in once, then OHIF works on the session cookie.

One server (`radbridge viewer`'s app plus STOW-RS) with a token file; a small
synthetic CT is sent by STOW-RS with the bearer token. Chromium first gets the
login form (401), posts the token, lands on OHIF's study list, which lists the
study through QIDO with the cookie alone, and opens it (WADO frames drawn). No
DICOMweb request of the page is refused.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient

from dicom_node.config import DEFAULT_OHIF_DIR, HttpSection, NodeSettings, SpoolSection, ViewerSection
from dicom_node.viewer import ohif_missing
from radbridge.synth import ct_series
from tests.browser import Browser, chromium_missing

OHIF_DIR = Path(os.environ.get("RADBRIDGE_OHIF_DIR", str(DEFAULT_OHIF_DIR)))
SLICES = 6
TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
if chromium_missing():
    pytestmark.append(pytest.mark.skip(reason=chromium_missing()))
elif ohif_missing(OHIF_DIR):
    pytestmark.append(pytest.mark.skip(reason=ohif_missing(OHIF_DIR)))


@pytest.fixture
def protected_viewer(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(base URL, token, study UID): the viewer app with STOW-RS, a token file, one study sent with it."""
    from dicom_node.http import HttpServer, create_app
    from dicom_node.index import Index
    from dicom_node.spool import Spool

    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{token}\n")
    token_file.chmod(0o600)
    settings = NodeSettings(
        http=HttpSection(token_file=token_file),
        viewer=ViewerSection(ohif_dir=OHIF_DIR),
        spool=SpoolSection(directory=tmp_path / "spool"),
    )
    spool = Spool(settings.spool.directory)
    index = Index(spool.index_path)
    server = HttpServer(create_app(settings, spool, index, stow=True, viewer=True), "127.0.0.1", 0)
    server.start()
    try:
        client = DICOMwebClient(url=f"{server.url}/dicom-web", headers={"Authorization": f"Bearer {token}"})
        series = ct_series(n_slices=SLICES)
        client.store_instances(series)
        yield server.url, token, str(series[0].StudyInstanceUID)
    finally:
        server.stop()
        index.close()


def test_login_then_study_list_and_viewer(protected_viewer: tuple[str, str, str]) -> None:
    base, token, study_uid = protected_viewer
    browser = Browser(base).start()
    try:
        viewer = browser.new_page()
        page = viewer.page
        dicomweb: list[tuple[int, str]] = []
        page.on(
            "response",
            lambda r: dicomweb.append((r.status, r.url)) if "/dicom-web/" in r.url else None,
        )
        first = page.goto(f"{base}/", timeout=TIMEOUT_MS)
        assert first is not None and first.status == 401
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        # OHIF's study list, filled by QIDO-RS on the session cookie.
        page.get_by_text("CT CHEST (synthetic phantom)").first.wait_for(timeout=TIMEOUT_MS)
        assert page.url.rstrip("/") == base
        viewer.open_study(study_uid, timeout_ms=TIMEOUT_MS)
        page.locator("canvas.cornerstone-canvas").first.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_function(
            '() => document.querySelector(\'[data-cy="viewport-pane"] [title="Instance Number"]\') !== null',
            timeout=TIMEOUT_MS,
        )
        session = [c for c in page.context.cookies() if c["name"] == "radbridge_session"]
        assert [(c["httpOnly"], c["sameSite"], c["value"] != token) for c in session] == [
            (True, "Strict", True)
        ]
        assert dicomweb, "OHIF made no DICOMweb request"
        refused = [(status, url) for status, url in dicomweb if status in (401, 403)]
        assert not refused, refused[:3]
        assert any("/frames/" in url for _, url in dicomweb), "no WADO-RS frame was fetched"
        assert not viewer.page_errors, viewer.page_errors[0][:500]
    finally:
        browser.stop()
