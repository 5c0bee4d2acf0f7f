"""Runs the inference service in a background thread with its own event loop.

`radbridge serve` and `radbridge demo` use it when no external service address
is configured; the node still talks to it over real gRPC on loopback.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from inference_service.config import ServiceSettings
from inference_service.server import RunningServer, run_server


class EmbeddedInferenceService:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="radbridge-inference", daemon=True
        )
        self._running: RunningServer | None = None

    @property
    def address(self) -> str:
        if self._running is None:
            raise RuntimeError("The inference service is not started.")
        return f"{self.settings.inference_service.host}:{self._running.port}"

    def start(self, timeout_s: float = 300.0) -> EmbeddedInferenceService:
        """Start and wait until the models are loaded (load errors surface here)."""
        self._thread.start()
        future: Future[RunningServer] = asyncio.run_coroutine_threadsafe(
            run_server(self.settings), self._loop
        )
        self._running = future.result(timeout_s)
        return self

    def stop(self) -> None:
        if self._running is not None:
            asyncio.run_coroutine_threadsafe(self._running.stop(2.0), self._loop).result(30)
            self._running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> EmbeddedInferenceService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
