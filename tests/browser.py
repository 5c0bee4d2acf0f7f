"""Headless Debian Chromium driven by Playwright (sync API), set up the way OHIF 3.13.2 needs.

Never `playwright install`: the browser is Debian's /usr/bin/chromium, with
software WebGL (SwiftShader). Each page starts with OHIF's onboarding tour marked
as shown (its overlay catches clicks otherwise) and records every `pageerror`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}
#: Set before OHIF loads: the onboarding tour counts as shown, so its overlay never appears.
SKIP_TOUR_SCRIPT = "window.localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


def chromium_missing() -> str:
    """Why the browser tests cannot run here ("" when they can)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium, or bash scripts/setup.sh test)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (pip install -e '.[test]')"
    return ""


@dataclass
class ViewerPage:
    """One Playwright page on the viewer, with the page errors and console lines it produced."""

    page: Any  # playwright.sync_api.Page
    base_url: str
    page_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def open_study(self, study_uid: str, timeout_ms: float = 30_000) -> None:
        self.page.goto(f"{self.base_url}/viewer?StudyInstanceUIDs={study_uid}", timeout=timeout_ms)

    def text(self) -> str:
        return str(self.page.inner_text("body"))


class Browser:
    """A headless Chromium; :meth:`new_page` gives a fresh context and page per scenario."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._pw: Any = None
        self._browser: Any = None
        self._contexts: list[Any] = []

    def start(self) -> Browser:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
        except Exception:
            self._pw.stop()
            raise
        return self

    def stop(self) -> None:
        for context in self._contexts:
            context.close()
        self._contexts.clear()
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._pw is not None:
            self._pw.stop()
            self._pw = None

    def new_page(self) -> ViewerPage:
        context = self._browser.new_context(viewport=VIEWPORT)
        self._contexts.append(context)
        context.add_init_script(SKIP_TOUR_SCRIPT)
        page = context.new_page()
        viewer = ViewerPage(page, self.base_url)
        page.on("pageerror", lambda exc: viewer.page_errors.append(str(exc)))
        page.on("console", lambda msg: viewer.console.append(f"{msg.type}: {msg.text}"))
        return viewer

    def close_page(self, viewer: ViewerPage) -> None:
        context = viewer.page.context
        context.close()
        if context in self._contexts:
            self._contexts.remove(context)


@contextmanager
def browser(base_url: str) -> Iterator[Browser]:
    b = Browser(base_url).start()
    try:
        yield b
    finally:
        b.stop()
