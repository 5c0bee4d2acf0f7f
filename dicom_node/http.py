"""The node's one HTTP front: STOW-RS, read-only DICOMweb, the viewer and /healthz on one port.

One Starlette app per node (DESIGN.md, "One HTTP front per node"), so that one
auth layer (``dicom_node.auth``: bearer tokens, browser session cookie) wraps
everything at once. ``HttpServer`` runs it under
uvicorn in a background thread and reports the port it bound, so tests can
ask for port 0.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dicom_node.auth import AuthMiddleware, read_bearer_token, resolve_auth
from dicom_node.config import NodeSettings
from dicom_node.dicomweb import DicomWeb
from dicom_node.index import Index
from dicom_node.spool import Spool
from dicom_node.stow import receive

logger = logging.getLogger(__name__)
DICOMWEB_ROOT = "/dicom-web"


def create_app(
    settings: NodeSettings,
    spool: Spool,
    index: Index,
    *,
    stow: bool = True,
    viewer: bool = False,
    upstream: str | None = None,
    host: str | None = None,
) -> Starlette:
    """The app: /healthz, /metrics (Prometheus); STOW-RS and POST /pull if ``stow``; DICOMweb of the spool, or a proxy to ``upstream``
    (default ``settings.viewer.upstream``); OHIF at / if ``viewer``.

    Every route but /healthz sits behind ``settings.http``'s tokens when it has any;
    ``host`` (default ``settings.http.host``) is the address the app will listen on:
    an app without tokens is refused (ConfigError) unless that is loopback or
    ``http.auth = "none"``.
    """
    auth = resolve_auth(settings.http, settings.http.host if host is None else host)
    upstream = settings.viewer.upstream if upstream is None else upstream
    web = DicomWeb(index, DICOMWEB_ROOT)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        from dicom_node.metrics import CONTENT_TYPE, exposition

        body = await anyio.to_thread.run_sync(exposition, index)
        return Response(body, media_type=CONTENT_TYPE)

    async def pull(request: Request) -> Response:
        from dicom_node.retrieve import pull_request

        return await pull_request(request, settings, spool, index)

    async def stow_rs(request: Request) -> Response:
        return await receive(
            request, spool, index, settings.http, web.base_url(request), request.path_params.get("study")
        )

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if stow:
        routes += [
            Route(f"{DICOMWEB_ROOT}/studies", stow_rs, methods=["POST"]),
            Route(f"{DICOMWEB_ROOT}/studies/{{study}}", stow_rs, methods=["POST"]),
            Route("/pull", pull, methods=["POST"]),  # dicom_node.retrieve; write scope
        ]
    if upstream:
        from dicom_node.viewer import proxy_routes

        v = settings.viewer
        token = read_bearer_token(v.upstream_token_file, v.upstream_token_env, "viewer.upstream")
        routes += proxy_routes(upstream, DICOMWEB_ROOT, token=token)
    else:
        routes += web.routes()
    if viewer:
        from dicom_node.viewer import viewer_routes

        routes += viewer_routes(settings.viewer, DICOMWEB_ROOT)
    middleware = [Middleware(AuthMiddleware, auth=auth)] if auth is not None else []
    return Starlette(routes=routes, middleware=middleware)


class HttpServer:
    """uvicorn in a daemon thread; ``start()`` returns the bound port."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0) -> None:
        # uvicorn's start-up lines duplicate ours ("http.start"); keep its warnings and errors.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off", ws="none"
        )
        self.app = app
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="radbridge-http", daemon=True)
        self.host = host
        self.port = 0

    def _run(self) -> None:
        asyncio.run(self._server.serve())

    def start(self, timeout_s: float = 15.0) -> int:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The HTTP server could not listen on {self.host}.")
            time.sleep(0.02)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        logger.info("HTTP listening", extra={"event": "http.start", "port": self.port})
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
