"""dicom_node.viewer: OHIF's app-config, the SPA fallback, 503 without OHIF, and the DICOMweb proxy.

The proxy is tested against a real upstream on loopback (uvicorn in a thread) that
answers the way Orthanc does: absolute URLs built from its own Host header.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from dicom_node.config import ViewerSection
from dicom_node.viewer import (
    SETUP_COMMAND,
    _static_file,
    app_config_js,
    ohif_missing,
    proxy_routes,
    rewrite_urls,
    viewer_routes,
)
from tests.peers import free_port

STUDY = "1.2.3.4"
FRAME = bytes(range(256)) * 64


def parse_config(js: str) -> dict:
    head, _, body = js.partition("window.config = ")
    assert head.startswith("/*") and body.endswith(";\n")
    return json.loads(body[: -len(";\n")])


@pytest.fixture
def ohif_dir(tmp_path: Path) -> Path:
    """A stand-in for the unpacked OHIF dist/."""
    d = tmp_path / "ohif"
    (d / "assets").mkdir(parents=True)
    (d / "index.html").write_text("<!doctype html><title>OHIF</title>")
    (d / "app-config.js").write_text("window.config = {dataSources: []};  // DIST-MARKER")
    (d / "app.bundle.js").write_text("console.log('ohif');")
    (d / "decoder.wasm").write_bytes(b"\0asm\1\0\0\0")
    (d / "assets" / "favicon.ico").write_bytes(b"ico")
    (tmp_path / "secret.txt").write_text("outside the dist")
    return d


def viewer_client(ohif_dir: Path, root: str = "/dicom-web") -> TestClient:
    return TestClient(Starlette(routes=viewer_routes(ViewerSection(ohif_dir=ohif_dir), root)))


class TestAppConfig:
    def test_one_dicomweb_source_on_the_same_origin(self, ohif_dir: Path) -> None:
        r = viewer_client(ohif_dir).get("/app-config.js")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/javascript")
        assert r.headers["cache-control"] == "no-cache"
        config = parse_config(r.text)
        [source] = config["dataSources"]
        assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
        assert config["defaultDataSourceName"] == source["sourceName"]
        c = source["configuration"]
        assert c["qidoRoot"] == c["wadoRoot"] == c["wadoUriRoot"] == "/dicom-web"
        for key in (
            "qidoSupportsIncludeField",
            "supportsFuzzyMatching",
            "enableStudyLazyLoad",
            "omitQuotationForMultipartRequest",
        ):
            assert c[key] is True, key
        assert c["imageRendering"] == c["thumbnailRendering"] == "wadors"
        assert config["investigationalUseDialog"] == {"option": "never"}
        assert config["showStudyList"] is True

    def test_roots_as_given_or_normalised(self, ohif_dir: Path) -> None:
        def roots(root: str) -> set[str]:
            c = parse_config(viewer_client(ohif_dir, root).get("/app-config.js").text)["dataSources"][0]
            return {c["configuration"][k] for k in ("qidoRoot", "wadoRoot", "wadoUriRoot")}

        assert roots("dicom-web/") == {"/dicom-web"}
        assert roots("https://pacs.example/dicom-web/") == {"https://pacs.example/dicom-web"}
        assert parse_config(app_config_js("/x"))["dataSources"][0]["configuration"]["qidoRoot"] == "/x"


class TestStaticFiles:
    def test_spa_fallback_for_app_paths(self, ohif_dir: Path) -> None:
        client = viewer_client(ohif_dir)
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/segmentation", "/viewer/dicomweb"):
            r = client.get(path)
            assert r.status_code == 200, path
            assert "<title>OHIF</title>" in r.text
            assert r.headers["content-type"].startswith("text/html")
            assert r.headers["cache-control"] == "no-cache"

    def test_files_with_their_media_types(self, ohif_dir: Path) -> None:
        client = viewer_client(ohif_dir)
        assert client.get("/app.bundle.js").headers["content-type"].startswith("text/javascript")
        wasm = client.get("/decoder.wasm")
        assert wasm.headers["content-type"] == "application/wasm"
        assert wasm.content == b"\0asm\1\0\0\0"
        assert client.get("/assets/favicon.ico").content == b"ico"
        assert client.head("/app.bundle.js").status_code == 200

    def test_generated_app_config_replaces_the_dists(self, ohif_dir: Path) -> None:
        assert "DIST-MARKER" not in viewer_client(ohif_dir).get("/app-config.js").text

    def test_missing_file_is_404_not_index(self, ohif_dir: Path) -> None:
        client = viewer_client(ohif_dir)
        assert client.get("/missing.bundle.js").status_code == 404
        assert client.get("/assets/nope.png").status_code == 404

    def test_dicomweb_paths_are_never_the_app(self, ohif_dir: Path) -> None:
        client = viewer_client(ohif_dir)
        assert client.get("/dicom-web/studies").status_code == 404
        assert client.get("/dicom-web").status_code == 404

    def test_no_file_outside_the_dist(self, ohif_dir: Path) -> None:
        client = viewer_client(ohif_dir)
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/assets/../../secret.txt"):
            r = client.get(path)
            assert "outside the dist" not in r.text, path

    def test_traversal_is_refused_below_http(self, ohif_dir: Path) -> None:
        root = ohif_dir.resolve()
        assert _static_file(root, "/../secret.txt") is None
        assert _static_file(root, "/assets/../../secret.txt") is None
        assert _static_file(root, "/assets/../index.html") == root / "index.html"

    def test_only_read_methods(self, ohif_dir: Path) -> None:
        assert viewer_client(ohif_dir).post("/viewer").status_code == 405


class TestOhifMissing:
    def test_routes_answer_503_naming_the_dir_and_the_setup(self, tmp_path: Path) -> None:
        missing = tmp_path / "no-ohif"
        client = viewer_client(missing)
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/app-config.js", "/app.bundle.js"):
            r = client.get(path)
            assert r.status_code == 503, path
            body = r.json()
            assert body["ohif_dir"] == str(missing)
            assert body["setup"] == SETUP_COMMAND
            assert str(missing) in body["detail"] and SETUP_COMMAND in body["detail"]

    def test_message(self, tmp_path: Path, ohif_dir: Path) -> None:
        assert ohif_missing(ohif_dir) == ""
        text = ohif_missing(tmp_path / "x")
        assert str(tmp_path / "x") in text and "bash scripts/setup.sh" in text and "3.13.2" in text

    def test_cli_exits_2_with_the_message(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from radbridge.cli import main

        monkeypatch.delenv("RADBRIDGE_CONFIG", raising=False)
        monkeypatch.setenv("RADBRIDGE_VIEWER__OHIF_DIR", str(tmp_path / "absent"))
        monkeypatch.setenv("RADBRIDGE_SPOOL__DIRECTORY", str(tmp_path / "spool"))
        assert main(["viewer", "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "absent") in err and "bash scripts/setup.sh" in err


# -- the proxy -----------------------------------------------------------------------
class Upstream:
    """A DICOMweb stand-in on loopback that answers like Orthanc (URLs from its Host header)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.port = free_port()
        app = Starlette(
            routes=[
                Route("/dicom-web/studies", self.studies, methods=["GET", "POST"]),
                Route("/dicom-web/studies/{study}/metadata", self.metadata),
                Route("/dicom-web/studies/{study}/frames", self.frames),
                Route("/dicom-web/moved", self.moved),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def _record(self, request: Request, body: bytes = b"") -> str:
        self.seen.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "accept": request.headers.get("accept"),
                "content-type": request.headers.get("content-type"),
                "authorization": request.headers.get("authorization"),
                "cookie": request.headers.get("cookie"),
                "body": body,
            }
        )
        return f"http://{request.headers['host']}/dicom-web"

    async def studies(self, request: Request) -> Response:
        body = await request.body()
        base = self._record(request, body)
        if request.method == "POST":
            return JSONResponse(
                {"00081190": {"vr": "UR", "Value": [f"{base}/studies/{STUDY}"]}},
                media_type="application/dicom+json",
            )
        return JSONResponse(
            [{"00081190": {"vr": "UR", "Value": [f"{base}/studies/{STUDY}"]}}],
            media_type="application/dicom+json",
        )

    async def metadata(self, request: Request) -> Response:
        base = self._record(request)
        doc = [
            {
                "7FE00010": {"vr": "OW", "BulkDataURI": f"{base}/studies/{STUDY}/bulk/7FE00010"},
                "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081030": {"vr": "LO", "Value": [f"not a URL: {base}x"]},
            }
        ]
        return Response(json.dumps(doc), media_type="application/dicom+json")

    async def frames(self, request: Request) -> Response:
        self._record(request)
        boundary = "b0undary"
        body = (
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
            + FRAME
            + f"\r\n--{boundary}--\r\n".encode()
        )
        media = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
        return Response(body, media_type=media)

    async def moved(self, request: Request) -> Response:
        base = self._record(request)
        return Response(status_code=303, headers={"Location": f"{base}/studies"})

    def __enter__(self) -> Upstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


def proxy_client(upstream_root: str) -> TestClient:
    return TestClient(
        Starlette(routes=proxy_routes(upstream_root, "/dicom-web")), base_url="http://viewer:3000"
    )


class TestProxy:
    def test_qido_urls_point_at_the_proxy(self, upstream: Upstream) -> None:
        with proxy_client(upstream.root) as client:
            r = client.get(
                "/dicom-web/studies?includefield=00081030,00080060&limit=101&PatientName=A*",
                headers={"Accept": "application/dicom+json", "Cookie": "s=1", "Authorization": "Bearer t"},
            )
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/dicom+json"
        assert r.json()[0]["00081190"]["Value"] == [f"http://viewer:3000/dicom-web/studies/{STUDY}"]
        seen = upstream.seen[-1]
        assert seen["path"] == "/dicom-web/studies"
        assert seen["query"] == "includefield=00081030,00080060&limit=101&PatientName=A*"
        assert seen["accept"] == "application/dicom+json"
        assert seen["cookie"] is None and seen["authorization"] is None

    def test_bulk_data_uris_are_rewritten_and_nothing_else(self, upstream: Upstream) -> None:
        with proxy_client(upstream.root + "/") as client:  # a trailing slash in the config too
            r = client.get(f"/dicom-web/studies/{STUDY}/metadata")
        [item] = r.json()
        assert (
            item["7FE00010"]["BulkDataURI"] == f"http://viewer:3000/dicom-web/studies/{STUDY}/bulk/7FE00010"
        )
        assert item["00081030"]["Value"] == [f"not a URL: {upstream.root}x"]
        assert int(r.headers["content-length"]) == len(r.content)

    def test_frames_stream_through_unchanged(self, upstream: Upstream) -> None:
        accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
        with proxy_client(upstream.root) as client:
            r = client.get(f"/dicom-web/studies/{STUDY}/frames", headers={"Accept": accept})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("multipart/related")
        assert "boundary=b0undary" in r.headers["content-type"]
        assert FRAME in r.content
        assert upstream.seen[-1]["accept"] == accept

    def test_stow_body_and_content_type_are_forwarded(self, upstream: Upstream) -> None:
        media = 'multipart/related; type="application/dicom"; boundary=xyz'
        payload = b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--xyz--\r\n"
        with proxy_client(upstream.root) as client:
            r = client.post("/dicom-web/studies", content=payload, headers={"Content-Type": media})
        assert r.status_code == 200
        assert r.json()["00081190"]["Value"] == [f"http://viewer:3000/dicom-web/studies/{STUDY}"]
        seen = upstream.seen[-1]
        assert seen["method"] == "POST" and seen["body"] == payload and seen["content-type"] == media

    def test_redirects_stay_on_the_proxy(self, upstream: Upstream) -> None:
        with proxy_client(upstream.root) as client:
            r = client.get("/dicom-web/moved", follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == "http://viewer:3000/dicom-web/studies"

    def test_unreachable_upstream_is_502(self) -> None:
        root = f"http://127.0.0.1:{free_port()}/dicom-web"
        with proxy_client(root) as client:
            r = client.get("/dicom-web/studies")
        assert r.status_code == 502
        assert r.json()["error"] == "DICOMweb upstream unreachable"
        assert r.json()["upstream"] == root

    def test_upstream_must_be_http(self) -> None:
        with pytest.raises(ValueError, match="http"):
            proxy_routes("ftp://pacs/dicom-web")


def test_rewrite_urls_only_rewrites_whole_prefixes() -> None:
    doc = {"a": ["http://u:1/dw/studies/1", "http://u:1/dwx", "http://u:1/dw"], "b": {"c": 1}}
    assert rewrite_urls(doc, "http://u:1/dw/", "http://p/dicom-web") == {
        "a": ["http://p/dicom-web/studies/1", "http://u:1/dwx", "http://p/dicom-web"],
        "b": {"c": 1},
    }
