"""The viewer's routes: a pinned prebuilt OHIF on the node's origin, and a DICOMweb proxy to a PACS.

Two route factories for the node's one HTTP app (``dicom_node.http``):

- :func:`viewer_routes` serves the unpacked ``@ohif/app`` ``dist/`` from
  ``viewer.ohif_dir`` with a single-page-app fallback to ``index.html``, and an
  ``/app-config.js`` written here (not the dist's own) whose one data source is
  the DICOMweb root on the same origin.
- :func:`proxy_routes` forwards everything under a mount (``/dicom-web``) to a
  PACS's DICOMweb root, streaming bodies, and rewrites the PACS's absolute URLs
  in JSON answers (BulkDataURI, RetrieveURL) to the proxy's own origin, so the
  browser never leaves the one origin.

OHIF itself is never in the repository: ``scripts/setup.sh`` unpacks it
outside, into ``ViewerSection.ohif_dir`` (``~/.cache/radbridge/ohif-<version>``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicom_node.config import OHIF_VERSION, ViewerSection

logger = logging.getLogger(__name__)

SETUP_COMMAND = "bash scripts/setup.sh"
APP_CONFIG_PATH = "/app-config.js"
INDEX_HTML = "index.html"
DATA_SOURCE_NAME = "radbridge"
#: Media types Python's table lacks or gets wrong for the OHIF dist.
MEDIA_TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript"}
#: Headers of a browser request that travel to the upstream (nothing else: no cookies, no auth).
FORWARDED_REQUEST_HEADERS = ("accept", "content-type", "content-length", "if-none-match", "if-modified-since")
#: Headers of an upstream answer that travel back (content-length only when the body is unchanged).
FORWARDED_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-location",
    "etag",
    "last-modified",
    "cache-control",
    "warning",
)
JSON_MEDIA_TYPES = ("application/dicom+json", "application/json")
#: Upstream time limits: connect quickly or answer 502; a slow PACS may take a while per chunk.
DEFAULT_UPSTREAM_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
NO_CACHE = {"Cache-Control": "no-cache"}


# -- OHIF ----------------------------------------------------------------------------
def ohif_missing(ohif_dir: Path) -> str:
    """Why ``ohif_dir`` cannot be served ("" when it can): a sentence naming the dir and the fix."""
    if (Path(ohif_dir) / INDEX_HTML).is_file():
        return ""
    return (
        f"OHIF {OHIF_VERSION} is not installed in {ohif_dir} (no {INDEX_HTML}). "
        f"Run `{SETUP_COMMAND}` (it unpacks the prebuilt @ohif/app@{OHIF_VERSION} there), "
        "or point viewer.ohif_dir / RADBRIDGE_VIEWER__OHIF_DIR at an unpacked OHIF dist/."
    )


def ohif_config(dicomweb_root: str) -> dict[str, Any]:
    """OHIF's ``window.config``: one DICOMweb data source at ``dicomweb_root`` (checked against 3.13.2)."""
    return {
        "name": "radbridge",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        # Everything is one origin; without cross-origin isolation OHIF only loses SharedArrayBuffer.
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": DATA_SOURCE_NAME,
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": DATA_SOURCE_NAME,
                "configuration": {
                    "friendlyName": "RadBridge",
                    "name": DATA_SOURCE_NAME,
                    "qidoRoot": dicomweb_root,
                    "wadoRoot": dicomweb_root,
                    "wadoUriRoot": dicomweb_root,
                    "qidoSupportsIncludeField": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "enableStudyLazyLoad": True,
                    "omitQuotationForMultipartRequest": True,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                },
            }
        ],
    }


def app_config_js(dicomweb_root: str) -> str:
    """The text of ``/app-config.js`` (JSON is valid JavaScript)."""
    body = json.dumps(ohif_config(dicomweb_root), indent=2)
    return f"/* Written by RadBridge for OHIF {OHIF_VERSION}; not the dist's own app-config.js. */\nwindow.config = {body};\n"


def _missing_response(ohif_dir: Path) -> JSONResponse:
    return JSONResponse(
        {
            "error": "OHIF is not installed",
            "detail": ohif_missing(ohif_dir),
            "ohif_dir": str(ohif_dir),
            "setup": SETUP_COMMAND,
        },
        status_code=503,
    )


def _static_file(root: Path, url_path: str) -> Path | None:
    """The file under ``root`` that ``url_path`` names, or None (never outside ``root``)."""
    candidate = Path(os.path.realpath(root / url_path.lstrip("/")))
    if candidate != root and root not in candidate.parents:
        return None
    return candidate if candidate.is_file() else None


def viewer_routes(viewer: ViewerSection, dicomweb_root: str = "/dicom-web") -> list[BaseRoute]:
    """OHIF from ``viewer.ohif_dir`` plus a generated ``/app-config.js`` pointing at ``dicomweb_root``.

    ``dicomweb_root`` is a path on this origin ("/dicom-web"), written into the config as
    that origin-relative path (OHIF 3.13.2 resolves it against the page, so no Host header
    is trusted), or an absolute URL used as given. The last route catches every GET path:
    unknown paths without a file suffix (``/viewer?...``, ``/segmentation``) answer
    ``index.html``; missing files answer 404. Put these routes after all others; paths
    under ``dicomweb_root`` are never answered here.
    While ``ohif_dir/index.html`` is missing every route answers 503 with a JSON body
    naming the directory and the setup command.
    """
    ohif_dir = Path(viewer.ohif_dir)
    absolute = dicomweb_root.startswith(("http://", "https://"))
    config_root = dicomweb_root.rstrip("/") if absolute else "/" + dicomweb_root.strip("/")
    api_prefix = "" if absolute else config_root

    async def app_config(request: Request) -> Response:
        if ohif_missing(ohif_dir):
            return _missing_response(ohif_dir)
        text = app_config_js(config_root)
        return Response(text, media_type="text/javascript", headers=NO_CACHE)

    async def static(request: Request) -> Response:
        if ohif_missing(ohif_dir):
            return _missing_response(ohif_dir)
        url_path = "/" + request.path_params["path"]
        if api_prefix and (url_path == api_prefix or url_path.startswith(api_prefix + "/")):
            return JSONResponse({"error": "not found"}, status_code=404)
        root = Path(os.path.realpath(ohif_dir))
        found = _static_file(root, url_path)
        if found is not None and found.name != INDEX_HTML:
            media_type = MEDIA_TYPES.get(found.suffix)
            return FileResponse(found, media_type=media_type)
        if found is None and PurePosixPath(url_path).suffix:
            return JSONResponse({"error": "not found"}, status_code=404)
        # The SPA fallback: OHIF's router reads the path (/viewer, /segmentation, ...).
        return FileResponse(root / INDEX_HTML, media_type="text/html", headers=NO_CACHE)

    return [
        Route(APP_CONFIG_PATH, app_config, methods=["GET", "HEAD"]),
        Route("/{path:path}", static, methods=["GET", "HEAD"]),
    ]


# -- DICOMweb proxy ------------------------------------------------------------------
def rewrite_urls(document: Any, upstream_root: str, public_root: str) -> Any:
    """Every string in a JSON document that starts with ``upstream_root`` re-rooted at ``public_root``."""
    upstream_root = upstream_root.rstrip("/")
    public_root = public_root.rstrip("/")

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            if value == upstream_root or value.startswith(upstream_root + "/"):
                return public_root + value[len(upstream_root) :]
            return value
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(document)


class _Clients:
    """One pooled httpx.AsyncClient per running event loop (a client's pool is bound to its loop)."""

    def __init__(self, timeout: httpx.Timeout) -> None:
        self._timeout = timeout
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._by_loop.get(loop)
        if client is None:
            # identity: JSON answers are rewritten here; the rest streams through as it came.
            client = httpx.AsyncClient(
                timeout=self._timeout, follow_redirects=False, headers={"Accept-Encoding": "identity"}
            )
            self._by_loop[loop] = client
        return client


def proxy_routes(
    upstream: str,
    mount: str = "/dicom-web",
    *,
    timeout: httpx.Timeout = DEFAULT_UPSTREAM_TIMEOUT,
    token: str = "",
) -> list[BaseRoute]:
    """Forward every method under ``mount`` to the DICOMweb root ``upstream`` (e.g. a PACS's).

    Accept, Content-Type and the request body (STOW-RS) travel upstream with the query
    string; the answer streams back. JSON answers (``application/dicom+json``) are read
    whole and their absolute upstream URLs re-rooted at this origin's ``mount``. An
    unreachable upstream answers 502 with a JSON body. ``token`` (if any) goes upstream as
    ``Authorization: Bearer``; the browser's own credentials never do.
    """
    if not upstream.startswith(("http://", "https://")):
        raise ValueError(f"The proxy upstream {upstream!r} must be an http(s) URL.")
    upstream_root = upstream.rstrip("/")
    mount = "/" + mount.strip("/")
    clients = _Clients(timeout)
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]

    async def forward(request: Request) -> Response:
        rest = request.path_params.get("path", "")
        url = upstream_root + ("/" + rest if rest else "")
        if request.url.query:  # as the browser wrote it (includefield=a,b stays unencoded)
            url += "?" + request.url.query
        has_body = request.method in ("POST", "PUT", "PATCH")
        headers = {
            k: v
            for k, v in request.headers.items()
            if k in FORWARDED_REQUEST_HEADERS and (has_body or k not in ("content-type", "content-length"))
        }
        if token:
            headers["authorization"] = f"Bearer {token}"
        body: AsyncIterator[bytes] | None = request.stream() if has_body else None
        client = clients.get()
        upstream_request = client.build_request(request.method, url, headers=headers, content=body)
        try:
            answer = await client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            logger.warning("viewer proxy: upstream unreachable (%s)", type(exc).__name__)
            return JSONResponse(
                {"error": "DICOMweb upstream unreachable", "upstream": upstream_root, "detail": str(exc)},
                status_code=502,
            )
        public_root = str(request.base_url).rstrip("/") + mount
        out_headers = {k: v for k, v in answer.headers.items() if k in FORWARDED_RESPONSE_HEADERS}
        location = answer.headers.get("location")
        if location:
            out_headers["location"] = rewrite_urls(location, upstream_root, public_root)
        media_type = answer.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type in JSON_MEDIA_TYPES and request.method != "HEAD":
            try:
                raw = await answer.aread()
            except httpx.TransportError as exc:
                return JSONResponse(
                    {"error": "DICOMweb upstream broke off", "upstream": upstream_root, "detail": str(exc)},
                    status_code=502,
                )
            finally:
                await answer.aclose()
            out_headers.pop("content-length", None)
            try:
                document = json.loads(raw) if raw.strip() else None
            except ValueError:
                return Response(raw, status_code=answer.status_code, headers=out_headers)
            if document is not None:
                raw = json.dumps(rewrite_urls(document, upstream_root, public_root)).encode()
            return Response(raw, status_code=answer.status_code, headers=out_headers)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers=out_headers,
            background=BackgroundTask(answer.aclose),
        )

    return [
        Route(mount, forward, methods=methods),
        Route(mount + "/{path:path}", forward, methods=methods),
    ]
